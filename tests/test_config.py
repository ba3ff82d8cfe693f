"""config.py: the CLI's choice tuples agree with the library's own, each stage config's `validate()`
refuses bad values with a UsageError naming the flag, the derived objects (FramePolicy,
ManifestOptions, kron shape) come from the flat fields, the parsers, and the module stays torch-free."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from carv_attrib import config as C
from carv_attrib.config import (
    DemoConfig,
    EncodeConfig,
    FeaturizeConfig,
    IndexConfig,
    PlanConfig,
    ScoreConfig,
    parse_kron_dims,
    parse_size,
    parse_top_k,
)
from carv_attrib.errors import UsageError
from carv_attrib.store.manifest import ManifestOptions
from carv_attrib.video.decode import FramePolicy

REPO = Path(__file__).resolve().parents[1]


# -- choices ---------------------------------------------------------------------------------------
def _library_choices() -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    from carv_attrib.attrib import projection
    from carv_attrib.carv import draws, objective, timesteps
    from carv_attrib.models import wan
    from carv_attrib.search import precondition

    return [
        ("OUTPUT_FNS", C.OUTPUT_FNS, objective.OUTPUT_FNS),
        ("SCHEMES", C.SCHEMES, timesteps.SCHEMES),
        ("NOISE_MODES", C.NOISE_MODES, draws.NOISE_MODES),
        ("MATRIX_KINDS", C.MATRIX_KINDS, projection.MATRIX_KINDS),
        ("PRECONDITIONERS", C.PRECONDITIONERS, precondition.PRECONDITIONERS),
        ("DTYPES", C.DTYPES, wan.DTYPES),
    ]


def test_cli_choices_equal_the_library_choices() -> None:
    for name, ours, theirs in _library_choices():
        assert tuple(ours) == tuple(theirs), name


def test_every_choice_tuple_is_defined_once_in_choices() -> None:
    """config and the library hold the very tuples of carv_attrib.choices, and each registry's keys
    are its axis' names, so a name added in one place cannot be missing in another."""
    from carv_attrib import choices
    from carv_attrib.attrib import featurizer, projection
    from carv_attrib.carv import draws, objective, timesteps
    from carv_attrib.models import wan
    from carv_attrib.search import precondition

    for name, *holders in [
        ("OUTPUT_FNS", C, objective),
        ("OBJECTIVES", C, featurizer),
        ("SCHEMES", C, timesteps, draws),
        ("NOISE_MODES", C, draws),
        ("PROJECTORS", C, projection, featurizer),
        ("MATRIX_KINDS", C, projection),
        ("PRECONDITIONERS", C, precondition),
        ("DTYPES", C, wan),
    ]:
        assert all(getattr(h, name) is getattr(choices, name) for h in holders), name
    assert tuple(objective.RESIDUALS) == choices.OUTPUT_FNS
    assert tuple(projection.PROJECTOR_CLASSES) == choices.PROJECTORS


def test_cli_default_layers_and_kron_dims_equal_the_projector_defaults() -> None:
    from carv_attrib.attrib import projection

    assert C.DEFAULT_LAYERS == projection.DEFAULT_PATTERNS
    assert parse_kron_dims(C.DEFAULT_KRON_DIMS) == (projection.DEFAULT_K_OUT, projection.DEFAULT_K_IN)


# -- validate() ------------------------------------------------------------------------------------
def _encode(**kw: Any) -> EncodeConfig:
    return EncodeConfig(manifest=Path("m.json"), model="models/m", run=Path("runs/r"), **kw)


def _featurize(**kw: Any) -> FeaturizeConfig:
    return FeaturizeConfig(run=Path("runs/r"), model="models/m", **kw)


def _index(**kw: Any) -> IndexConfig:
    return IndexConfig(run=Path("runs/r"), **kw)


def _score(**kw: Any) -> ScoreConfig:
    kw.setdefault("queries", [Path("q.mp4")])
    return ScoreConfig(run=Path("runs/r"), **kw)


def _plan(**kw: Any) -> PlanConfig:
    return PlanConfig(run=Path("runs/r"), model="models/m", **kw)


def _demo(**kw: Any) -> DemoConfig:
    return DemoConfig(**kw)


BUILDERS = {
    "encode": (_encode, EncodeConfig),
    "featurize": (_featurize, FeaturizeConfig),
    "index": (_index, IndexConfig),
    "score": (_score, ScoreConfig),
    "plan": (_plan, PlanConfig),
    "demo": (_demo, DemoConfig),
}

# (stage, field, bad value, flag the message must name)
BAD_VALUES = [
    ("encode", "frames", 16, "--frames"),
    ("encode", "frames", 0, "--frames"),
    ("encode", "size", "65x64", "--size"),
    ("encode", "size", "64x0", "--size"),
    ("encode", "size", "big", "--size"),
    ("encode", "fps", -1.0, "--fps"),
    ("encode", "latent_dtype", "bfloat16", "--latent-dtype"),
    ("encode", "dtype", "float64", "--dtype"),
    ("encode", "shard_size", 0, "--shard-size"),
    ("encode", "batch_size", 0, "--batch-size"),
    ("encode", "workers", -1, "--workers"),
    ("encode", "decode_timeout", -1.0, "--decode-timeout"),
    ("encode", "max_failure_rate", 1.5, "--max-failure-rate"),
    ("encode", "max_failure_rate", -0.1, "--max-failure-rate"),
    ("index", "precondition", "pca", "--precondition"),
    ("index", "lambda_rel", 0.0, "--lambda"),
    ("index", "lambda_rel", -1.0, "--lambda"),
    ("featurize", "timesteps", "sobol", "--timesteps"),
    ("featurize", "output_fn", "l1", "--output-fn"),
    ("featurize", "projector", "pca", "--projector"),
    ("featurize", "matrix", "sparse", "--matrix"),
    ("featurize", "noise", "none", "--noise"),
    ("featurize", "dtype", "float64", "--dtype"),
    ("featurize", "draws", 0, "--draws"),
    ("featurize", "batch_clips", 0, "--batch-clips"),
    ("featurize", "proj_dim", 0, "--proj-dim"),
    ("featurize", "kron_dims", "8", "--kron-dims"),
    ("featurize", "kron_dims", "0x8", "--kron-dims"),
    ("featurize", "kron_dims", "8xO", "--kron-dims"),
    ("featurize", "layers", [], "--layers"),
    ("score", "aggregate", "max", "--aggregate"),
    ("score", "top_k", 0, "--top-k"),
    ("score", "dtype", "int8", "--dtype"),
    ("score", "workers", -1, "--workers"),
    ("score", "batch_clips", 0, "--batch-clips"),
    ("plan", "output_fn", "l1", "--output-fn"),
    ("plan", "dtype", "float64", "--dtype"),
    ("plan", "pilot_clips", 1, "--pilot-clips"),
    ("plan", "replicates", 1, "--replicates"),
    ("plan", "bins", 0, "--bins"),
    ("plan", "draws", 0, "--draws"),
    ("plan", "draws_per_bin", 0, "--draws-per-bin"),
    ("plan", "mix", 0.0, "--mix"),
    ("plan", "mix", 1.5, "--mix"),
    ("plan", "k_max", 0, "--k-max"),
    ("demo", "clips", 1, "--clips"),
    ("demo", "timesteps", "sobol", "--timesteps"),
    ("demo", "precondition", "pca", "--precondition"),
    ("demo", "top_k", 0, "--top-k"),
    ("demo", "size", "big", "--size"),
]


def _flags(cls: type, name: str) -> tuple[str, ...]:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("flags") or ("--" + name.replace("_", "-"),)


@pytest.mark.parametrize("stage", sorted(BUILDERS))
def test_defaults_validate_and_validate_returns_self(stage: str) -> None:
    build, _ = BUILDERS[stage]
    cfg = build()
    assert cfg.validate() is cfg


@pytest.mark.parametrize(
    ("stage", "name", "value", "flag"),
    BAD_VALUES,
    ids=[f"{s}-{n}={v!r}" for s, n, v, _ in BAD_VALUES],
)
def test_validate_refuses_a_bad_value_naming_its_flag(stage: str, name: str, value: Any, flag: str) -> None:
    build, cls = BUILDERS[stage]
    # The flag in the message is the one the command actually takes for this field.
    assert flag in _flags(cls, name), (flag, _flags(cls, name))
    cfg = build(**{name: value})
    with pytest.raises(UsageError) as exc:
        cfg.validate()
    assert flag in str(exc.value)
    assert exc.value.exit_code == 2


def test_score_needs_a_query() -> None:
    with pytest.raises(UsageError, match="at least one query"):
        _score(queries=[]).validate()


def test_featurize_proj_dim_with_kron_dims_is_refused() -> None:
    with pytest.raises(UsageError, match=r"--proj-dim.*--kron-dims"):
        _featurize(proj_dim=256, kron_dims="4x4").validate()
    # Each alone is fine.
    _featurize(proj_dim=256).validate()
    _featurize(kron_dims="4x4").validate()


def test_featurize_kron_dims_with_dense_is_refused() -> None:
    with pytest.raises(UsageError, match=r"--kron-dims.*--projector kron"):
        _featurize(projector="dense", kron_dims="4x4").validate()
    _featurize(projector="dense", proj_dim=256).validate()


@pytest.mark.parametrize("scheme", ["iid", "stratified"])
def test_featurize_plan_needs_stratified_is(scheme: str) -> None:
    with pytest.raises(UsageError, match=rf"--plan .*--timesteps stratified-is, not {scheme}"):
        _featurize(plan=Path("plan.json"), timesteps=scheme).validate()
    _featurize(plan=Path("plan.json"), timesteps="stratified-is").validate()


def test_featurize_kron_shape() -> None:
    assert _featurize().kron_shape is None
    assert _featurize(kron_dims="16x8").kron_shape == (16, 8)


def test_score_dtype_none_means_the_recorded_one() -> None:
    assert _score(dtype=None).validate().dtype is None
    assert _score(top_k=None).validate().top_k is None  # every training clip


# -- derived objects -----------------------------------------------------------------------------
def test_encode_policy_from_the_flat_fields() -> None:
    cfg = _encode(frames=9, size="48x32", fps=4.0, pad_short=True)
    assert cfg.policy == FramePolicy(frames=9, height=32, width=48, fps=4.0, pad_short=True)
    d = _encode()
    assert d.policy == FramePolicy(frames=17, height=64, width=64, fps=8.0, pad_short=False)


def test_encode_manifest_options_from_the_flat_fields() -> None:
    cfg = _encode(
        id_column="id",
        caption_column="text",
        path_column="file",
        manifest_format="csv",
        allow_absolute_paths=True,
    )
    assert cfg.manifest_options == ManifestOptions(
        id_column="id", caption_column="text", path_column="file", fmt="csv", allow_absolute_paths=True
    )
    assert _encode().manifest_options == ManifestOptions()


def test_demo_width_and_height() -> None:
    cfg = _demo(size="96x80")
    assert (cfg.width, cfg.height) == (96, 80)


def test_to_dict_has_every_field() -> None:
    cfg = _featurize(draws=3)
    d = cfg.to_dict()
    assert list(d) == [f.name for f in dataclasses.fields(FeaturizeConfig)]
    assert d["draws"] == 3 and d["layers"] == list(C.DEFAULT_LAYERS)


def test_list_defaults_are_not_shared_between_instances() -> None:
    a, b = _featurize(), _featurize()
    a.layers.append("head.*")
    a.checkpoints.append("ck")
    assert b.layers == list(C.DEFAULT_LAYERS) and b.checkpoints == []


# -- parsers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"), [("832x480", (832, 480)), ("64X32", (64, 32)), ("1x1", (1, 1))]
)
def test_parse_size(text: str, expected: tuple[int, int]) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["64", "64x", "x64", "axb", "1x2x3", "64.0x64", ""])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="--size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "expected"), [(None, None), ("16x8", (16, 8)), ("1X1", (1, 1))])
def test_parse_kron_dims(text: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_kron_dims(text) == expected


@pytest.mark.parametrize("text", ["8", "0x8", "8x0", "-1x8", "ax8", "8x8x8", ""])
def test_parse_kron_dims_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="--kron-dims"):
        parse_kron_dims(text)


@pytest.mark.parametrize(("text", "expected"), [("10", 10), ("1", 1), ("all", None), ("ALL", None)])
def test_parse_top_k(text: str, expected: int | None) -> None:
    assert parse_top_k(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "ten", "", "1.5"])
def test_parse_top_k_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="--top-k"):
        parse_top_k(text)


# -- torch-free ------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["carv_attrib.config", "carv_attrib.cli.app"])
def test_import_does_not_import_torch(module: str) -> None:
    code = f"import {module}, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_vote_needs_a_number_of_hits_per_query() -> None:
    from carv_attrib.config import ScoreConfig

    with pytest.raises(UsageError, match="--aggregate vote counts each query's top k"):
        ScoreConfig(queries=[Path("q.mp4")], run=Path("r"), aggregate="vote", top_k=None).validate()
    ScoreConfig(queries=[Path("q.mp4")], run=Path("r"), aggregate="vote", top_k=5).validate()


def test_explain_needs_a_number_of_results() -> None:
    """--explain recomputes each result clip's per-stratum gradients: with --top-k all that is a
    re-featurize of the whole run, refused before any work."""
    from carv_attrib.config import ScoreConfig

    with pytest.raises(UsageError, match="--explain .* give --top-k N"):
        ScoreConfig(queries=[Path("q.mp4")], run=Path("r"), explain=True, top_k=None).validate()
    with pytest.raises(UsageError, match="--objective"):
        ScoreConfig(queries=[Path("q.mp4")], run=Path("r"), objective="motions").validate()
    ScoreConfig(queries=[Path("q.mp4")], run=Path("r"), explain=True, top_k=3, objective="motion").validate()
