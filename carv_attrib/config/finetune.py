"""`finetune`'s config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carv_attrib.choices import OPTIMIZERS, TRAIN_DTYPES
from carv_attrib.config.checks import check_choice, check_min
from carv_attrib.config.options import (
    StageConfig,
    choice_help,
    density_option,
    device_option,
    draws_option,
    model_option,
    option,
    run_argument,
    seed_option,
    wait_option,
)
from carv_attrib.errors import UsageError


@dataclass(kw_only=True)
class FinetuneConfig(StageConfig):
    """`finetune`: adapt MODEL's transformer (every weight, or a LoRA adapter) to RUN's cached clips
    with the flow-matching objective; OUT is a new directory, MODEL is never written."""

    run: Path = run_argument("Run directory with a latent cache (from encode): the clips to fine-tune on.")
    model: str = model_option(
        help="Wan2.1 diffusers directory or Hub id whose transformer is fine-tuned (read only)."
    )
    out: Path = option(
        flags=("--out", "-o"),
        help="Directory to write: the fine-tuned transformer (diffusers save_pretrained; featurize "
        "--checkpoint OUT), or with --lora the adapter (WanPipeline.load_lora_weights(OUT)). Not inside MODEL.",
    )
    steps: int = option(
        300, help="Optimizer steps in all; rerunning with more continues from the last checkpoint."
    )
    lora: int | None = option(
        None,
        metavar="RANK",
        help="Train a LoRA adapter of this rank on every attention projection (to_q, to_k, to_v, "
        "to_out.0) instead of every weight.",
    )
    lora_alpha: float | None = option(
        None, help="With --lora: the adapter's alpha (its output scaled by alpha / rank; default: the rank)."
    )
    batch_clips: int = option(
        8, flags=("--batch-clips", "-B"), help="Clips per step, drawn with replacement."
    )
    draws: int = draws_option(2, help="(σ, ε) draws per clip per step.")
    lr: float = option(
        1e-4,
        help="Peak learning rate (after a 20-step linear warm-up); the tiny/small presets train at 2e-3.",
    )
    optimizer: str = option("adamw", help=f"{choice_help(OPTIMIZERS)} (SGD with momentum 0.9).")
    density: str = density_option()
    seed: int = seed_option()
    checkpoint_every: int = option(
        100,
        metavar="N",
        help="Steps between resumable checkpoints in OUT/checkpoints (also written on Ctrl-C or SIGTERM and at the end).",
    )
    clips_per_forward: int = option(
        8, help="Clips sharing one forward and backward (fewer hold fewer activations; the same gradient)."
    )
    dtype: str = option(
        "float32",
        help=f"{choice_help(TRAIN_DTYPES)}: bfloat16 runs the forward (and its backward) under bf16 autocast "
        "with float32 master weights, optimizer state and loss (recorded in carv_finetune.json).",
    )
    cache_mb: float = option(
        2048.0,
        metavar="MiB",
        help="Decoded clips (float32 latents + text embeddings) kept in memory between steps, least "
        "recently used evicted; the rest are read from RUN's latent shards as steps draw them (0: none kept).",
    )
    device: str = device_option()
    overwrite: bool = option(
        False,
        flags=("--overwrite",),
        help="Start over in an OUT that holds something else (another finetune's files are replaced).",
    )
    wait: bool = wait_option()
    clip_ids: list[int] | None = option(
        None, cli=False, help="Library: fine-tune on these clips of the run only (all when None)."
    )

    def validate(self) -> FinetuneConfig:
        """The counts, a positive --lr, a known optimizer and dtype, --cache-mb >= 0, --lora-alpha only
        with --lora, and OUT outside a local MODEL; returns self."""
        check_min("--steps", self.steps, 1)
        check_min("--batch-clips", self.batch_clips, 1)
        check_min("--draws", self.draws, 1)
        check_min("--checkpoint-every", self.checkpoint_every, 1)
        check_min("--clips-per-forward", self.clips_per_forward, 1)
        check_choice("--optimizer", self.optimizer, OPTIMIZERS)
        check_choice("--dtype", self.dtype, TRAIN_DTYPES)
        if not self.cache_mb >= 0:
            raise UsageError(f"--cache-mb {self.cache_mb}: must be >= 0")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr}: must be > 0")
        if self.lora is not None:
            check_min("--lora", self.lora, 1)
        if self.lora_alpha is not None:
            if self.lora is None:
                raise UsageError("--lora-alpha applies to a LoRA adapter: give --lora RANK too")
            if not self.lora_alpha > 0:
                raise UsageError(f"--lora-alpha {self.lora_alpha}: must be > 0")
        check_out_outside_model(self.out, self.model)
        return self


def check_out_outside_model(out: Path | str, model: str) -> None:
    """UsageError (exit 2) when OUT is a local MODEL, or inside it (MODEL/transformer included):
    finetune never writes into the model it starts from."""
    base = Path(model)
    if not base.is_dir():
        return  # a Hub id: its cache is not a place anyone names as -o
    target, root = Path(out).resolve(), base.resolve()
    if target == root or root in target.parents:
        raise UsageError(
            f"-o {out} is inside --model {model}: finetune never writes into the model it starts from; "
            "choose an OUT outside it (e.g. a sibling directory)"
        )
