"""video/motion.py: Farneback flow magnitudes pooled on the latent grid, grouped like Wan2.1's VAE
groups frames, and turned into mean-1 loss weights.

Flow is an estimate, so the checks are about what attribution needs from it, on generated clips of
the demo's kind (a flat shape moving over a plain background; several speeds, sizes and all four
directions): the patches the shape crosses carry motion, the background far from its path carries
none, the magnitude tracks the speed and not the direction, and the flow computed on a downscaled
copy (frames above FLOW_MAX_SIDE) is rescaled back to frame pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from carv_attrib.carv.weights import MOTION_FLOOR, MOTION_NOISE, motion_weights
from carv_attrib.errors import UsageError
from carv_attrib.lds.synthetic import ClipSpec, render_frames
from carv_attrib.video.motion import (
    FLOW_MAX_SIDE,
    MOTION_RULE,
    check_objective_inputs,
    frame_motion,
    latent_motion,
    objective_spec,
)


def _clip(
    direction: str, speed: float, size: int, hw: int = 64, frames: int = 9, grow: bool = True,
    color: str = "orange", background: str = "black",
) -> np.ndarray:  # fmt: skip
    """A demo-kind clip on an hw x hw frame; `grow`: size and speed scale with hw/64 (else only the
    start point does, and the background around the path grows)."""
    start = {"left": (44, 32), "right": (20, 32), "up": (32, 44), "down": (32, 20)}[direction]
    k = hw / 64
    g = k if grow else 1.0
    spec = ClipSpec(
        "x",
        color,
        "square",
        direction,
        background,
        round(size * g),
        (round(start[0] * k), round(start[1] * k)),
    )
    return render_frames(spec, frames, hw, hw, speed * g)  # (F, hw, hw, 3)


def _path_masks(frames: np.ndarray, reach: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """((g, g) patches the shape covers at some frame, (g, g) patches more than `reach` patches away
    from all of them): Farneback's 15 px window spreads flow about two 8 px patches out."""
    covered = (frames.max(axis=3) > 60).any(axis=0)  # (hw, hw) pixels the shape ever covers
    g = frames.shape[1] // 8
    on = covered.reshape(g, 8, g, 8).any(axis=(1, 3))
    ii, jj = np.nonzero(on)
    yy, xx = np.mgrid[0:g, 0:g]
    dist = np.min(np.maximum(np.abs(yy[..., None] - ii), np.abs(xx[..., None] - jj)), axis=-1)  # Chebyshev
    return on, dist > reach


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
@pytest.mark.parametrize("speed,size", [(1.5, 6), (3.0, 8), (2.0, 10)])
def test_motion_lives_where_the_shape_moves_and_tracks_its_speed(
    direction: str, speed: float, size: int
) -> None:
    frames = _clip(direction, speed, size, hw=128, grow=False)
    m = frame_motion(frames)  # (F, 16, 16)
    assert m.shape == (9, 16, 16) and m.dtype == np.float32 and (m >= 0).all()
    on_path, far = _path_masks(frames)
    assert far.any()
    total = m[1:].sum(axis=0)  # (16, 16)
    assert total[on_path].mean() > 100 * max(float(total[far].max()), 1e-3)
    # Twice the speed, more motion: Farneback sees a flat shape's edges move (its peaks overshoot the
    # true speed near sharp edges, so the check is on the ratio of the mean map, not on pixels)
    faster = frame_motion(_clip(direction, 2 * speed, size, hw=128, grow=False))
    assert 1.3 < faster[1:].mean() / m[1:].mean() < 3.0


@pytest.mark.parametrize("color,background", [("green", "grey"), ("orange", "grey"), ("blue", "black")])
def test_a_shape_of_its_backgrounds_luminance_still_moves(color: str, background: str) -> None:
    """Green (40, 190, 60) on grey 128 has the same grey level (130 vs 128): flow on luminance alone
    sees nothing move; per-channel flow does."""
    frames = _clip("down", 2.0, 8, color=color, background=background)
    moving = frame_motion(frames)
    assert moving[1:].max(axis=(1, 2)).mean() > 1.0  # px per frame, of 2
    if color == "green":  # the control: grey levels see (almost) nothing move
        grey = np.repeat(
            cv2.cvtColor(frames.reshape(-1, 64, 3), cv2.COLOR_RGB2GRAY).reshape(-1, 64, 64, 1), 3, axis=3
        )
        assert frame_motion(grey)[1:].max() < 0.1 * moving[1:].max()


def test_magnitude_is_the_same_whichever_way_the_shape_moves() -> None:
    means = [frame_motion(_clip(d, 2.5, 8))[1:].sum() for d in ("left", "right", "up", "down")]
    assert max(means) < 1.25 * min(means)


@pytest.mark.parametrize("sd", [1.0, 3.0])
def test_pixel_noise_on_a_still_clip_is_not_motion(sd: float) -> None:
    """Per-clip normalisation would turn a still clip's flow noise into weights of 20x; below
    MOTION_NOISE px/frame it is no motion (H.264 stills stay well under sd 3 grey levels)."""
    rng = np.random.default_rng(int(sd))
    still = np.repeat(_clip("left", 0.0, 8)[:1], 17, axis=0).astype(np.float32)
    noisy = np.clip(still + rng.normal(0, sd, still.shape), 0, 255).astype(np.uint8)
    m = latent_motion(frame_motion(noisy), 5)
    assert 0 < float(m.max()) < MOTION_NOISE
    np.testing.assert_array_equal(motion_weights(m), np.ones(m.shape, np.float32))
    moving = latent_motion(frame_motion(_clip("left", 1.0, 8, frames=17)), 5)
    assert motion_weights(moving).max() > 2  # a shape moving 1 px/frame still stands out


def test_a_static_clip_has_no_motion_and_plain_weights() -> None:
    frames = np.repeat(_clip("left", 0.0, 8)[:1], 9, axis=0)
    m = frame_motion(frames)
    assert float(m.max()) < 1e-3
    np.testing.assert_array_equal(motion_weights(latent_motion(m, 3)), np.ones((3, 8, 8), np.float32))
    assert not frame_motion(frames[:1]).any()  # a single frame: nothing moves


def test_frames_above_the_flow_size_are_measured_in_their_own_pixels() -> None:
    big = 2 * FLOW_MAX_SIDE  # flow runs on a half-size copy
    small_m = frame_motion(_clip("right", 2.0, 8, hw=FLOW_MAX_SIDE))
    big_m = frame_motion(_clip("right", 2.0, 8, hw=big))
    assert big_m.shape == (9, big // 8, big // 8)
    ratio = big_m[1:].mean() / small_m[1:].mean()  # the same picture: patch means compare
    assert 1.5 < ratio < 2.5  # twice the pixels per frame at twice the size


def test_latent_frames_group_like_the_wan_vae() -> None:
    f = np.arange(17, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)  # frame f = f
    lat = latent_motion(f, 5)
    assert lat.shape == (5, 2, 3)
    np.testing.assert_array_equal(lat[:, 0, 0], [0, 2.5, 6.5, 10.5, 14.5])  # 0 | 1-4 | 5-8 | ...
    assert latent_motion(f[:1], 1).shape == (1, 2, 3)
    with pytest.raises(ValueError, match="do not group"):
        latent_motion(f[:16], 5)
    with pytest.raises(ValueError, match="multiples of 8"):
        frame_motion(np.zeros((2, 20, 32, 3), np.uint8))


def test_weights_have_mean_one_and_a_floor() -> None:
    rng = np.random.default_rng(0)
    m = MOTION_NOISE + rng.exponential(size=(5, 4, 4)).astype(np.float32)
    m[:, :2] = 0.0  # a static half
    w = motion_weights(m)
    assert w.dtype == np.float32
    assert float(w.astype(np.float64).mean()) == pytest.approx(
        1.0, abs=w.size * float(np.finfo(np.float32).eps)
    )
    np.testing.assert_allclose(w[:, :2], MOTION_FLOOR, rtol=np.finfo(np.float32).eps)
    assert (w[:, 2:] > MOTION_FLOOR).all()


def test_objective_specs_and_an_unknown_objective() -> None:
    """The recorded objective holds the weight rule and the maps' flow rule; an unknown kind is
    refused, not taken as uniform (the check) or motion (the spec)."""
    assert objective_spec("uniform") == {"kind": "uniform"}
    assert objective_spec("motion") == {
        "kind": "motion", "floor": MOTION_FLOOR, "noise": MOTION_NOISE, "rule": MOTION_RULE,
    }  # fmt: skip
    with pytest.raises(UsageError, match=r"--objective saliency: choose uniform or motion"):
        objective_spec("saliency")
    with pytest.raises(UsageError, match=r"--objective saliency: choose uniform or motion"):
        check_objective_inputs("saliency", {}, "runs/x")
    check_objective_inputs("uniform", {}, "runs/x")  # uniform needs nothing of the latents
    check_objective_inputs("motion", {"motion_masks": MOTION_RULE}, "runs/x")
    with pytest.raises(UsageError, match=r"encoded without them"):
        check_objective_inputs("motion", {}, "runs/x")
