"""The shared pieces of the stage configs: `option()` (a dataclass field carrying its CLI metadata),
one builder per option several commands share, so a flag means the same thing in every command, and
`StageConfig`, the mixin every config derives from."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from carv_attrib.choices import DTYPES, EXECUTORS, OUTPUT_FNS, SCHEMES

# Choices the CLI accepts: the extension axes' names live in `carv_attrib.choices`, defined once for
# the configs and the library modules that implement them (and importable from here as before).
DEFAULT_LAYERS = ("blocks.*",)
DEFAULT_KRON_DIMS = "16x16"  # = attrib.projection.DEFAULT_K_OUT x DEFAULT_K_IN
# The training loss: the objective whose influence LDS measures, and the fixed reference's output. The
# world suite of bench/factors.py (README, Benchmarks) finds sqnorm (D-TRAK) no better on any world and
# worse where the reference has signal; held-out worlds found the same.
DEFAULT_OUTPUT_FN = "loss"
# Grad-dot (α = 0) tracks the fixed reference where it has signal and fails where a few huge-norm clips
# dominate; cosine (α = 1) is the reverse. α = 0.5 was the only preconditioner at or above the reference
# on every world of bench/factors.py (README, Benchmarks): the default by its worst world.
DEFAULT_PRECONDITION = "normalize"


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flags: tuple[str, ...] | None = None,
    metavar: str | None = None,
    positional: bool = False,
    cli: bool = True,
    default_factory: Any = dataclasses.MISSING,
    show_default: bool | str = True,
) -> Any:
    """A dataclass field with what the CLI needs to expose it (see `carv_attrib.cli.options`).

    flags: the option's names (default `--field-name`); positional: a Typer argument instead;
    cli=False: library-only (not an option).
    """
    meta = {
        "help": help,
        "flags": flags,
        "metavar": metavar,
        "positional": positional,
        "cli": cli,
        "show_default": show_default,
    }
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def choice_help(choices: tuple[str, ...], notes: dict[str, str] | None = None) -> str:
    """'a | b (note) | c': the choices in their order, each followed by its note (if any)."""
    notes = notes or {}
    assert set(notes) <= set(choices), sorted(set(notes) - set(choices))
    return " | ".join(name + notes.get(name, "") for name in choices)


# -- shared options: one definition each ---------------------------------------------------------
def model_option(default: Any = dataclasses.MISSING, help: str | None = None) -> Any:
    return option(
        default,
        flags=("--model", "-m"),
        help=help
        or "Wan2.1 diffusers directory or Hugging Face Hub id (the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers).",
    )


def density_option(default: str | None = "uniform", help: str | None = None) -> Any:
    return option(
        default,
        help=help or "p(σ), the model's training timestep density: uniform | logit-normal:m,s | shift:k.",
    )


def output_fn_option() -> Any:
    return option(
        DEFAULT_OUTPUT_FN,
        help="Output whose gradient is attributed: "
        + choice_help(
            OUTPUT_FNS,
            {"loss": " = mean((v − (ε − z))²), the training objective", "sqnorm": " = mean(v²) (D-TRAK)"},
        )
        + ".",
    )


def draws_option(default: int = 8, help: str = "(σ, ε) draws per cached encode.") -> Any:
    return option(default, flags=("--draws", "-K"), help=help)


def device_option(default: str = "auto") -> Any:
    return option(default, help="auto | cpu | cuda | cuda:N | mps (auto: cuda, then mps, then cpu).")


def dtype_option(default: str | None = "float32", help: str | None = None) -> Any:
    return option(default, help=help or f"Model compute dtype: {choice_help(DTYPES)}.")


def seed_option() -> Any:
    return option(0, help="The one seed every random quantity derives from.")


def dry_run_option() -> Any:
    return option(
        False,
        flags=("--dry-run",),
        help="Print what would be done (new / changed / unchanged clips, estimated time) and write nothing.",
    )


def shard_option() -> Any:
    return option(
        None,
        metavar="I/N",
        help="Do part I of N (the clips whose id is I mod N) for workers you schedule (SLURM arrays); "
        "a run without --shard afterwards commits the parts (encode) or builds the index (featurize).",
    )


def executor_option() -> Any:
    return option(
        "local",
        help=f"{choice_help(EXECUTORS)}: N parts as Ray tasks (pip install 'carv-attrib[ray]'), a GPU each when the "
        "cluster has them; a task whose worker dies is retried and redoes only its unfinished shard.",
    )


def ray_address_option() -> Any:
    return option(
        None,
        help="With --executor ray: auto (a running cluster) | local (start one here) | HOST:PORT "
        "(default: $RAY_ADDRESS, else local).",
    )


def parts_option() -> Any:
    return option(
        None, help="With --executor ray: number of parts (default: the cluster's GPUs, else its nodes)."
    )


def overwrite_option() -> Any:
    return option(False, flags=("--overwrite",), help="Discard a stage made with another configuration.")


def wait_option() -> Any:
    return option(
        False,
        flags=("--wait",),
        help="When another command is writing the run (RUN/.lock), wait for it instead of exiting 2.",
    )


def lock_held_option() -> Any:
    return option(
        False,
        cli=False,
        help="Library: the caller already holds RUN's writer lock for this call (a Ray part runs "
        "under its driver's), so the stage takes none.",
    )


def batch_clips_option(default: int = 4) -> Any:
    return option(default, flags=("--batch-clips", "-B"), help="Clips per forward+backward.")


def timesteps_option() -> Any:
    return option("stratified-is", help=f"{choice_help(SCHEMES)}.")


def run_argument(help: str) -> Any:
    """RUN, the positional run directory of a stage that reads one (help: what it must hold)."""
    return option(positional=True, help=help)


class StageConfig:
    """Mixin: `validate()` returns self so configs can be built and checked in one expression."""

    def validate(self) -> Any:
        """Each config overrides it to refuse bad values with a UsageError naming the flag; returns self."""
        return self

    def check_early(self) -> Any:
        """What the CLI checks as soon as the options are parsed, before a command imports its pipeline
        (torch, diffusers: seconds), so a usage error is said at once; `validate` unless a config
        completes itself later (`ScoreConfig`). Returns self."""
        return self.validate()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
