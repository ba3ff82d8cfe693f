"""Per-token loss weights of the motion objective (Motive, arXiv 2601.08828): numpy maths only.

A clip's stored motion map m (T, h, w) (|optical flow| in px/frame on the latent grid,
`carv_attrib.video.motion`) becomes weights of mean 1 that `objective.clip_objective` multiplies into
the per-token squared residual, so moving tokens dominate the gradient:

    m' = max(m − noise, 0),   w = floor + (1 − floor)·m' / mean(m')

    w = motion_weights(m)   # (T, h, w) float32, mean 1
"""

from __future__ import annotations

import numpy as np

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
