"""`featurize`'s and `index`'s configs (featurize also takes index's options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carv_attrib.choices import (
    DTYPES,
    EXECUTORS,
    MATRIX_KINDS,
    NOISE_MODES,
    OBJECTIVES,
    OUTPUT_FNS,
    PRECONDITIONERS,
    PROJECTORS,
    SCHEMES,
    SKETCH_KINDS,
    VECTOR_DTYPES,
)
from carv_attrib.config.checks import check_choice, check_distribution, check_min, parse_kron_dims
from carv_attrib.config.options import (
    DEFAULT_KRON_DIMS,
    DEFAULT_LAYERS,
    DEFAULT_PRECONDITION,
    StageConfig,
    batch_clips_option,
    choice_help,
    density_option,
    device_option,
    draws_option,
    dry_run_option,
    dtype_option,
    executor_option,
    lock_held_option,
    model_option,
    option,
    output_fn_option,
    overwrite_option,
    parts_option,
    ray_address_option,
    run_argument,
    seed_option,
    shard_option,
    timesteps_option,
    wait_option,
)
from carv_attrib.errors import UsageError


@dataclass(kw_only=True)
class IndexConfig(StageConfig):
    """`index`: preconditioner + FAISS index over RUN/features (no gradients recomputed)."""

    run: Path = run_argument("Run directory with features.")
    precondition: str = option(
        DEFAULT_PRECONDITION,
        help=choice_help(
            PRECONDITIONERS,
            {
                "identity": " (TracIn dot product)",
                "trak": " ((ΦᵀΦ+λI)⁻¹)",
                "cosine": " (unit norm per checkpoint block)",
                "normalize": " (train ÷ ‖φ‖^0.5, query unit norm)",
            },
        )
        + ".",
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
        help="With --index-factory: dtype of the exact vectors kept for re-ranking "
        f"({choice_help(VECTOR_DTYPES)}).",
    )
    index_dim: int | None = option(
        None,
        metavar="DIM",
        help="Compress the indexed vectors to DIM dims by a seeded SRHT sketch after the preconditioner "
        "(unbiased inner products; 0: none; unset: the current index's choice, none for a new index; 16384 "
        "lost < 0.01 LDS on the bench worlds).",
    )
    sketch: str = option(
        "srht",
        help=f"With --index-dim: the sketch ({choice_help(SKETCH_KINDS)}; SRHT had the smaller score "
        "error on the bench worlds).",
    )
    sketch_seed: int = option(
        0, metavar="SEED", help="With --index-dim: the sketch's seed (recorded in the index)."
    )
    index_shards: int = option(
        1,
        metavar="S",
        help="Keep the index as S FAISS files over disjoint feature shards, one trained quantizer; score "
        "searches them all and merges the top-k (Flat, IVF, PQ/SQ codes; not HNSW or fast-scan).",
    )
    executor: str = option(
        "local",
        help=f"{choice_help(EXECUTORS)}: fill the trained index in parts as Ray tasks, merged in order into "
        "the bytes of a local build (pip install 'carv-attrib[ray]').",
    )
    ray_address: str | None = ray_address_option()
    parts: int | None = option(
        None,
        help="With --executor ray: number of parts (default: this machine's CPUs, at most one per "
        "feature shard; --index-shards S: S).",
    )
    wait: bool = wait_option()

    def validate(self) -> IndexConfig:
        """A known preconditioner and vector dtype, --nprobe >= 1, --lambda > 0 and --index-dim >= 0
        (below the feature dim: checked when the index is built); returns self."""
        check_choice("--precondition", self.precondition, PRECONDITIONERS)
        check_choice("--vector-dtype", self.vector_dtype, VECTOR_DTYPES)
        check_choice("--sketch", self.sketch, SKETCH_KINDS)
        if self.index_dim is not None:
            check_min("--index-dim", self.index_dim, 0)
        check_min("--sketch-seed", self.sketch_seed, 0)
        if not self.index_dim and (self.sketch != "srht" or self.sketch_seed != 0):
            raise UsageError(
                "--sketch / --sketch-seed choose the --index-dim sketch: give --index-dim DIM too"
            )
        if self.nprobe is not None:
            check_min("--nprobe", self.nprobe, 1)
        if self.lambda_rel <= 0:
            raise UsageError(f"--lambda {self.lambda_rel}: must be > 0")
        check_min("--index-shards", self.index_shards, 1)
        check_choice("--executor", self.executor, EXECUTORS)
        if self.parts is not None:
            check_min("--parts", self.parts, 1)
            if self.executor != "ray":
                raise UsageError("--parts is the number of Ray tasks: give it with --executor ray")
            if self.index_shards > 1 and self.parts != self.index_shards:
                raise UsageError(
                    f"--parts {self.parts} with --index-shards {self.index_shards}: each index shard is "
                    "one part; drop --parts"
                )
        return self


@dataclass(kw_only=True)
class FeaturizeConfig(StageConfig):
    """`featurize`: per-clip projected gradients, K (σ, ε) draws per cached encode."""

    run: Path = run_argument("Run directory with a latent cache (from encode).")
    model: str = model_option(help="Wan2.1 diffusers directory or Hub id (the one that encoded RUN).")
    checkpoints: list[str] = option(
        flags=("--checkpoint",),
        default_factory=list,
        help="Transformer checkpoint (dir or .safetensors); repeat for an ensemble (default: MODEL's).",
        show_default=False,
    )
    draws: int = draws_option()
    timesteps: str = timesteps_option()
    density: str | None = density_option(
        None,
        help="p(σ): uniform | logit-normal:m,s | shift:k (default: the plan's density with --plan, else uniform).",
    )
    plan: Path | None = option(None, help="plan.json from `carv-attrib plan` (its fitted proposal q).")
    output_fn: str = output_fn_option()
    objective: str = option(
        "uniform",
        help=f"{choice_help(OBJECTIVES)}: weight the per-token loss by the clip's motion map (Motive's loss-space "
        "motion mask; needs `encode --motion-masks`), so static background stops dominating.",
    )
    projector: str = option(
        "kron",
        help=f"{choice_help(PROJECTORS, {'kron': ' (per-layer LoGra, default)', 'dense': ' (reference)'})}.",
    )
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
    lora: Path | None = option(
        None,
        metavar="DIR",
        help="A LoRA adapter (diffusers format) trained on MODEL: load it and attribute through its A and B "
        "parameters only (exact gradient when small, else each layer's wide side projected); replaces --layers.",
    )
    matrix: str = option("gaussian", help=f"Projection entries: {choice_help(MATRIX_KINDS)}.")
    seed: int = seed_option()
    noise: str = option(
        "shared",
        help=f"{choice_help(NOISE_MODES, {'shared': ' (common random numbers for all clips and queries)'})}.",
    )
    antithetic: bool = option(False, flags=("--antithetic",), help="Pair draws as (ε, −ε).")
    batch_clips: int = batch_clips_option()
    draws_per_backward: int | None = option(
        None,
        help="Draws per backward pass (default: all B·K in one); fewer hold fewer activations "
        "(one Wan2.1-1.3B draw at 17x480x832 holds ~36 GB in float32). Same features.",
    )
    shard_size: int = option(64, help="Clips per feature shard (the unit of resume).")
    commit_every: float = option(
        60.0,
        help="Seconds of work after which a shard is committed even if it holds fewer than --shard-size "
        "clips (a shard is also committed on Ctrl-C or SIGTERM): an interrupted featurize loses little.",
    )
    device: str = device_option()
    dtype: str = dtype_option()
    dry_run: bool = dry_run_option()
    shard: str | None = shard_option()
    executor: str = executor_option()
    ray_address: str | None = ray_address_option()
    parts: int | None = parts_option()
    overwrite: bool = overwrite_option()
    wait: bool = wait_option()
    lock_held: bool = lock_held_option()

    def validate(self) -> FeaturizeConfig:
        """Each choice, the counts, the distribution flags, one of --proj-dim / --kron-dims (kron only),
        --plan with stratified-is only, and at least one layer glob; returns self.
        """
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
        if not self.commit_every > 0:
            raise UsageError(f"--commit-every {self.commit_every}: give a positive number of seconds")
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
        if self.lora is not None and list(self.layers) != list(DEFAULT_LAYERS):
            raise UsageError(
                "--lora attributes through the adapter's A and B layers: give --lora or --layers, not both"
            )
        return self

    @property
    def kron_shape(self) -> tuple[int, int] | None:
        return parse_kron_dims(self.kron_dims)
