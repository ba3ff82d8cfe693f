"""One typed config per stage, defined once: the library takes it, the CLI is generated from it.

Every field carries its help text, default and (for the CLI) its flag names in `metadata`, so a
default or a help line exists in exactly one place; `carv_attrib.cli.options` turns a config class
into a Typer command signature, and `validate()` refuses bad values with a `UsageError` (exit 2)
naming the flag. Options that several commands share (`--model`, `--density`, `--output-fn`,
`--draws`, `--device`, `--dtype`, `--seed`, `--overwrite`) are built by one function each below, so
a flag means the same thing in every command (kronfluence's `arguments.py`, sqlite-utils' shared
options).

This module is torch-free: the CLI imports it to build `--help`.

    from carv_attrib.config import FeaturizeConfig
    cfg = FeaturizeConfig(run="runs/demo", model="models/tiny-wan", draws=8).validate()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carv_attrib.choices import (
    DTYPES,
    MATRIX_KINDS,
    NOISE_MODES,
    OBJECTIVES,
    OUTPUT_FNS,
    PRECONDITIONERS,
    PROJECTORS,
    SCHEMES,
)
from carv_attrib.data.manifest import ManifestOptions
from carv_attrib.data.video import FramePolicy
from carv_attrib.errors import UsageError

# Choices the CLI accepts: the extension axes' names live in `carv_attrib.choices`, defined once for
# the configs and the library modules that implement them (and importable from here as before).
LATENT_DTYPES = ("float32", "float16")
AGGREGATES = ("none", "mean", "vote")
FORMATS = ("human", "json", "jsonl")
DEFAULT_LAYERS = ("blocks.*",)
DEFAULT_KRON_DIMS = "16x16"  # = attrib.projection.DEFAULT_K_OUT x DEFAULT_K_IN
# The training loss: the objective whose influence LDS measures, and the fixed reference's output. The
# world suite of bench/factors.py (README, Benchmarks) finds sqnorm (D-TRAK) no better on any world and
# worse where the reference has signal; held-out worlds found the same.
DEFAULT_OUTPUT_FN = "loss"
# Grad-dot (α = 0) tracks the fixed reference where it has signal and fails where a few huge-norm clips
# dominate; cosine (α = 1) is the reverse. α = 0.5 was the only preconditioner at or above the reference
# on every world of bench/factors.py (README, Benchmarks): the default by its worst world.
DEFAULT_PRECONDITION = "normalize"


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flags: tuple[str, ...] | None = None,
    metavar: str | None = None,
    positional: bool = False,
    cli: bool = True,
    default_factory: Any = dataclasses.MISSING,
    show_default: bool | str = True,
) -> Any:
    """A dataclass field with what the CLI needs to expose it (see `carv_attrib.cli.options`).

    flags: the option's names (default `--field-name`); positional: a Typer argument instead;
    cli=False: library-only (not an option).
    """
    meta = {
        "help": help,
        "flags": flags,
        "metavar": metavar,
        "positional": positional,
        "cli": cli,
        "show_default": show_default,
    }
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# -- shared options: one definition each ---------------------------------------------------------
def model_option(default: Any = dataclasses.MISSING, help: str | None = None) -> Any:
    return option(
        default,
        flags=("--model", "-m"),
        help=help
        or "Wan2.1 diffusers directory or Hugging Face Hub id (the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers).",
    )


def density_option(default: str | None = "uniform", help: str | None = None) -> Any:
    return option(
        default,
        help=help or "p(σ), the model's training timestep density: uniform | logit-normal:m,s | shift:k.",
    )


def output_fn_option() -> Any:
    return option(
        DEFAULT_OUTPUT_FN,
        help="Output whose gradient is attributed: loss = mean((v − (ε − z))²), the training objective | sqnorm = mean(v²) (D-TRAK).",
    )


def draws_option(default: int = 8, help: str = "(σ, ε) draws per cached encode.") -> Any:
    return option(default, flags=("--draws", "-K"), help=help)


def device_option(default: str = "auto") -> Any:
    return option(default, help="auto | cpu | cuda | cuda:N | mps (auto: cuda, then mps, then cpu).")


def dtype_option(default: str | None = "float32", help: str | None = None) -> Any:
    return option(default, help=help or "Model compute dtype: float32 | bfloat16 | float16.")


def seed_option() -> Any:
    return option(0, help="The one seed every random quantity derives from.")


def dry_run_option() -> Any:
    return option(
        False,
        flags=("--dry-run",),
        help="Print what would be done (new / changed / unchanged clips, estimated time) and write nothing.",
    )


EXECUTORS = ("local", "ray")


def shard_option() -> Any:
    return option(
        None,
        metavar="I/N",
        help="Do part I of N (the clips whose id is I mod N) for workers you schedule (SLURM arrays); "
        "a run without --shard afterwards commits the parts (encode) or builds the index (featurize).",
    )


def executor_option() -> Any:
    return option(
        "local",
        help="local | ray: N parts as Ray tasks (pip install 'carv-attrib[ray]'), a GPU each when the "
        "cluster has them; a task whose worker dies is retried and redoes only its unfinished shard.",
    )


def ray_address_option() -> Any:
    return option(
        None,
        help="With --executor ray: auto (a running cluster) | local (start one here) | HOST:PORT "
        "(default: $RAY_ADDRESS, else local).",
    )


def parts_option() -> Any:
    return option(
        None, help="With --executor ray: number of parts (default: the cluster's GPUs, else its nodes)."
    )


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' → (I, N) with 0 <= I < N; None stays None. UsageError naming --shard otherwise."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise UsageError(f"--shard {text}: give I/N, e.g. 0/4 for the first of 4 parts") from None
    if not 0 <= i < n:
        raise UsageError(
            f"--shard {text}: I must be in 0..N-1 (here 0..{n - 1})"
            if n > 0
            else f"--shard {text}: N must be at least 1"
        )
    return i, n


def check_distribution(cfg: Any) -> None:
    """The --shard / --executor / --parts combination of an encode or featurize config."""
    parse_shard(cfg.shard)
    check_choice("--executor", cfg.executor, EXECUTORS)
    if cfg.shard is not None and cfg.executor != "local":
        raise UsageError("--shard is a part of a local run; --executor ray makes its own parts")
    if cfg.shard is not None and cfg.overwrite:
        raise UsageError(
            "--overwrite with --shard would let each part discard the others' work; start the parts "
            "on a new --run (or delete the stage's folder first)"
        )
    if cfg.parts is not None:
        check_min("--parts", cfg.parts, 1)


def overwrite_option() -> Any:
    return option(False, flags=("--overwrite",), help="Discard a stage made with another configuration.")


def batch_clips_option(default: int = 4) -> Any:
    return option(default, flags=("--batch-clips", "-B"), help="Clips per forward+backward.")


# -- validation helpers ------------------------------------------------------------------------
def check_choice(flag: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value}: choose one of {', '.join(choices)}")


def check_min(flag: str, value: float, low: float) -> None:
    if value < low:
        raise UsageError(f"{flag} {value}: must be >= {low:g}")


def parse_size(text: str) -> tuple[int, int]:
    """'832x480' → (width, height)."""
    try:
        w, h = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise UsageError(f"--size {text}: expected WxH, e.g. 64x64") from None
    return w, h


def parse_kron_dims(text: str | None) -> tuple[int, int] | None:
    """'16x8' → (16, 8) = (k_out, k_in)."""
    if text is None:
        return None
    try:
        k_out, k_in = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise UsageError(f"--kron-dims {text}: expected OUTxIN, e.g. 16x8") from None
    if k_out < 1 or k_in < 1:
        raise UsageError(f"--kron-dims {text}: both sizes must be >= 1")
    return k_out, k_in


class StageConfig:
    """Mixin: `validate()` returns self so configs can be built and checked in one expression."""

    def validate(self) -> Any:
        return self

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


# -- encode ----------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class EncodeConfig(StageConfig):
    """`encode`: decode every clip once, VAE-encode it once, embed each caption once."""

    manifest: Path = option(positional=True, help="Manifest: VidGen JSON, JSONL, CSV or Parquet.")
    model: str = model_option()
    run: Path = option(flags=("--run", "-r"), help="Run directory to create or resume.")
    videos: Path | None = option(
        None, help="Videos root: manifest paths are relative to it (VIDEOS/<id>.mp4 by default)."
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
        help="auto | on | off: tile the VAE encode (less memory, slightly different latents); auto: when "
        "an untiled batch would not fit in the device's free memory.",
    )
    workers: int = option(2, help="Decoding processes (0 = decode in this process).")
    device: str = device_option()
    dtype: str = dtype_option()
    latent_dtype: str = option(
        "float32", help="Storage dtype of latents and text embeddings: float32 | float16."
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
        None, help="Manifest column of the video path (default: 'path' when present)."
    )
    manifest_format: str | None = option(None, help="vidgen | jsonl | csv | parquet (default: by extension).")
    allow_absolute_paths: bool = option(
        False, flags=("--allow-absolute-paths",), help="Accept manifest paths outside the videos root."
    )
    overwrite: bool = overwrite_option()

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
        self.policy.validate()
        check_choice("--latent-dtype", self.latent_dtype, LATENT_DTYPES)
        check_choice("--vae-tiling", self.vae_tiling, ("auto", "on", "off"))
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


# -- featurize / index -----------------------------------------------------------------------------
@dataclass(kw_only=True)
class IndexConfig(StageConfig):
    """`index`: preconditioner + FAISS index over RUN/features (no gradients recomputed)."""

    run: Path = option(positional=True, help="Run directory with features.")
    precondition: str = option(
        DEFAULT_PRECONDITION,
        help="identity (TracIn dot product) | trak ((ΦᵀΦ+λI)⁻¹) | cosine (unit norm per checkpoint block) | normalize (train ÷ ‖φ‖^0.5, query unit norm).",
    )
    lambda_rel: float = option(
        1e-2,
        flags=("--lambda",),
        help="TRAK damping λ relative to the mean non-zero eigenvalue of ΦᵀΦ, tr/min(n, d).",
    )
    index_factory: str | None = option(
        None, help="FAISS factory for large runs, e.g. IVF4096,SQ8 for 10^6 clips (default: exact Flat)."
    )
    nprobe: int | None = option(
        None, help="IVF lists probed per query (default nlist/16, at least 8; widened until k hits)."
    )
    vector_dtype: str = option(
        "float16",
        help="With --index-factory: dtype of the exact vectors kept for re-ranking (float16 | float32 | none).",
    )

    def validate(self) -> IndexConfig:
        check_choice("--precondition", self.precondition, PRECONDITIONERS)
        check_choice("--vector-dtype", self.vector_dtype, ("float16", "float32", "none"))
        if self.nprobe is not None:
            check_min("--nprobe", self.nprobe, 1)
        if self.lambda_rel <= 0:
            raise UsageError(f"--lambda {self.lambda_rel}: must be > 0")
        return self


@dataclass(kw_only=True)
class FeaturizeConfig(StageConfig):
    """`featurize`: per-clip projected gradients, K (σ, ε) draws per cached encode."""

    run: Path = option(positional=True, help="Run directory with a latent cache (from encode).")
    model: str = model_option(help="Wan2.1 diffusers directory or Hub id (the one that encoded RUN).")
    checkpoints: list[str] = option(
        flags=("--checkpoint",),
        default_factory=list,
        help="Transformer checkpoint (dir or .safetensors); repeat for an ensemble (default: MODEL's).",
        show_default=False,
    )
    draws: int = draws_option()
    timesteps: str = option("stratified-is", help="iid | stratified | stratified-is.")
    density: str | None = density_option(
        None,
        help="p(σ): uniform | logit-normal:m,s | shift:k (default: the plan's density with --plan, else uniform).",
    )
    plan: Path | None = option(None, help="plan.json from `carv-attrib plan` (its fitted proposal q).")
    output_fn: str = output_fn_option()
    objective: str = option(
        "uniform",
        help="uniform | motion: weight the per-token loss by the clip's motion map (Motive's loss-space "
        "motion mask; needs `encode --motion-masks`), so static background stops dominating.",
    )
    projector: str = option("kron", help="kron (per-layer LoGra, default) | dense (reference).")
    proj_dim: int | None = option(
        None,
        help="Total feature dim per checkpoint, split over layers (default kron: --kron-dims per layer).",
    )
    kron_dims: str | None = option(
        None,
        metavar="OUTxIN",
        help=f"kron: k_out x k_in per Linear layer (default {DEFAULT_KRON_DIMS}; D = layers x k_out x k_in).",
    )
    layers: list[str] = option(
        default_factory=lambda: list(DEFAULT_LAYERS),
        help="Glob on Linear module names (repeatable).",
    )
    matrix: str = option("gaussian", help="Projection entries: gaussian | rademacher.")
    seed: int = seed_option()
    noise: str = option("shared", help="shared (common random numbers for all clips and queries) | per-clip.")
    antithetic: bool = option(False, flags=("--antithetic",), help="Pair draws as (ε, −ε).")
    batch_clips: int = batch_clips_option()
    draws_per_backward: int | None = option(
        None,
        help="Draws per backward pass (default: all B·K in one); fewer hold fewer activations "
        "(one Wan2.1-1.3B draw at 17x480x832 holds ~36 GB in float32). Same features.",
    )
    shard_size: int = option(64, help="Clips per feature shard (the unit of resume).")
    device: str = device_option()
    dtype: str = dtype_option()
    dry_run: bool = dry_run_option()
    shard: str | None = shard_option()
    executor: str = executor_option()
    ray_address: str | None = ray_address_option()
    parts: int | None = parts_option()
    overwrite: bool = overwrite_option()

    def validate(self) -> FeaturizeConfig:
        check_choice("--timesteps", self.timesteps, SCHEMES)
        check_choice("--output-fn", self.output_fn, OUTPUT_FNS)
        check_choice("--objective", self.objective, OBJECTIVES)
        check_choice("--projector", self.projector, PROJECTORS)
        check_choice("--matrix", self.matrix, MATRIX_KINDS)
        check_choice("--noise", self.noise, NOISE_MODES)
        check_choice("--dtype", self.dtype, DTYPES)
        check_min("--draws", self.draws, 1)
        check_min("--batch-clips", self.batch_clips, 1)
        check_min("--shard-size", self.shard_size, 1)
        if self.draws_per_backward is not None:
            check_min("--draws-per-backward", self.draws_per_backward, 1)
        check_distribution(self)
        if self.proj_dim is not None:
            check_min("--proj-dim", self.proj_dim, 1)
        dims = parse_kron_dims(self.kron_dims)
        if self.projector == "kron" and self.proj_dim and dims:
            raise UsageError("give --proj-dim (a total) or --kron-dims (per layer), not both")
        if self.projector == "dense" and dims:
            raise UsageError("--kron-dims applies to --projector kron only; give --proj-dim for dense")
        if self.plan is not None and self.timesteps != "stratified-is":
            raise UsageError(f"--plan gives a proposal for --timesteps stratified-is, not {self.timesteps}")
        if not self.layers:
            raise UsageError("--layers: give at least one glob")
        return self

    @property
    def kron_shape(self) -> tuple[int, int] | None:
        return parse_kron_dims(self.kron_dims)


# -- score -----------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ScoreConfig(StageConfig):
    """`score`: the training clips that shaped each query video, best first."""

    queries: list[Path] = option(
        positional=True,
        default_factory=list,
        help="Generated video(s) to attribute (none: the videos listed in --prompts FILE).",
        show_default=False,
    )
    run: Path = option(flags=("--run", "-r"), help="Run directory with an index.")
    prompt: str | None = option(None, flags=("--prompt", "-p"), help="The prompt of the (single) query.")
    prompts_file: Path | None = option(
        None, flags=("--prompts",), help="JSON {path: prompt} or CSV path,prompt: one prompt per query."
    )
    top_k: int | None = option(10, cli=False, help="Results per query; None: every training clip.")
    aggregate: str = option("none", help="none | mean (mean score) | vote (majority over per-query top-k).")
    model: str | None = model_option(
        None, help="Wan2.1 model (default: the one recorded in RUN; checked against the index either way)."
    )
    device: str = device_option()
    dtype: str | None = dtype_option(
        None, help="Transformer compute dtype (default: the one featurize used)."
    )
    workers: int = option(1, help="Decoding processes (0: decode in this process).")
    decode_timeout: float = option(120.0, help="Seconds per query before its decoder is killed.")
    batch_clips: int = batch_clips_option()
    nprobe: int | None = option(None, help="IVF lists probed per query (default: the index's).")
    objective: str | None = option(
        None,
        help="uniform | motion: the objective the index was built with (default: the index's; another "
        "one is refused, since queries must be featurized like the training clips).",
    )
    explain: bool = option(
        False,
        flags=("--explain",),
        help="Split each result's score over the transformer's blocks and layers, and over timestep "
        "strata (recomputed from the clip's cached latent: one K-draw backward per result clip; kron "
        "features).",
    )
    rerank: int = option(
        10,
        help="With an approximate index: take R·k candidates and re-rank them exactly from the stored "
        "vectors (0: off).",
    )

    def validate(self) -> ScoreConfig:
        if not self.queries:
            raise UsageError("give at least one query video (or a --prompts FILE that lists them)")
        check_choice("--aggregate", self.aggregate, AGGREGATES)
        if self.objective is not None:
            check_choice("--objective", self.objective, OBJECTIVES)
        if self.explain and self.top_k is None:
            raise UsageError(
                "--explain recomputes each result clip's per-stratum gradients (one K-draw backward per "
                "clip): give --top-k N, not all"
            )
        if self.aggregate == "vote" and self.top_k is None:
            raise UsageError("--aggregate vote counts each query's top k: give --top-k N, not all")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError("--top-k must be >= 1 or 'all'")
        if self.dtype is not None:
            check_choice("--dtype", self.dtype, DTYPES)
        check_min("--workers", self.workers, 0)
        check_min("--batch-clips", self.batch_clips, 1)
        if self.nprobe is not None:
            check_min("--nprobe", self.nprobe, 1)
        if self.decode_timeout <= 0:
            raise UsageError(f"--decode-timeout {self.decode_timeout}: must be > 0 seconds")
        return self


def parse_top_k(text: str) -> int | None:
    """'10' → 10, 'all' → None (every training clip)."""
    if str(text).lower() == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        raise UsageError(f"--top-k {text!r}: a positive integer or 'all'") from None
    if k < 1:
        raise UsageError("--top-k must be >= 1 or 'all'")
    return k


# -- plan ------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class PlanConfig(StageConfig):
    """`plan`: pilot costs, per-σ-bin gradient moments, the fitted proposal q(σ), ECM per scheme."""

    run: Path = option(positional=True, help="Run directory with a latent cache.")
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
    replicates: int = option(6, help="Independent seeds per scheme for the variance.")
    mix: float = option(0.1, help="α in q = (1−α) q* + α p (so w = p/q ≤ 1/α).")
    density: str = density_option()
    output_fn: str = output_fn_option()
    objective: str = option(
        "uniform",
        help="uniform | motion: fit the plan for the objective you will featurize with (motion needs "
        "`encode --motion-masks`); `featurize --plan` refuses a plan fitted for another.",
    )
    k_max: int = option(64, help="Largest K to consider.")
    batch_clips: int = batch_clips_option()
    proj_dim: int | None = option(None, help=f"Pilot feature dim (default: {DEFAULT_KRON_DIMS} per layer).")
    layers: list[str] = option(
        default_factory=lambda: list(DEFAULT_LAYERS), help="Glob on Linear module names (repeatable)."
    )
    seed: int = seed_option()
    device: str = device_option()
    dtype: str = dtype_option()

    def validate(self) -> PlanConfig:
        check_choice("--objective", self.objective, OBJECTIVES)
        check_choice("--output-fn", self.output_fn, OUTPUT_FNS)
        check_choice("--dtype", self.dtype, DTYPES)
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


# -- demo ------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class DemoConfig(StageConfig):
    """`demo`: tiny Wan2.1 pipeline + synthetic clips, then every stage, then a generated video scored."""

    out: Path = option(
        Path("demo-run"), positional=True, help="Directory for the model, data, run and results."
    )
    clips: int = option(24, flags=("--clips", "-n"), help="Synthetic training clips.")
    preset: str = option("tiny", help="Model preset: tiny | small | medium.")
    frames: int = option(17, help="Frames per clip, 1 + 4k.")
    size: str = option("64x64", metavar="WxH", help="Frame size WxH, multiples of 16.")
    train_steps: int = option(150, help="Flow-matching steps before attribution (0: none).")
    draws: int = draws_option()
    timesteps: str = option("stratified-is", help="iid | stratified | stratified-is.")
    precondition: str = option(DEFAULT_PRECONDITION, help="identity | trak | cosine | normalize.")
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
        FramePolicy(frames=self.frames, width=self.width, height=self.height).validate()
        check_choice("--preset", self.preset, ("tiny", "small", "medium"))
        check_min("--clips", self.clips, 2)
        check_min("--draws", self.draws, 1)
        check_min("--train-steps", self.train_steps, 0)
        check_min("--workers", self.workers, 0)
        check_choice("--timesteps", self.timesteps, SCHEMES)
        check_choice("--precondition", self.precondition, PRECONDITIONERS)
        check_min("--top-k", self.top_k, 1)
        return self


# -- curate ----------------------------------------------------------------------------------------
CURATE_METHODS = ("mean", "rank-sum", "vote")


@dataclass(kw_only=True)
class CurateConfig(StageConfig):
    """`curate`: many attribution JSONs -> a per-clip aggregate and a subset manifest."""

    attributions: list[Path] = option(positional=True, help="Attribution JSONs from `score` (one index).")
    manifest: Path = option(help="The training manifest to take the subset from (its own format is kept).")
    out: Path = option(flags=("--out", "-o"), help="The subset manifest to write.")
    csv: Path | None = option(None, help="Also write the per-clip aggregate as CSV.")
    method: str = option(
        "mean",
        help="mean (mean score over the queries, a clip absent from a top-k counts its score as the "
        "query's k-th) | rank-sum (sum of ranks, absent = k+1; lower is more influential) | vote "
        "(queries with the clip in their top-k, Motive-style).",
    )
    top: float | None = option(None, help="Keep the top P % of the clips by the method.")
    bottom: float | None = option(
        None, help="Keep the bottom P % (the least supportive: harmful candidates)."
    )
    threshold: float | None = option(None, help="Keep clips whose aggregate is at least this (mean, vote).")
    id_column: str = option("vid", help="Manifest column of the clip id.")
    manifest_format: str | None = option(None, help="vidgen | jsonl | csv | parquet (default: by extension).")

    def validate(self) -> CurateConfig:
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

    def validate(self) -> ReportConfig:
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
    decoder: str = option("auto", help="auto (decord where it is right, else PyAV) | pyav.")
    png: Path | None = option(None, help="Write a contact sheet of the frames taken (PNG).")
    npy: Path | None = option(None, help="Write the frames taken as uint8 (F, H, W, 3) .npy.")
    scale: int = option(1, help="Integer upscaling of the contact sheet's tiles.")

    @property
    def policy(self) -> FramePolicy:
        w, h = parse_size(self.size)
        return FramePolicy(frames=self.frames, height=h, width=w, fps=self.fps, pad_short=self.pad_short)

    def validate(self) -> FramesConfig:
        self.policy.validate()
        check_choice("--decoder", self.decoder, ("auto", "pyav"))
        check_min("--scale", self.scale, 1)
        return self


# -- evaluate --------------------------------------------------------------------------------------
MIN_EVAL_TRAIN, MIN_EVAL_QUERIES, MIN_EVAL_SUBSETS = 8, 2, 8


@dataclass(kw_only=True)
class EvaluateConfig(StageConfig):
    """`evaluate`: LDS of featurize settings on RUN, by retraining MODEL on random halves of its clips."""

    run: Path = option(positional=True, help="Run directory with a latent cache (from encode).")
    model: str = model_option(help="Wan2.1 model whose transformer is the shared init of every retraining.")
    variant: list[str] = option(
        flags=("--variant",),
        default_factory=lambda: ["default", "iid"],
        help="Setting(s) to score (repeatable): default, iid, stratified, identity, cosine, normalize, trak, "
        "kron-8x8, kron-32x32, all-linear, loss, sqnorm, K4, K32; the fixed reference (training loss, all parameters, "
        "unprojected; small models only): exact-crn-8, exact-per-clip-8, exact-crn-256, exact-per-clip-256, "
        "exact-crn-256-cosine, exact-crn-256-adam.",
    )
    queries: int = option(8, help="Clips of RUN held out as queries (seeded choice).")
    subsets: int = option(16, help="Random halves of the training clips, one retrained model each.")
    steps: int = option(50, help="Fine-tuning steps of the full model and of every subset model.")
    lr: float = option(1e-3, help="Learning rate of the retrainings.")
    optimizer: str = option("adamw", help="adamw | sgd.")
    full_batch: bool = option(
        False, help="Every training clip at every step (deterministic: models differ by their data only)."
    )
    train_seeds: int = option(
        1,
        help="Models per subset (training seeds), their query losses averaged: tames minibatch order noise.",
    )
    density: str = density_option(
        help="p(σ) the model was trained with: of the retrainings, the ground-truth loss, the reference and the "
        "settings' draws."
    )
    gt_draws: int = option(64, help="Fixed draws of each query's ground-truth loss.")
    replicates: int = option(3, help="Projection and estimator seeds per setting (the CI covers them).")
    ground_truth: Path | None = option(
        None,
        help="JSON of measured subset outputs instead of retraining: {queries: [vid], subsets: [[vid]], "
        "gt_values: [[M x Q]]} (−loss, larger = helped).",
    )
    out: Path = option(Path("evaluation.json"), flags=("--out", "-o"), help="The evaluation JSON to write.")
    plot: Path | None = option(None, help="PNG: LDS with its 95 % CI per setting.")
    seed: int = seed_option()
    device: str = device_option()
    workers: int = option(2, help="Processes for the retrainings (one torch thread each, on the CPU).")

    def validate(self) -> EvaluateConfig:
        check_min("--queries", self.queries, MIN_EVAL_QUERIES)
        check_min("--subsets", self.subsets, MIN_EVAL_SUBSETS)
        check_min("--steps", self.steps, 1)
        check_min("--gt-draws", self.gt_draws, 1)
        check_min("--replicates", self.replicates, 1)
        check_min("--train-seeds", self.train_seeds, 1)
        check_choice("--optimizer", self.optimizer, ("adamw", "sgd"))
        if self.lr <= 0:
            raise UsageError(f"--lr {self.lr}: must be > 0")
        if not self.variant:
            raise UsageError("--variant: give at least one setting")
        return self
