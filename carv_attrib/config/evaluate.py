"""`evaluate`'s config and the smallest study it accepts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carv_attrib.choices import OPTIMIZERS
from carv_attrib.config.checks import check_choice, check_min
from carv_attrib.config.options import (
    StageConfig,
    choice_help,
    density_option,
    device_option,
    model_option,
    option,
    run_argument,
    seed_option,
    wait_option,
)
from carv_attrib.errors import UsageError

MIN_EVAL_TRAIN, MIN_EVAL_QUERIES, MIN_EVAL_SUBSETS = 8, 2, 8


@dataclass(kw_only=True)
class EvaluateConfig(StageConfig):
    """`evaluate`: LDS of featurize settings on RUN, by retraining MODEL (or, with `lora`, the LoRA
    adapter DIR's recipe trains on MODEL) on random halves of its clips."""

    run: Path = run_argument("Run directory with a latent cache (from encode).")
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
    optimizer: str = option("adamw", help=f"{choice_help(OPTIMIZERS)}.")
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
    wait: bool = wait_option()
    ground_truth: Path | None = option(
        None,
        help="JSON of measured subset outputs instead of retraining: {queries: [vid], subsets: [[vid]], "
        "gt_values: [[M x Q]]} (−loss, larger = helped).",
    )
    lora: Path | None = option(
        None,
        metavar="DIR",
        help="Evaluate LoRA attribution: DIR is an adapter `finetune --lora` trained on RUN and MODEL "
        "(its carv_finetune.json gives the recipe); the full adapter and each subset adapter are retrained "
        "with that recipe on the training clips, MODEL frozen, and the settings attribute through the "
        "adapter's A/B gradients. --steps/--lr/--optimizer/--density come from DIR.",
    )
    out: Path = option(Path("evaluation.json"), flags=("--out", "-o"), help="The evaluation JSON to write.")
    plot: Path | None = option(None, help="PNG: LDS with its 95 % CI per setting.")
    seed: int = seed_option()
    device: str = device_option()
    workers: int = option(2, help="Processes for the retrainings (one torch thread each, on the CPU).")

    def validate(self) -> EvaluateConfig:
        """Enough queries and subsets for an LDS, positive counts, a known optimizer, --lr > 0, at least
        one --variant, and --lora with neither --ground-truth nor --full-batch; returns self.
        """
        check_min("--queries", self.queries, MIN_EVAL_QUERIES)
        check_min("--subsets", self.subsets, MIN_EVAL_SUBSETS)
        check_min("--steps", self.steps, 1)
        check_min("--gt-draws", self.gt_draws, 1)
        check_min("--replicates", self.replicates, 1)
        check_min("--train-seeds", self.train_seeds, 1)
        check_choice("--optimizer", self.optimizer, OPTIMIZERS)
        if self.lr <= 0:
            raise UsageError(f"--lr {self.lr}: must be > 0")
        if not self.variant:
            raise UsageError("--variant: give at least one setting")
        if self.lora is not None and self.ground_truth is not None:
            raise UsageError(
                "--lora retrains adapters for its ground truth: give --lora or --ground-truth, not both"
            )
        if self.lora is not None and self.full_batch:
            raise UsageError(
                "--full-batch: with --lora the retrainings follow the adapter's finetune recipe (minibatches)"
            )
        return self
