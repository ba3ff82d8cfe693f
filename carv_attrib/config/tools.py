"""The configs of the commands around the stages: demo, curate, report, generate, frames."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carv_attrib.choices import CURATE_METHODS, DECODERS, PRECONDITIONERS, PRESETS, SCHEMES
from carv_attrib.config.checks import check_choice, check_min, parse_size
from carv_attrib.config.options import (
    DEFAULT_PRECONDITION,
    StageConfig,
    choice_help,
    device_option,
    draws_option,
    model_option,
    option,
    seed_option,
    timesteps_option,
)
from carv_attrib.errors import UsageError
from carv_attrib.store.manifest import FORMATS as MANIFEST_FORMATS
from carv_attrib.video.decode import FramePolicy


@dataclass(kw_only=True)
class DemoConfig(StageConfig):
    """`demo`: tiny Wan2.1 pipeline + synthetic clips, then every stage, then a generated video scored."""

    out: Path = option(
        Path("demo-run"), positional=True, help="Directory for the model, data, run and results."
    )
    clips: int = option(24, flags=("--clips", "-n"), help="Synthetic training clips.")
    preset: str = option("tiny", help=f"Model preset: {choice_help(PRESETS)}.")
    frames: int = option(17, help="Frames per clip, 1 + 4k.")
    size: str = option("64x64", metavar="WxH", help="Frame size WxH, multiples of 16.")
    train_steps: int = option(150, help="Flow-matching steps before attribution (0: none).")
    draws: int = draws_option()
    timesteps: str = timesteps_option()
    precondition: str = option(DEFAULT_PRECONDITION, help=f"{choice_help(PRECONDITIONERS)}.")
    plan_pilot_clips: int = option(
        4, flags=("--plan-pilot",), help="Pilot clips for `plan` (0: skip the plan; q = p)."
    )
    prompt: str | None = option(None, help="Caption to generate (default: the first clip's).")
    inference_steps: int = option(12, help="WanPipeline denoising steps for the generated video.")
    top_k: int = option(5, flags=("--top-k", "-k"), help="Results shown.")
    seed: int = seed_option()
    workers: int = option(1, help="Decoding processes.")
    device: str = option("cpu", help="cpu | cuda | auto.")

    @property
    def width(self) -> int:
        return parse_size(self.size)[0]

    @property
    def height(self) -> int:
        return parse_size(self.size)[1]

    def validate(self) -> DemoConfig:
        """The frame policy, the preset, the counts and the choices; returns self."""
        FramePolicy(frames=self.frames, width=self.width, height=self.height).validate()
        check_choice("--preset", self.preset, PRESETS)
        check_min("--clips", self.clips, 2)
        check_min("--draws", self.draws, 1)
        check_min("--train-steps", self.train_steps, 0)
        check_min("--workers", self.workers, 0)
        check_choice("--timesteps", self.timesteps, SCHEMES)
        check_choice("--precondition", self.precondition, PRECONDITIONERS)
        check_min("--top-k", self.top_k, 1)
        return self


# -- curate ----------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class CurateConfig(StageConfig):
    """`curate`: many attribution JSONs -> a per-clip aggregate and a subset of the training data, in
    the form it ships (a manifest, WebDataset shards, a saved Hugging Face dataset, a sidecar folder)."""

    attributions: list[Path] = option(positional=True, help="Attribution JSONs from `score` (one index).")
    manifest: Path = option(
        help="The training data to take the subset from, as `encode` took it: a manifest (its own format is "
        "kept), WebDataset .tar shards (a file, a folder or a pattern like 'shards/{00000..00009}.tar'), a "
        "saved Hugging Face dataset folder, or a folder of videos with .txt sidecars."
    )
    out: Path = option(
        flags=("--out", "-o"),
        help="The subset to write: a manifest file for a manifest; a new folder of the input's kind for "
        "shards (one tar per input shard, same names), a dataset (save_to_disk) or a sidecar folder.",
    )
    overwrite: bool = option(
        False,
        flags=("--overwrite",),
        help="Replace a non-empty -o folder (a subset manifest file is always replaced).",
    )
    csv: Path | None = option(None, help="Also write the per-clip aggregate as CSV.")
    method: str = option(
        "mean",
        help=choice_help(
            CURATE_METHODS,
            {
                "mean": " (mean score over the queries, a clip absent from a top-k counts its score as the "
                "query's k-th)",
                "rank-sum": " (sum of ranks, absent = k+1; lower is more influential)",
                "vote": " (queries with the clip in their top-k, Motive-style)",
            },
        )
        + ".",
    )
    top: float | None = option(
        None,
        help="Keep the top P % of the clips by the method, P % of the clips the queries returned (their "
        "top-k), not of the whole training set.",
    )
    bottom: float | None = option(
        None, help="Keep the bottom P % (the least supportive: harmful candidates)."
    )
    threshold: float | None = option(None, help="Keep clips whose aggregate is at least this (mean, vote).")
    exclude: bool = option(
        False,
        flags=("--exclude",),
        help="Write every clip of the training data but the selected ones (e.g. --bottom 10 --exclude: the "
        "data without its 10 % least supportive clips).",
    )
    id_column: str = option("vid", help="Manifest column of the clip id (of a dataset: when it has one).")
    caption_column: str = option("caption", help="Caption column of a Hugging Face dataset, as encode's.")
    path_column: str | None = option(
        None, help="Video column of a Hugging Face dataset, as encode's (default: video, path, file, ...)."
    )
    manifest_format: str | None = option(
        None, help=f"{choice_help(MANIFEST_FORMATS)} (default: by extension)."
    )

    def validate(self) -> CurateConfig:
        """A known method, exactly one of --top / --bottom / --threshold (in range, no threshold with rank-
        sum) and at least one attribution; returns self.
        """
        check_choice("--method", self.method, CURATE_METHODS)
        chosen = [x for x in (self.top, self.bottom, self.threshold) if x is not None]
        if len(chosen) != 1:
            raise UsageError("give exactly one of --top P, --bottom P or --threshold X")
        for flag, v in (("--top", self.top), ("--bottom", self.bottom)):
            if v is not None and not 0 < v <= 100:
                raise UsageError(f"{flag} {v}: a percentage in (0, 100]")
        if self.threshold is not None and self.method == "rank-sum":
            raise UsageError("--threshold applies to mean and vote; use --top/--bottom with rank-sum")
        if not self.attributions:
            raise UsageError("give at least one attribution JSON")
        return self


# -- report ----------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ReportConfig(StageConfig):
    """`report`: one self-contained HTML page for an attribution JSON."""

    attribution: Path = option(positional=True, help="Attribution JSON from `score`.")
    out: Path = option(Path("report.html"), flags=("--out", "-o"), help="The HTML page to write.")
    frames: int = option(4, help="Frames shown per clip, evenly spaced over those encode took (0: none).")
    run: Path | None = option(
        None,
        help="The run the JSON was scored against (default: the JSON's `run`); clips' frames are read "
        "only from its manifest.",
        show_default="the JSON's run",
    )

    def validate(self) -> ReportConfig:
        """--frames >= 0; returns self."""
        check_min("--frames", self.frames, 0)
        return self


# -- generate --------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class GenerateConfig(StageConfig):
    """`generate`: a video from a prompt with the model's own WanPipeline (a query to attribute)."""

    prompt: str = option(positional=True, help="The text prompt.")
    model: str = model_option(help="Wan2.1 diffusers directory or Hub id (e.g. demo-run/model).")
    out: Path = option(Path("generated.mp4"), flags=("--out", "-o"), help="The MP4 to write.")
    frames: int = option(17, help="Frames, 1 + 4k.")
    size: str = option("64x64", metavar="WxH", help="Frame size WxH, multiples of 16.")
    steps: int = option(12, help="Denoising steps.")
    fps: float = option(8.0, help="Frame rate of the MP4.")
    seed: int = seed_option()
    device: str = device_option()

    def validate(self) -> GenerateConfig:
        """The frame policy, --steps >= 1, --fps > 0 and a non-empty prompt; returns self."""
        FramePolicy(frames=self.frames, height=self.height, width=self.width).validate()
        check_min("--steps", self.steps, 1)
        if self.fps <= 0:
            raise UsageError(f"--fps {self.fps}: must be > 0")
        if not self.prompt.strip():
            raise UsageError("PROMPT is empty")
        return self

    @property
    def width(self) -> int:
        return parse_size(self.size)[0]

    @property
    def height(self) -> int:
        return parse_size(self.size)[1]


# -- frames ----------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class FramesConfig(StageConfig):
    """`frames`: what encode/score would take from a clip under a frame policy, and why."""

    video: Path = option(positional=True, help="The video file to inspect.")
    frames: int = option(17, help="Frames per clip, 1 + 4k.")
    size: str = option("64x64", metavar="WxH", help="Frame size WxH, multiples of 16.")
    fps: float = option(8.0, help="Sampling rate: frame k is the frame displayed at k/fps (0 = consecutive).")
    pad_short: bool = option(False, flags=("--pad-short",), help="Repeat the last frame of a too-short clip.")
    decoder: str = option(
        "auto", help=f"{choice_help(DECODERS, {'auto': ' (decord where it is right, else PyAV)'})}."
    )
    png: Path | None = option(None, help="Write a contact sheet of the frames taken (PNG).")
    npy: Path | None = option(None, help="Write the frames taken as uint8 (F, H, W, 3) .npy.")
    scale: int = option(1, help="Integer upscaling of the contact sheet's tiles.")

    @property
    def policy(self) -> FramePolicy:
        w, h = parse_size(self.size)
        return FramePolicy(frames=self.frames, height=h, width=w, fps=self.fps, pad_short=self.pad_short)

    def validate(self) -> FramesConfig:
        """The frame policy, a known decoder and --scale >= 1; returns self."""
        self.policy.validate()
        check_choice("--decoder", self.decoder, DECODERS)
        check_min("--scale", self.scale, 1)
        return self
