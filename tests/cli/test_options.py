"""cli/options.py: the Typer commands generated from the stage configs carry each field's default and
help text unchanged (one definition), shared options have the same flags everywhere, and
`stage_command` builds a config from the command line (on a throwaway config class)."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.cli.options import RESUME_NOTE, config_parameters, format_param, param, stage_command
from carv_attrib.config import (
    DemoConfig,
    EncodeConfig,
    FeaturizeConfig,
    IndexConfig,
    PlanConfig,
    ScoreConfig,
    StageConfig,
    option,
    seed_option,
)
from carv_attrib.config.resume import RESET_EACH_TIME

runner = CliRunner()


# Duck-typed (typer >= 0.20 vendors click, so isinstance against `click` would fail): see test_docs.
def _is_option(p: Any) -> bool:
    return getattr(p, "param_type_name", None) == "option"


def _commands() -> dict[str, Any]:
    group = typer.main.get_command(app)
    return dict(group.commands)


def _params(cmd: Any) -> dict[str, Any]:
    return {p.name: p for p in cmd.params}


# command -> the config classes whose CLI fields it exposes (featurize also takes index's options,
# not index's RUN argument; demo leaves `workers` to the library).
STAGES: dict[str, list[tuple[type, tuple[str, ...]]]] = {
    "encode": [(EncodeConfig, ())],
    # featurize's own --wait covers its index build: IndexConfig's is `index`'s only
    # and its --executor / --ray-address / --parts are its gradients' (its index is built locally)
    "featurize": [
        (FeaturizeConfig, ()),
        (IndexConfig, ("run", "wait", "executor", "ray_address", "parts")),
    ],
    "index": [(IndexConfig, ())],
    "score": [(ScoreConfig, ())],
    "plan": [(PlanConfig, ())],
    "demo": [(DemoConfig, ("workers",))],
}

SHARED = {
    "model": "--model",
    "device": "--device",
    "dtype": "--dtype",
    "seed": "--seed",
    "draws": "--draws",
    "density": "--density",
    "output_fn": "--output-fn",
}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def test_the_app_has_the_stage_commands() -> None:
    assert set(STAGES) <= set(_commands())


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_and_argument_has_help(name: str) -> None:
    cmd = _commands()[name]
    assert (cmd.help or "").strip(), f"{name} has no help"
    for p in cmd.params:
        assert (getattr(p, "help", None) or "").strip(), f"{name}: {p.name} ({p.opts}) has no help text"


def test_the_global_options_have_help() -> None:
    group = typer.main.get_command(app)
    for p in group.params:
        if _is_option(p) and "--help" not in p.opts:
            assert (p.help or "").strip(), p.opts


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_command_params_are_the_config_fields(name: str) -> None:
    """Default and help of every generated parameter are the dataclass field's, and every CLI field
    of the config is exposed (nothing dropped, nothing invented)."""
    params = _params(_commands()[name])
    expected_names = set()
    for cls, skip in STAGES[name]:
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True) or f.name in skip:
                continue  # library-only or left to another command (score's --top-k is its own text option)
            expected_names.add(f.name)
            assert f.name in params, f"{name} lacks {f.name}"
            p = params[f.name]
            default = _field_default(f)
            if (
                default is dataclasses.MISSING
                and f.name != "run"
                and f.name not in RESET_EACH_TIME
                and "run" in {g.name for g in dataclasses.fields(cls)}
            ):
                # required, but a resume takes it from RUN/run.json (`config.resume`): optional on the CLI
                assert p.help == f.metadata["help"] + RESUME_NOTE, (name, f.name)
                default = None
            else:
                assert p.help == f.metadata["help"], (name, f.name)
            if name == "featurize" and cls is IndexConfig:
                default = None  # not given, a rebuild keeps the current index's choice (index_config_keeping)
            if default is dataclasses.MISSING:
                assert p.required, (name, f.name)
            else:
                assert not p.required, (name, f.name)
                assert p.default == default, (name, f.name, p.default, default)
            if f.metadata.get("positional"):
                assert not _is_option(p), (name, f.name)
            else:
                assert _is_option(p), (name, f.name)
                flags = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
                assert set(p.opts) | set(p.secondary_opts) == set(flags), (name, f.name, p.opts)
            if isinstance(default, bool) and not f.metadata.get("positional"):
                assert p.is_flag, (name, f.name)
            if typing.get_origin(typing.get_type_hints(cls)[f.name]) is list and not f.metadata.get(
                "positional"
            ):
                assert p.multiple, (name, f.name)
    # The rest are the CLI-only extras (--format, score's --top-k / --out) and -v/-q, which every
    # command takes after its name (`cli.options.common_options`).
    extras = set(params) - expected_names
    assert extras <= {"fmt", "top_k", "out", "verbose_", "quiet_", "config_file"}, (name, extras)


def test_library_only_fields_are_not_options() -> None:
    top_k = {f.name: f for f in dataclasses.fields(ScoreConfig)}["top_k"]
    assert top_k.metadata["cli"] is False
    # score takes --top-k as text ('all' or N) and parses it itself; the field's own help is not used.
    p = _params(_commands()["score"])["top_k"]
    assert p.default == "10" and p.help != top_k.metadata["help"]
    assert "workers" not in _params(_commands()["demo"])


@pytest.mark.parametrize("field_name", sorted(SHARED))
def test_shared_options_have_the_same_flags_everywhere(field_name: str) -> None:
    long_flag = SHARED[field_name]
    seen: dict[str, frozenset[str]] = {}
    for name, cmd in _commands().items():
        for p in cmd.params:
            if not _is_option(p):
                continue
            names = set(p.opts) | set(p.secondary_opts)
            if p.name == field_name or long_flag in names:
                seen[name] = frozenset(names)
    assert len(seen) >= 2, f"{long_flag} is shared by {sorted(seen)} only"
    assert len(set(seen.values())) == 1, {k: sorted(v) for k, v in seen.items()}


def test_draws_and_model_short_flags() -> None:
    cmds = _commands()
    for name in ("featurize", "plan", "demo"):
        assert set(_params(cmds[name])["draws"].opts) == {"--draws", "-K"}, name
    for name in ("encode", "featurize", "plan", "score"):
        assert set(_params(cmds[name])["model"].opts) == {"--model", "-m"}, name


def test_shared_option_help_is_one_definition_where_not_overridden() -> None:
    """--device / --seed / --output-fn carry one help text in every stage command."""
    cmds = _commands()
    for field_name in ("seed", "output_fn"):
        helps = {_params(c)[field_name].help for c in cmds.values() if field_name in _params(c)}
        assert len(helps) == 1, (field_name, helps)
    helps = {
        _params(cmds[n])["device"].help for n in ("encode", "featurize", "score", "plan")
    }  # demo's device defaults to cpu and says so
    assert len(helps) == 1, helps


# -- stage_command on a throwaway config -----------------------------------------------------------
@dataclass(kw_only=True)
class ToyConfig(StageConfig):
    """A config with one field of each kind the generator handles."""

    src: Path = option(positional=True, help="Input file.")
    tags: list[str] = option(
        flags=("--tag", "-t"), default_factory=list, help="A tag (repeatable).", show_default=False
    )
    globs: list[str] = option(default_factory=lambda: ["a*"], help="Globs (repeatable).")
    loud: bool = option(False, flags=("--loud",), help="Shout.")
    name: str | None = option(None, help="A name.")
    out: Path | None = option(None, flags=("--out", "-o"), help="Where to write.")
    ratio: float = option(0.5, help="A ratio.")
    seed: int = seed_option()
    secret: int = option(3, cli=False, help="Library only.")


def _toy_app(seen: list[tuple[ToyConfig, dict[str, Any]]], **kw: Any) -> typer.Typer:
    toy_app = typer.Typer()

    @toy_app.command("toy")
    @stage_command(ToyConfig, **kw)
    def toy(cfg: ToyConfig, **extras: Any) -> None:
        """Toy command."""
        seen.append((cfg, extras))

    @toy_app.command("other")  # a second command, so that "toy" is a subcommand as in the real app
    def other() -> None:
        """Nothing."""

    return toy_app


def test_stage_command_builds_the_config_from_cli_args() -> None:
    seen: list[tuple[ToyConfig, dict[str, Any]]] = []
    toy_app = _toy_app(seen, extra=[format_param()])
    r = runner.invoke(
        toy_app,
        ["toy", "in.mp4", "--tag", "a", "-t", "b", "--globs", "x*", "--globs", "y*", "--loud"]
        + ["--name", "n", "-o", "o.json", "--ratio", "0.25", "--seed", "7", "--format", "json"],
    )
    assert r.exit_code == 0, r.output
    ((cfg, extras),) = seen
    assert cfg == ToyConfig(
        src=Path("in.mp4"),
        tags=["a", "b"],
        globs=["x*", "y*"],
        loud=True,
        name="n",
        out=Path("o.json"),
        ratio=0.25,
        seed=7,
    )
    assert isinstance(cfg.tags, list) and isinstance(cfg.src, Path)
    assert extras == {"fmt": "json"}


def test_stage_command_defaults_are_the_config_defaults() -> None:
    seen: list[tuple[ToyConfig, dict[str, Any]]] = []
    r = runner.invoke(_toy_app(seen), ["toy", "in.mp4"])
    assert r.exit_code == 0, r.output
    ((cfg, extras),) = seen
    assert cfg == ToyConfig(src=Path("in.mp4"))
    assert cfg.tags == [] and cfg.globs == ["a*"] and cfg.loud is False and cfg.secret == 3
    assert extras == {}


def test_stage_command_skip_and_defaults() -> None:
    seen: list[tuple[ToyConfig, dict[str, Any]]] = []
    toy_app = _toy_app(seen, skip=("ratio",), defaults={"seed": 5})
    r = runner.invoke(toy_app, ["toy", "in.mp4"])
    assert r.exit_code == 0, r.output
    assert seen[-1][0].seed == 5 and seen[-1][0].ratio == 0.5
    r = runner.invoke(toy_app, ["toy", "in.mp4", "--ratio", "0.1"])
    assert r.exit_code == 2 and "--ratio" in r.output


def test_stage_command_extra_params() -> None:
    seen: list[tuple[ToyConfig, dict[str, Any]]] = []
    limit = param("limit", typing.Annotated[int, typer.Option("--limit", help="A limit.")], 4)
    r = runner.invoke(_toy_app(seen, extra=[limit]), ["toy", "in.mp4", "--limit", "9"])
    assert r.exit_code == 0, r.output
    assert seen[-1][1] == {"limit": 9}


def test_stage_command_help_shows_the_field_help() -> None:
    seen: list[tuple[ToyConfig, dict[str, Any]]] = []
    cmd = typer.main.get_command(_toy_app(seen)).commands["toy"]
    params = _params(cmd)
    assert [p.name for p in cmd.params][0] == "src"  # arguments first
    for f in dataclasses.fields(ToyConfig):
        if f.metadata["cli"]:
            assert params[f.name].help == f.metadata["help"]
    assert "secret" not in params
    r = runner.invoke(_toy_app(seen), ["toy", "--help"])
    assert r.exit_code == 0 and "--tag" in r.output and "Shout." in r.output


def test_stage_command_refuses_a_missing_argument() -> None:
    seen: list[tuple[ToyConfig, dict[str, Any]]] = []
    r = runner.invoke(_toy_app(seen), ["toy"])
    assert r.exit_code == 2 and not seen


def test_config_parameters_types() -> None:
    """Path | str fields become Path; optional fields stay optional; list fields stay lists."""
    ps = {p.name: p for p in config_parameters(ToyConfig)}
    assert "secret" not in ps
    assert typing.get_args(ps["src"].annotation)[0] is Path
    assert typing.get_args(ps["out"].annotation)[0] == (Path | None)
    assert typing.get_args(ps["tags"].annotation)[0] == list[str]
    assert ps["src"].default is inspect.Parameter.empty
    assert ps["globs"].default == ["a*"]
