"""`generate`: a video from a prompt with the model's own `WanPipeline` (diffusers), written as MP4.

The query side of the walkthrough: generate with the model whose training clips you attribute, then
`score` the video against the run. Frames are written with libx264 through PyAV
(`carv_attrib.lds.synthetic.write_mp4`), so `score` decodes them like any clip.

    from carv_attrib.pipeline.generate import GenerateConfig, run_generate
    path = run_generate(GenerateConfig(prompt="a red square moving left", model="demo-run/model"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import WanPipeline
from diffusers.utils import logging as dlog

from carv_attrib.config import GenerateConfig
from carv_attrib.errors import ModelLoadError
from carv_attrib.lds.synthetic import write_mp4
from carv_attrib.models.identity import check_pipeline_dir
from carv_attrib.models.wan import _quiet_hf, resolve_device

__all__ = ["GenerateConfig", "generate_video", "run_generate"]


def generate_video(
    model: str, prompt: str, frames: int, height: int, width: int, steps: int, seed: int, device: str
) -> Any:
    """uint8 (F, H, W, 3) frames from `WanPipeline.from_pretrained(model)` for `prompt`: no negative
    prompt, guidance 3.0, a seeded CPU generator (the same seed gives the same video).

    Raises ModelLoadError (exit 2) when the pipeline does not load: diffusers refuses pickled weights
    it will not unpickle and custom classes it would have to import (no payload runs), and those
    refusals are the user's model folder, not a bug, so they get one line like every other command's.
    """
    _quiet_hf()
    # diffusers logs its own error line before raising (a .bin instead of safetensors); ours says it
    dlog.set_verbosity(dlog.CRITICAL)
    try:
        pipe = WanPipeline.from_pretrained(model)
    except Exception as exc:  # OSError, ValueError (custom code), HF hub errors: all mean "cannot load"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelLoadError(
            f"cannot load the pipeline {model}: {type(exc).__name__}: {first}; give a Wan2.1 diffusers "
            "pipeline with safetensors weights and diffusers' own classes (e.g. one made by "
            "`carv-attrib make-model DIR`)"
        ) from exc
    finally:
        dlog.set_verbosity_error()
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=prompt,
        negative_prompt="",
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames[0]  # (F, H, W, 3) float in [0, 1]
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def run_generate(cfg: GenerateConfig) -> Path:
    """Generate cfg.prompt with cfg.model and write cfg.out (atomically); returns the path. UsageError
    (exit 2) for bad options or a --model that is not a Wan2.1 pipeline."""
    cfg.validate()
    check_pipeline_dir(cfg.model)
    frames = generate_video(
        cfg.model,
        cfg.prompt,
        cfg.frames,
        cfg.height,
        cfg.width,
        cfg.steps,
        cfg.seed,
        resolve_device(cfg.device),
    )
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out, frames, fps=cfg.fps)
    return out
