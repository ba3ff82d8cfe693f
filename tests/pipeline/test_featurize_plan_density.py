"""featurize --plan and --density: without --density, p(σ) is the density the plan's proposal was
fitted for; an explicit --density that contradicts it is refused (exit 2, naming --density) before
any model is loaded, in the library and through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carv_attrib.carv.timesteps import Proposal, density
from carv_attrib.cli.app import app
from carv_attrib.config import DEFAULT_OUTPUT_FN, OUTPUT_FNS
from carv_attrib.errors import UsageError
from carv_attrib.pipeline.featurize import FeaturizeConfig, draw_rule, run_featurize
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import write_json_atomic

DENSITY = "logit-normal:0,1"


@pytest.fixture()
def run(encoded_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(encoded_run, dst)
    return dst


@pytest.fixture()
def plan(tmp_path: Path) -> tuple[Path, Proposal]:
    """A plan.json whose proposal q was fitted for p = logit-normal(0, 1), non-uniform over 4 bins."""
    q = Proposal.from_bins([0.0, 0.25, 0.5, 0.75, 1.0], [1.0, 3.0, 2.0, 0.5], DENSITY, 0.1, form="p-scaled")
    path = tmp_path / "plan.json"
    write_json_atomic(path, {"proposal": q.to_dict(), "output_fn": DEFAULT_OUTPUT_FN, "density": DENSITY})
    return path, q


def test_the_plan_density_is_the_canonical_spec() -> None:
    assert density(DENSITY).spec == DENSITY


def test_featurize_without_density_uses_the_plans(run: Path, plan, tiny_model_dir: Path) -> None:
    path, q = plan
    cfg = FeaturizeConfig(run=run, model=str(tiny_model_dir), plan=path, draws=2, device="cpu", batch_clips=4)
    assert cfg.density is None
    summary = run_featurize(cfg)
    assert summary.ok == 8 and summary.density == DENSITY
    draws = RunDir(run).features.read_config()["config"]["draws"]
    assert draws["density"] == DENSITY
    assert draws["proposal"] == q.fingerprint and draws["scheme"] == "stratified-is" and draws["draws"] == 2
    assert Proposal.from_dict(draws["proposal_data"]).fingerprint == q.fingerprint


def test_an_explicit_density_agreeing_with_the_plan_is_accepted(
    run: Path, plan, tiny_model_dir: Path
) -> None:
    path, q = plan
    for spec in (DENSITY, "logit-normal:0.0,1.0"):
        rule = draw_rule(
            FeaturizeConfig(run=run, model=str(tiny_model_dir), plan=path, density=spec, draws=2)
        )
        assert rule.density == DENSITY and rule.proposal is not None
        assert rule.proposal.fingerprint == q.fingerprint


def test_a_contradicting_density_is_refused(run: Path, plan, tiny_model_dir: Path) -> None:
    path, _ = plan
    cfg = FeaturizeConfig(
        run=run, model=str(tiny_model_dir), plan=path, density="uniform", draws=2, device="cpu"
    )
    with pytest.raises(UsageError) as exc:
        run_featurize(cfg)
    assert exc.value.exit_code == 2
    msg = str(exc.value)
    assert "--density" in msg and DENSITY in msg and "uniform" in msg
    assert RunDir(run).features.read_config() is None, "nothing was written"


def test_a_contradicting_density_exits_2_through_the_cli(run: Path, plan, tiny_model_dir: Path) -> None:
    path, _ = plan
    args = ["featurize", run, "-m", tiny_model_dir, "--plan", path, "--density", "uniform"]
    r = CliRunner().invoke(app, [str(a) for a in args] + ["--device", "cpu", "-K", "2"])
    assert r.exit_code == 2, r.output
    assert "--density" in r.output
    assert not (run / "features").exists() and not (run / "index").exists()


def test_a_plan_for_another_output_fn_is_refused(run: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    q = Proposal.from_bins([0.0, 0.5, 1.0], [1.0, 2.0], DENSITY, 0.1, form="p-scaled")
    path = tmp_path / "sq.json"
    other = next(fn for fn in OUTPUT_FNS if fn != DEFAULT_OUTPUT_FN)
    path.write_text(json.dumps({"proposal": q.to_dict(), "output_fn": other}))
    with pytest.raises(UsageError, match=rf"--output-fn {DEFAULT_OUTPUT_FN}"):
        draw_rule(FeaturizeConfig(run=run, model=str(tiny_model_dir), plan=path, draws=2))
