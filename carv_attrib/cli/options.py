"""Typer options generated from the stage configs (`carv_attrib.config`), so that every option's
name, default and help text are written once, in the config.

    @stage_command(FeaturizeConfig, extra=[format_param()])
    def featurize(cfg: FeaturizeConfig, fmt: str) -> None: ...

builds a command whose signature has one Typer argument/option per config field (in field order,
positional fields as arguments), plus the `extra` CLI-only parameters; Typer calls it with keyword
arguments, from which the config is built and handed to the body together with the extras.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from carv_attrib.cli.common import check_format

# CLI-only parameters shared by several commands --------------------------------------------------
FORMAT_HELP = "human | json | jsonl (default: human on a terminal, else json)."


def format_param() -> inspect.Parameter:
    """`--format`: how the command prints its result; the same choices and default everywhere
    (checked by `carv_attrib.cli.common.check_format`)."""
    return inspect.Parameter(
        "fmt",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[str | None, typer.Option("--format", help=FORMAT_HELP, show_default=False)],
    )


_COMMON = [
    inspect.Parameter(
        "verbose_",
        inspect.Parameter.KEYWORD_ONLY,
        default=0,
        annotation=Annotated[
            int,
            typer.Option(
                "--verbose", "-v", count=True, show_default=False, help="More logs (-vv: debug, tracebacks)."
            ),
        ],
    ),
    inspect.Parameter(
        "quiet_",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool, typer.Option("--quiet", "-q", show_default=False, help="Only data and errors: no progress.")
        ],
    ),
]


def common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` also taking -v/--verbose and -q/--quiet after the subcommand name (they add to the
    ones given before it)."""
    from carv_attrib.cli.common import state

    sig = inspect.signature(command, eval_str=True)  # Typer reads the objects, not strings

    @functools.wraps(command)
    def wrapper(*args: Any, verbose_: int = 0, quiet_: bool = False, **kwargs: Any) -> Any:
        state.verbose += verbose_
        state.quiet = state.quiet or quiet_
        return command(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *_COMMON])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {}
    del wrapper.__wrapped__
    return wrapper


def param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """A CLI-only parameter for `stage_command(extra=...)`."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _cli_type(tp: Any) -> Any:
    """A field's type as Typer takes it: Path | str → Path, list[X] stays, X | None stays."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = Path if Path in args else args[0]
        return inner | None if type(None) in typing.get_args(tp) else inner
    return tp


def config_parameters(cls: type, skip: Sequence[str] = ()) -> list[inspect.Parameter]:
    """One `inspect.Parameter` (with an Annotated Typer Option/Argument) per CLI field of `cls`."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skip:
            continue
        tp = _cli_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = inspect.Parameter.empty
        if meta.get("positional"):
            info = typer.Argument(
                help=meta["help"], metavar=meta.get("metavar"), show_default=meta["show_default"]
            )
        else:
            flags = meta.get("flags") or ("--" + f.name.replace("_", "-"),)
            info = typer.Option(
                *flags, help=meta["help"], metavar=meta.get("metavar"), show_default=meta["show_default"]
            )
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[tp, info]
            )
        )
    return params


CONFIG_HELP = (
    "TOML file of options: [COMMAND] tables and top-level keys (e.g. model = ...); a typed flag wins "
    "over it, it wins over the options RUN/run.json recorded for this command."
)
RESUME_NOTE = " Required, except when resuming: the last one RUN/run.json records."
COMMANDS: set[str] = set()  # every stage command's name, for --config's table names


def _config_param() -> inspect.Parameter:
    return inspect.Parameter(
        "config_file",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None, typer.Option("--config", help=CONFIG_HELP, metavar="FILE", show_default=False)
        ],
    )


def _typed(names: set[str]) -> set[str]:
    """The parameters the user typed (not left at their defaults): all of them outside a command's
    context. Typer >= 0.2x runs on its own copy of click (`typer._click`), older ones on click."""
    try:
        from typer._click.core import ParameterSource
        from typer._click.globals import get_current_context
    except ImportError:  # a Typer that uses click itself
        from click import get_current_context
        from click.core import ParameterSource

    ctx = get_current_context(silent=True)
    if ctx is None:
        return set(names)
    return {n for n in names if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)}


def stage_command(
    cls: type,
    extra: Sequence[inspect.Parameter] = (),
    skip: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
    run_json: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate `body(cfg, **extras)` into a Typer command taking `cls`'s fields as options, plus
    `--config FILE`.

    skip: fields not exposed (the body's extras may set them); defaults: library defaults that the
    command overrides. Fields not typed take, in order, the --config file's value, then (for a
    config with a `run`) the value RUN/run.json recorded for this command, then the default
    (`carv_attrib.config.resume`); a required field other than the run may so be left out.
    run_json=False: a command that reads RUN but records nothing there (finetune) takes no options
    from RUN/run.json.
    """

    def decorate(body: Callable[..., Any]) -> Callable[..., Any]:
        from carv_attrib.config.resume import RESET_EACH_TIME

        name = body.__name__
        COMMANDS.add(name)
        fields = config_parameters(cls, skip)
        names = {p.name for p in fields}
        resumable = "run" in names and run_json
        # a required option the run records (the manifest, the model) may be left out when resuming
        required = {
            p.name
            for p in fields
            if p.default is inspect.Parameter.empty and p.name != "run" and p.name not in RESET_EACH_TIME
        }
        if resumable:
            fields = [p.replace(default=None) if p.name in required else p for p in fields]
            for p in fields:
                if p.name in required:
                    info = typing.get_args(p.annotation)[1]  # a fresh Option/ArgumentInfo per call
                    info.help = f"{info.help}{RESUME_NOTE}"
        # Positional (argument) fields first, in field order, then options: Typer keeps this order.
        ordered = sorted(fields, key=lambda p: not _is_argument(p)) + list(extra) + [_config_param()]
        if defaults:
            ordered = [p.replace(default=defaults[p.name]) if p.name in defaults else p for p in ordered]

        @functools.wraps(body)
        def command(**kwargs: Any) -> Any:
            config_file = kwargs.pop("config_file", None)
            cfg_kwargs = {k: v for k, v in kwargs.items() if k in names}
            for k, v in cfg_kwargs.items():
                if isinstance(v, tuple):
                    cfg_kwargs[k] = list(v)
            cfg_kwargs = _resolve(cls, name, cfg_kwargs, _typed(names), config_file, resumable, required)
            cfg = cls(**cfg_kwargs)
            if "fmt" in kwargs:  # the body's first check, kept first
                check_format(kwargs["fmt"])
            cfg.check_early()  # a usage error before the body imports torch/diffusers (seconds)
            return body(cfg, **{k: v for k, v in kwargs.items() if k not in names})

        command.__signature__ = inspect.Signature(ordered)  # type: ignore[attr-defined]
        command.__annotations__ = {}
        del command.__wrapped__  # Typer must read the generated signature, not the body's
        return command

    return decorate


def _resolve(
    cls: type,
    command: str,
    given: dict[str, Any],
    typed: set[str],
    config_file: Path | None,
    resumable: bool,
    required: set[str],
) -> dict[str, Any]:
    """The config kwargs after --config and RUN/run.json (`config.resume.merge_options`); says on
    stderr which options came from where; UsageError for a required option found nowhere."""
    from carv_attrib.cli.common import say
    from carv_attrib.config.resume import (
        file_options,
        merge_options,
        read_config_file,
        reset_fields,
        stored_options,
    )
    from carv_attrib.errors import UsageError

    doc = read_config_file(config_file) if config_file is not None else {}
    from_file = file_options(doc, command, cls, config_file, COMMANDS) if doc else {}
    run = given.get("run") if "run" in typed or "run" not in from_file else from_file["run"]
    stored = stored_options(run, command) if resumable else {}
    merged, source = merge_options(cls, given, typed, from_file, stored, reset_fields(command))
    missing = sorted(n for n in required if merged.get(n) is None)
    if missing:
        where = f"; {run}/run.json records no `{command}` to take them from" if resumable else ""
        raise UsageError(
            f"missing {', '.join(_flag(cls, n) for n in missing)}: give it on the command line or in "
            f"--config FILE{where}"
        )
    for origin in ("--config", "run.json"):
        taken = [n for n, s in source.items() if s == origin and merged[n] != given.get(n)]
        if taken:
            label = str(config_file) if origin == "--config" else f"{run}/run.json"
            shown = ", ".join(f"{_flag(cls, n)} {_show(merged[n])}" for n in sorted(taken))
            say(f"options from {label}: {shown}", style="dim")  # silenced by --quiet
    return merged


def _flag(cls: type, name: str) -> str:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.metadata.get("positional"):
        return name.upper()
    return (f.metadata.get("flags") or ("--" + name.replace("_", "-"),))[0]


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def _is_argument(p: inspect.Parameter) -> bool:
    return any(isinstance(a, typer.models.ArgumentInfo) for a in typing.get_args(p.annotation)[1:])
