"""A tiny LDS world builds in seconds, resumes, refuses another spec, and its study scores variants."""

from __future__ import annotations

import numpy as np
import pytest

from carv_attrib.errors import ConfigMismatchError
from carv_attrib.lds.study import Variant, score_variants
from carv_attrib.lds.world import WorldSpec, build_world
from carv_attrib.pipeline.encode import run_encode

TINY = WorldSpec(
    name="tiny", seed=3, n_train=8, n_query=2, n_pretrain=4, subsets=8, steps=3, pretrain_steps=2,
    gt_draws=4, preset="tiny", transformer="preset", frames=5,
)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    return build_world(TINY, tmp_path_factory.mktemp("worlds") / "tiny", workers=1, encode=run_encode)


def test_world_has_models_ground_truth_and_subsets(world) -> None:
    assert world.gt_values().shape == (8, 2) and np.isfinite(world.gt_values()).all()
    pos = world.subset_positions()
    assert pos.shape == (8, 4) and all(len(set(p)) == 4 for p in pos.tolist())
    assert world.second_moments_path.exists()  # AdamW: v̂ of the full model for the adam preconditioner
    assert len(world.clips("train")) == 8 and len(world.clips("query")) == 2


def test_rebuild_resumes_and_another_spec_is_refused(world) -> None:
    before = (world.model_dir("subset-000") / "gt.json").stat().st_mtime_ns
    build_world(TINY, world.root, workers=1, encode=run_encode)
    assert (world.model_dir("subset-000") / "gt.json").stat().st_mtime_ns == before
    with pytest.raises(ConfigMismatchError, match="another world"):
        build_world(WorldSpec(name="tiny", seed=4), world.root, encode=run_encode)


def test_study_scores_product_and_exact_variants(world) -> None:
    rows = score_variants(
        world.problem(),
        [
            Variant("default", draws=2, replicates=2),
            Variant("exact", kind="exact", draws=4, precondition="identity", replicates=1),
            Variant("adam", kind="exact", draws=4, precondition="adam", replicates=1),
            Variant("per-clip", kind="exact", draws=4, reference_draws="per-clip", replicates=1),
        ],
    )
    default = rows["default"]["lds"]
    # the reported mean is the mean of the replicate means (every query scored), and the CI is ordered
    assert len(default["replicates"]) == 2 and default["mean"] == pytest.approx(
        np.mean(default["replicates"])
    )
    assert default["ci95"][0] <= default["ci95"][1] and np.isfinite(default["se_replicates"])
    assert rows["exact"]["draws"] == 4 and rows["adam"]["precondition"] == "adam"
    # the reference is the training loss of every parameter, whatever featurize's defaults are
    for name in ("exact", "adam", "per-clip"):
        assert rows[name] | {"output_fn": "loss", "parameters": "all", "projection": "none"} == rows[name]
    assert "CRN" in rows["exact"]["draw_rule"] and "per-clip" in rows["per-clip"]["draw_rule"]
    assert "output_fn" in rows["default"] and "reference_draws" not in rows["default"]
    lo, hi = default["ci95_subsets"]
    assert lo <= default["mean"] <= hi
    # the two parts of LDS (common factor, query-specific) are reported beside it
    assert -1 <= rows["default"]["common_factor_lds"] <= 1
    assert len(rows["default"]["query_specific_lds"]["replicates"]) == 2


def test_the_reference_never_follows_featurize_options(world) -> None:
    """An exact variant handed featurize's other fields still scores the training-loss gradient."""
    from carv_attrib.lds.study import variant_scores

    problem, cache = world.problem(), {}
    plain = Variant("e", kind="exact", draws=3, replicates=1)
    odd = Variant(
        "e", kind="exact", draws=3, replicates=1, output_fn="sqnorm", layers=("blocks.0.*",), timesteps="iid"
    )
    np.testing.assert_array_equal(
        variant_scores(problem, plain, 0, cache), variant_scores(problem, odd, 0, {})
    )
    with pytest.raises(ValueError, match="exact variants only"):
        Variant("bad", precondition="adam")
