"""`plan`'s config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carv_attrib.choices import DTYPES, OBJECTIVES, OUTPUT_FNS
from carv_attrib.config.checks import check_choice, check_min
from carv_attrib.config.options import (
    DEFAULT_KRON_DIMS,
    DEFAULT_LAYERS,
    StageConfig,
    batch_clips_option,
    choice_help,
    density_option,
    device_option,
    draws_option,
    dtype_option,
    model_option,
    option,
    output_fn_option,
    run_argument,
    seed_option,
)
from carv_attrib.errors import UsageError


@dataclass(kw_only=True)
class PlanConfig(StageConfig):
    """`plan`: pilot costs, per-σ-bin gradient moments, the fitted proposal q(σ), ECM per scheme."""

    run: Path = run_argument("Run directory with a latent cache.")
    model: str = model_option(help="Wan2.1 diffusers directory or Hub id (the one that encoded RUN).")
    out: Path = option(
        Path("plan.json"), flags=("--out", "-o"), help="plan.json to write (for featurize --plan)."
    )
    plot: Path | None = option(
        None, help="PNG: q(σ) beside p(σ) and the per-bin gradient norm; variance×cost against K."
    )
    pilot_clips: int = option(8, help="Cached clips in the pilot.")
    rank_clips: int = option(
        32,
        help="Cached clips ranked against each other under two estimator seeds: the recommended K is the "
        "fewest draws at which the rankings agree.",
    )
    bins: int = option(10, help="σ bins of the proposal.")
    draws_per_bin: int = option(2, help="Per-draw gradients measured per σ bin and pilot clip.")
    draws: int = draws_option(help="K at which each scheme's within-encode variance is measured.")
    replicates: int = option(
        4,
        help="Independent seeds per scheme for the variance (they pick the scheme; bench/plan_pilot.py: 4 "
        "gave the same recommendations as 6 on its worlds).",
    )
    mix: float = option(0.1, help="α in q = (1−α) q* + α p (so w = p/q ≤ 1/α).")
    density: str = density_option()
    output_fn: str = output_fn_option()
    objective: str = option(
        "uniform",
        help=f"{choice_help(OBJECTIVES)}: fit the plan for the objective you will featurize with (motion needs "
        "`encode --motion-masks`); `featurize --plan` refuses a plan fitted for another.",
    )
    k_max: int = option(64, help="Largest K to consider.")
    batch_clips: int = batch_clips_option()
    proj_dim: int | None = option(None, help=f"Pilot feature dim (default: {DEFAULT_KRON_DIMS} per layer).")
    layers: list[str] = option(
        default_factory=lambda: list(DEFAULT_LAYERS), help="Glob on Linear module names (repeatable)."
    )
    lora: Path | None = option(
        None,
        metavar="DIR",
        help="A LoRA adapter trained on MODEL: pilot the adapter's A/B gradients, as `featurize --lora` "
        "computes them (the proposal and K then fit that feature); replaces --layers.",
    )
    seed: int = seed_option()
    device: str = device_option()
    dtype: str = dtype_option()
    dry_run: bool = option(
        False,
        flags=("--dry-run",),
        help="Time one batch, print the pilot's size and estimated time, then stop (nothing written).",
    )

    def validate(self) -> PlanConfig:
        """The choices, the pilot's minimum sizes, --mix in (0, 1] and --k-max >= 1; returns self."""
        check_choice("--objective", self.objective, OBJECTIVES)
        check_choice("--output-fn", self.output_fn, OUTPUT_FNS)
        check_choice("--dtype", self.dtype, DTYPES)
        if self.lora is not None and list(self.layers) != list(DEFAULT_LAYERS):
            raise UsageError("--lora pilots the adapter's A and B layers: give --lora or --layers, not both")
        if (
            self.pilot_clips < 2
            or self.rank_clips < 3
            or self.replicates < 2
            or self.bins < 1
            or self.draws < 1
            or self.draws_per_bin < 1
        ):
            raise UsageError(
                "plan needs --pilot-clips >= 2, --rank-clips >= 3, --replicates >= 2, --bins >= 1, --draws >= 1, "
                "--draws-per-bin >= 1"
            )
        if not 0 < self.mix <= 1:
            raise UsageError(f"--mix {self.mix}: must be in (0, 1] (weights are bounded by 1/α)")
        check_min("--k-max", self.k_max, 1)
        return self
