"""The one resize every decoded frame goes through, whichever decoder produced it.

Both decoders (`video/decode.py`: decord and PyAV) return each frame as uint8 RGB at its *stored*
size (FFmpeg's YUV->RGB at native size, no scaling inside the decoder), and `resize_frame` scales it
here, so a file's pixels no longer depend on which decoder it was routed to. Before, decord scaled
inside its bundled FFmpeg's `scale` filter (bilinear, the libavfilter default of FFmpeg 4.x) and PyAV
with swscale's bicubic, so a stream-copied cut (routed to PyAV) and its uncut source (decord) gave
different pixels for the same picture.

The filter is Pillow's `Image.resize(..., Resampling.BICUBIC)`: cubic convolution (Keys, a = -0.5)
whose support is widened by the scale factor when shrinking, i.e. antialiased downscaling (Pillow
handbook, "Filters": "calculate the output pixel value using cubic interpolation on all pixels that
may contribute to the output value"), computed for 8-bit images in fixed-point integer arithmetic
(Pillow's `libImaging/Resample.c`), so it gives the same bytes on every CPU and thread count, unlike
a float path whose rounding can follow the SIMD unit. Pillow is already a dependency (report frame
strips). Each frame is resized on its own, uint8 in and out: no float stack of full-size frames is
ever held (a 1280x720 RGB frame is 2.8 MB; the output stack is the small storage size).

    out = resize_frame(rgb_uint8_hxwx3, (w, h))   # same size: returned unchanged
"""

from __future__ import annotations

from typing import Any

RESIZE_FILTER = "Pillow BICUBIC (antialiased, fixed-point)"


def resize_frame(frame: Any, size: tuple[int, int]) -> Any:
    """uint8 (h, w, 3) RGB -> uint8 (size[1], size[0], 3) with Pillow's bicubic filter; a frame
    already at `size` = (w, h) is returned as is (no resampling, so native-size policies keep the
    decoder's exact pixels)."""
    import numpy as np
    from PIL import Image

    w, h = size
    if frame.shape[0] == h and frame.shape[1] == w:
        return frame
    img = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8))  # (h, w, 3) uint8: mode RGB
    return np.asarray(img.resize((w, h), Image.Resampling.BICUBIC))


def resize_stack(frames: Any, size: tuple[int, int], out: Any = None, start: int = 0) -> Any:
    """Resize uint8 (n, h, w, 3) frames one by one into `out[start:start + n]` (allocated as
    (n, size[1], size[0], 3) uint8 when None); returns `out`."""
    import numpy as np

    if out is None:
        out = np.empty((len(frames), size[1], size[0], 3), np.uint8)
    for i, fr in enumerate(frames):
        out[start + i] = resize_frame(fr, size)
    return out
