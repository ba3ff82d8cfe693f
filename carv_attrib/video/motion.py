"""Motion maps on the latent grid, for motion attribution (Motive, arXiv 2601.08828).

Motive weights the diffusion loss by motion-magnitude patches pooled from a video's optical flow
(a "loss-space motion mask"), so that a clip's gradient, and hence its attribution, comes from what
moves rather than from static background. Motive tracks points with AllTracker; here the flow is
OpenCV's dense Farneback flow (`cv2.calcOpticalFlowFarneback`, no weights to download), computed on
the very frames encode feeds the VAE, so the map lines up with the latent token for token.

    m = frame_motion(frames)            # (F, H/8, W/8) float32: |flow| in px/frame, 8x8 patch means
    m = latent_motion(m, T)             # (T, H/8, W/8): Wan2.1's VAE groups frames 0 | 1-4 | 5-8 | ...
    w = motion_weights(m)               # carv.weights: (T, h, w) float32, mean 1, the per-token loss weights

Flow runs on each colour channel, and a pixel's magnitude is the channels' average weighted by their
local contrast (gradient energy over the flow window): on grey levels alone a shape whose colour has
its background's luminance (green (40, 190, 60) on grey 128) does not move at all, while a channel
with little contrast gives unreliable flow (the plain per-channel maximum overshoots 2-4x there).
Frame f's motion is |flow(f−1 → f)| (frame 0 takes |flow(0 → 1)|); a latent frame's is the mean of
the video frames it encodes (t = 0: frame 0; t ≥ 1: frames 4t−3 … 4t, Wan2.1's temporal factor 4).
Flow is computed at most FLOW_MAX_SIDE px on the longer side (magnitudes rescaled to frame pixels):
the map is pooled to 8x8 patches anyway. Encode stores the pooled magnitudes (`--motion-masks`);
`carv.weights.motion_weights` turns them into weights at featurize/score time (`--objective motion`),
after subtracting MOTION_NOISE px/frame of flow noise; `objective_spec` records the objective (weight
rule and this flow rule) and `check_objective_inputs` refuses latents that cannot serve it.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from carv_attrib.carv.weights import Objective
from carv_attrib.choices import OBJECTIVES
from carv_attrib.errors import UsageError

MOTION_RULE = "farneback-v1"  # recorded with the latents: maps from another rule never mix in
MOTION_DTYPE = np.float16  # storage dtype of the maps (latent rows' `motion` column)
SPATIAL_FACTOR = 8  # Wan2.1 VAE: 8x8 pixels per latent cell
FLOW_MAX_SIDE = 256
# Farneback parameters: OpenCV's documented example (pyramid 0.5, 3 levels, 15 px window).
_FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2}


def frame_motion(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 RGB → (F, H/8, W/8) float32: each frame's flow magnitude in pixels per frame
    (of the given frames), averaged over 8x8 patches. H and W must be multiples of 8 (the encode
    sizes are). One frame: zeros (nothing moves)."""
    f, h, w = frames.shape[:3]
    if h % SPATIAL_FACTOR or w % SPATIAL_FACTOR:
        raise ValueError(f"frames of {h}x{w}: height and width must be multiples of {SPATIAL_FACTOR}")
    scale = min(1.0, FLOW_MAX_SIDE / max(h, w))
    fh, fw = max(1, round(h * scale)), max(1, round(w * scale))
    small = [
        cv2.resize(np.ascontiguousarray(fr), (fw, fh), interpolation=cv2.INTER_AREA) if scale < 1 else fr
        for fr in frames
    ]  # (fh, fw, 3) each
    grid = (w // SPATIAL_FACTOR, h // SPATIAL_FACTOR)  # cv2 sizes are (width, height)
    out = np.zeros((f, grid[1], grid[0]), dtype=np.float32)
    energy = [_contrast(fr) for fr in small]  # (3, fh, fw) each
    for i in range(1, f):
        num = np.zeros((fh, fw), dtype=np.float32)
        den = np.full((fh, fw), 1e-6, dtype=np.float32)
        for c in range(3):  # isoluminant colours still move; low-contrast channels weigh little
            prev, nxt = np.ascontiguousarray(small[i - 1][..., c]), np.ascontiguousarray(small[i][..., c])
            flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, flags=0, **_FARNEBACK)  # (fh, fw, 2)
            wc = energy[i - 1][c] + energy[i][c]  # (fh, fw)
            num += wc * np.linalg.norm(flow, axis=2)
            den += wc
        mag = num / den * (w / fw)  # px per frame at the frames' own size
        # INTER_AREA to the patch grid is the patch mean when the sizes divide (they do unscaled)
        out[i] = cv2.resize(mag.astype(np.float32), grid, interpolation=cv2.INTER_AREA)
    if f > 1:
        out[0] = out[1]
    return out


def _contrast(frame: np.ndarray) -> np.ndarray:
    """(3, H, W) float32 gradient energy |∇I_c|² of each channel, box-averaged over the flow window."""
    out = []
    for c in range(3):
        ch = frame[..., c].astype(np.float32)
        gx, gy = cv2.Sobel(ch, cv2.CV_32F, 1, 0), cv2.Sobel(ch, cv2.CV_32F, 0, 1)
        out.append(cv2.boxFilter(gx * gx + gy * gy, -1, (_FARNEBACK["winsize"],) * 2))
    return np.stack(out)


def latent_motion(frame_mag: np.ndarray, t_latent: int) -> np.ndarray:
    """(F, h, w) per-frame magnitudes → (T, h, w): latent frame 0 is video frame 0, latent frame t ≥ 1
    the mean of the r = (F−1)/(T−1) frames it encodes (r = 4 for Wan2.1). ValueError when F and T do
    not fit that grouping."""
    f = frame_mag.shape[0]
    if t_latent == 1:
        return frame_mag[:1].copy() if f == 1 else frame_mag.mean(axis=0, keepdims=True)
    if (f - 1) % (t_latent - 1):
        raise ValueError(f"{f} frames do not group into {t_latent} latent frames (1 + r·(T−1) frames)")
    r = (f - 1) // (t_latent - 1)
    rest = frame_mag[1:].reshape(t_latent - 1, r, *frame_mag.shape[1:]).mean(axis=1)  # (T−1, h, w)
    return np.concatenate([frame_mag[:1], rest]).astype(np.float32)


def stored_map(frame_mag: np.ndarray, t_latent: int) -> np.ndarray:
    """(F, h, w) per-frame magnitudes → the (T, h, w) MOTION_DTYPE map a latent row stores; queries
    use it too, so they get the training clips' rounding."""
    return latent_motion(frame_mag, t_latent).astype(MOTION_DTYPE)


def decode_with_motion(path: str, policy: Any) -> Any:
    """`decode_clip` plus the clip's per-frame motion (`frame_motion`) in `.motion`; module-level so
    that decode workers (`DecodePool(decode_fn=...)`) compute the flow beside the decode."""
    from carv_attrib.video.decode import decode_clip

    cv2.setNumThreads(1)  # one decode worker per core already: OpenCV's own pool would oversubscribe
    clip = decode_clip(path, policy)
    clip.motion = frame_motion(np.asarray(clip.frames))
    return clip


def check_rule(recorded: str | None, where: str) -> None:
    """UsageError unless maps recorded under `recorded` are this version's MOTION_RULE (queries and
    training clips must get their maps from the same flow rule)."""
    if recorded != MOTION_RULE:
        raise UsageError(
            f"{where} holds motion maps of rule {recorded!r}, this carv-attrib computes {MOTION_RULE!r}: "
            "re-encode with --motion-masks --overwrite (or into a new run)"
        )


def objective_spec(kind: str) -> dict[str, Any]:
    """The recorded form of `--objective`: {"kind": "uniform"} or {"kind": "motion", "floor", "rule"}
    (the weight rule and the flow rule of the maps, so an index is always scored as it was built)."""
    if kind not in OBJECTIVES:
        raise UsageError(f"--objective {kind}: choose {' or '.join(OBJECTIVES)}")
    return Objective(kind, rule=MOTION_RULE if kind != "uniform" else None).spec()


def check_objective_inputs(objective: str, latents_config: dict[str, Any], run: Any) -> None:
    """UsageError (exit 2) unless the latents can serve `objective`: motion needs maps of this
    version's flow rule (`encode --motion-masks`)."""
    if objective == "uniform":
        return
    if objective != "motion":
        raise UsageError(f"--objective {objective}: choose {' or '.join(OBJECTIVES)}")
    if not latents_config.get("motion_masks"):
        raise UsageError(
            f"--objective motion weights the loss by each clip's motion map, and {run} was encoded "
            "without them: encode into a new run with --motion-masks (or rerun encode with "
            "--motion-masks --overwrite)"
        )
    check_rule(latents_config["motion_masks"], str(run))
