"""`encode`'s config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carv_attrib.choices import DTYPES, LATENT_DTYPES, VAE_TILINGS
from carv_attrib.config.checks import check_choice, check_distribution, check_min, parse_size
from carv_attrib.config.options import (
    StageConfig,
    choice_help,
    device_option,
    dry_run_option,
    dtype_option,
    executor_option,
    lock_held_option,
    model_option,
    option,
    overwrite_option,
    parts_option,
    ray_address_option,
    shard_option,
    wait_option,
)
from carv_attrib.errors import UsageError
from carv_attrib.store.manifest import FORMATS as MANIFEST_FORMATS
from carv_attrib.store.manifest import ManifestOptions
from carv_attrib.video.decode import FramePolicy


@dataclass(kw_only=True)
class EncodeConfig(StageConfig):
    """`encode`: decode every clip once, VAE-encode it once, embed each caption once."""

    manifest: Path = option(
        positional=True,
        help="Manifest (VidGen JSON, JSONL, CSV, Parquet), or the dataset itself: WebDataset .tar shards (a "
        "file, a folder or a pattern like 'shards/{00000..00009}.tar'), a saved Hugging Face dataset folder, "
        "or a folder of videos with .txt caption sidecars.",
    )
    model: str = model_option()
    run: Path = option(flags=("--run", "-r"), help="Run directory to create or resume.")
    videos: Path | None = option(
        None,
        help="Videos root: manifest paths are relative to it (VIDEOS/<id>.mp4 by default); not needed for tar "
        "shards, a dataset folder or a sidecar folder.",
    )
    frames: int = option(17, help="Frames per clip, 1 + 4k (Wan2.1 trains at 81).")
    size: str = option(
        "64x64", metavar="WxH", help="Frame size WxH, multiples of 16 (resize to cover, centre-crop)."
    )
    fps: float = option(
        8.0, help="Sampling rate: frame k is the source frame nearest k/fps (0 = consecutive)."
    )
    pad_short: bool = option(
        False, flags=("--pad-short",), help="Repeat the last frame of clips too short for F frames."
    )
    batch_size: int = option(4, flags=("--batch-size", "-b"), help="Clips per VAE call.")
    vae_tiling: str = option(
        "auto",
        help=f"{choice_help(VAE_TILINGS)}: tile the VAE encode (less memory, slightly different latents); auto: when "
        "an untiled batch would not fit in the device's free memory.",
    )
    workers: int = option(2, help="Decoding processes (0 = decode in this process).")
    device: str = device_option()
    dtype: str = dtype_option()
    latent_dtype: str = option(
        "float32", help=f"Storage dtype of latents and text embeddings: {choice_help(LATENT_DTYPES)}."
    )
    shard_size: int = option(64, help="Clips per Parquet shard (the unit of resume).")
    motion_masks: bool = option(
        False,
        flags=("--motion-masks",),
        help="Also store each clip's motion map on the latent grid (Farneback optical flow, pooled to "
        "8x8 patches) for `featurize --objective motion`.",
    )
    retry_failed: bool = option(
        False,
        flags=("--retry-failed",),
        help="Encode again the clips whose last try failed (a file that changed or came back always is).",
    )
    dry_run: bool = dry_run_option()
    shard: str | None = shard_option()
    executor: str = executor_option()
    ray_address: str | None = ray_address_option()
    parts: int | None = parts_option()
    max_failure_rate: float = option(0.05, help="Exit 3 when more than this share of clips failed.")
    decode_timeout: float = option(120.0, help="Seconds per clip before its decoder is killed.")
    id_column: str = option("vid", help="Manifest column of the clip id.")
    caption_column: str = option("caption", help="Manifest column of the caption.")
    path_column: str | None = option(
        None,
        help="Manifest column of the video path (default: 'path' when present); of a Hugging Face dataset, "
        "its video column (a path, bytes or {bytes, path}; default: video, path, file, mp4, ...).",
    )
    manifest_format: str | None = option(
        None, help=f"{choice_help(MANIFEST_FORMATS)} (default: by extension)."
    )
    allow_absolute_paths: bool = option(
        False, flags=("--allow-absolute-paths",), help="Accept manifest paths outside the videos root."
    )
    overwrite: bool = overwrite_option()
    wait: bool = wait_option()
    lock_held: bool = lock_held_option()

    @property
    def policy(self) -> Any:
        w, h = parse_size(self.size)
        return FramePolicy(frames=self.frames, height=h, width=w, fps=self.fps, pad_short=self.pad_short)

    @property
    def manifest_options(self) -> Any:
        return ManifestOptions(
            id_column=self.id_column,
            caption_column=self.caption_column,
            path_column=self.path_column,
            fmt=self.manifest_format,
            allow_absolute_paths=self.allow_absolute_paths,
        )

    def validate(self) -> EncodeConfig:
        """The frame policy, the dtypes and tiling, sizes and workers, the distribution flags, a positive
        --decode-timeout and a --max-failure-rate in [0, 1]; returns self.
        """
        self.policy.validate()
        check_choice("--latent-dtype", self.latent_dtype, LATENT_DTYPES)
        check_choice("--vae-tiling", self.vae_tiling, VAE_TILINGS)
        check_choice("--dtype", self.dtype, DTYPES)
        check_min("--shard-size", self.shard_size, 1)
        check_min("--batch-size", self.batch_size, 1)
        check_min("--workers", self.workers, 0)
        check_distribution(self)
        if self.decode_timeout <= 0:
            raise UsageError(f"--decode-timeout {self.decode_timeout}: must be > 0 seconds")
        if not 0 <= self.max_failure_rate <= 1:
            raise UsageError(f"--max-failure-rate {self.max_failure_rate}: a share between 0 and 1")
        return self
