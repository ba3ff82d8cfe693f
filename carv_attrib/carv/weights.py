"""Per-token loss weights of the motion objective (Motive, arXiv 2601.08828): numpy maths only.

A clip's stored motion map m (T, h, w) (|optical flow| in px/frame on the latent grid,
`carv_attrib.video.motion`) becomes weights of mean 1 that `objective.clip_objective` multiplies into
the per-token squared residual, so moving tokens dominate the gradient:

    m' = max(m − noise, 0),   w = floor + (1 − floor)·m' / mean(m')

    w = motion_weights(m)   # (T, h, w) float32, mean 1
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from carv_attrib.choices import OBJECTIVES

MOTION_FLOOR = 0.1  # share of the weight spread evenly: static tokens keep a small gradient
# px/frame of apparent motion that is noise: a still frame with Gaussian pixel noise of sd 1 / 3 / 6
# grey levels gives patch magnitudes up to 0.03 / 0.13 / 0.67 px/frame (sd 3 already exceeds what an
# H.264 still shows), which per-clip normalisation would otherwise blow up into weights of 20x
MOTION_NOISE = 0.2


def motion_weights(
    motion: np.ndarray, floor: float = MOTION_FLOOR, noise: float = MOTION_NOISE
) -> np.ndarray:
    """(T, h, w) magnitudes → (T, h, w) float32 per-token loss weights with mean 1:
    m' = max(m − noise, 0), w = floor + (1 − floor)·m' / mean(m'). A clip where nothing moves more than
    `noise` px/frame (mean(m') below 1e-6) gets w = 1 everywhere, the plain objective."""
    m = np.maximum(np.asarray(motion, dtype=np.float64) - noise, 0.0)
    mean = float(m.mean()) if m.size else 0.0
    if not np.isfinite(mean) or mean < 1e-6:
        return np.ones(m.shape, dtype=np.float32)
    return (floor + (1.0 - floor) * m / mean).astype(np.float32)


@dataclass(frozen=True)
class Objective:
    """The training objective's per-token weighting, recorded with features and indexes.

    uniform: every token weighs 1 (the plain flow-matching loss). motion (Motive, arXiv 2601.08828):
    `motion_weights(m, floor, noise)` of each clip's stored motion map; `rule` names the flow rule
    the maps were made by (`carv_attrib.video.motion.MOTION_RULE`), so an index is scored with maps
    of the rule it was built with. `spec()` is the recorded form (today's `{"kind": ...}` dicts);
    `from_spec` reads every recorded form (a motion spec without `noise` predates it: noise 0).
    """

    kind: str = "uniform"  # choices.OBJECTIVES
    floor: float = MOTION_FLOOR
    noise: float = MOTION_NOISE
    rule: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.kind!r}; expected one of {', '.join(OBJECTIVES)}")

    def spec(self) -> dict[str, Any]:
        """{"kind": "uniform"} or {"kind": "motion", "floor", "noise", "rule"}."""
        if self.kind == "uniform":
            return {"kind": "uniform"}
        return {"kind": self.kind, "floor": self.floor, "noise": self.noise, "rule": self.rule}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | Objective | None) -> Objective:
        """The objective of a recorded spec (None or {} : uniform); ValueError for an unknown kind."""
        if isinstance(spec, Objective):
            return spec
        spec = dict(spec or {})
        kind = spec.get("kind", "uniform")
        if kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {kind!r}; expected one of {', '.join(OBJECTIVES)}")
        if kind == "uniform":
            return cls()
        return cls(kind, float(spec["floor"]), float(spec.get("noise", 0.0)), spec.get("rule"))

    def weights(self, motion: np.ndarray | None) -> np.ndarray | None:
        """(T, h, w) float32 per-token weights of mean 1 from a clip's motion map, or None (uniform).
        ValueError when a weighting objective gets no map."""
        if self.kind == "uniform":
            return None
        if motion is None:
            raise ValueError("the motion objective needs the clip's motion map")
        return motion_weights(motion, self.floor, self.noise)
