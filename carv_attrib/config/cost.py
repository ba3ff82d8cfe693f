"""`cost`'s config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carv_attrib.config.checks import check_min
from carv_attrib.config.options import StageConfig, option, run_argument


@dataclass(kw_only=True)
class CostConfig(StageConfig):
    """`cost`: GPU-hours, storage and index memory for N clips, from a run's measured timings."""

    run: Path = run_argument("A run encoded (and best featurized) on the machine and settings you will use.")
    clips: int = option(flags=("--clips", "-n"), help="Clips to size the job for (e.g. 1000000).")
    draws: int | None = option(
        None, flags=("--draws", "-K"), help="K draws per clip (default: the run's featurize K)."
    )
    dim: int | None = option(None, help="Feature dimension D (default: the run's).")
    index_factory: str | None = option(
        None, help="FAISS factory of the index to size (default: the run's index, else Flat)."
    )
    plan: Path | None = option(
        None, help="A plan.json of this run: its pilot's c_enc and c_draw replace the stage timings."
    )
    timings: Path | None = option(
        None,
        help="A timings JSON measured elsewhere (e.g. bench/gpu_check.sh on the target GPU): "
        "encode_s_per_clip and featurize_s_per_draw replace the run's.",
    )
    devices: int = option(1, help="Devices working in parallel (wall-clock hours = device-hours / devices).")

    def validate(self) -> CostConfig:
        """--clips, --devices >= 1; --draws, --dim >= 1 when given; returns self."""
        check_min("--clips", self.clips, 1)
        check_min("--devices", self.devices, 1)
        if self.draws is not None:
            check_min("--draws", self.draws, 1)
        if self.dim is not None:
            check_min("--dim", self.dim, 1)
        return self
