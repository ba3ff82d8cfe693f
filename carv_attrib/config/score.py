"""`score`'s config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from carv_attrib.choices import AGGREGATES, DTYPES, EXECUTORS, OBJECTIVES
from carv_attrib.config.checks import check_choice, check_min
from carv_attrib.config.options import (
    StageConfig,
    batch_clips_option,
    choice_help,
    device_option,
    dtype_option,
    model_option,
    option,
    ray_address_option,
)
from carv_attrib.errors import UsageError
from carv_attrib.video.probe import refuse_still_images


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
    null_prompt: bool = option(
        False,
        flags=("--null-prompt",),
        help='Also rank each query under the empty text "" (classifier-free guidance\'s unconditional '
        "branch; WanPipeline's default negative prompt): its results, and their top-k overlap with the "
        "captioned ones; without --prompt/--prompts, the queries are scored with the empty text only.",
    )
    top_k: int | None = option(10, cli=False, help="Results per query; None: every training clip.")
    aggregate: str = option(
        "none",
        help=f"{choice_help(AGGREGATES, {'mean': ' (mean score)', 'vote': ' (majority over per-query top-k)'})}.",
    )
    model: str | None = model_option(
        None, help="Wan2.1 model (default: the one recorded in RUN; checked against the index either way)."
    )
    lora: Path | None = option(
        None,
        metavar="DIR",
        help="The LoRA adapter the index was featurized with (default: the one recorded in RUN; another "
        "adapter is refused).",
    )
    device: str = device_option()
    dtype: str | None = dtype_option(
        None, help="Transformer compute dtype (default: the one featurize used)."
    )
    workers: int = option(1, help="Decoding processes (0: decode in this process).")
    decode_timeout: float = option(120.0, help="Seconds per query before its decoder is killed.")
    batch_clips: int = batch_clips_option()
    nprobe: int | None = option(None, help="IVF lists probed per query (default: the index's).")
    executor: str = option(
        "local",
        help=f"{choice_help(EXECUTORS)}: an index kept as shards (index --index-shards) is searched shard by "
        "shard and merged, by threads here or by one Ray actor per shard (the same results).",
    )
    ray_address: str | None = ray_address_option()
    objective: str | None = option(
        None,
        help=f"{choice_help(OBJECTIVES)}: the objective the index was built with (default: the index's; another "
        "one is refused, since queries must be featurized like the training clips).",
    )
    explain: bool = option(
        False,
        flags=("--explain",),
        help="Split each result's score over the transformer's blocks and layers, and over timestep "
        "strata (recomputed from the clip's cached latent: one K-draw backward per result clip; kron "
        "features).",
    )
    refine: bool = option(
        False,
        flags=("--refine",),
        help="While a candidate's place in the top-k is unsettled, give the query and its 2k + 10 "
        "candidates the next strata of the index's draws (K → 2K → 4K ..., the same new draws for all), "
        "until it settles or the budget is spent (kron features; cached latents; not --antithetic).",
    )
    refine_budget: int | None = option(
        None,
        help="With --refine: extra (σ, ε) draws per query (default 3·(2k + 11)·K: two levels, K → 4K, for "
        "the query and its 2k + 10 candidates).",
    )
    rerank: int = option(
        10,
        help="With an approximate index: take R·k candidates and re-rank them exactly from the stored "
        "vectors (0: off).",
    )

    def check_early(self) -> ScoreConfig:
        """`validate` before the queries are read from a --prompts FILE that lists them (a stand-in query
        then), so the CLI refuses a bad option before the pipeline imports torch; returns self."""
        stand_in = self.queries or ([Path("(listed in --prompts)")] if self.prompts_file is not None else [])
        dataclasses.replace(self, queries=stand_in).validate()
        # the two prompt rules that need no file read (`pipeline.score.resolve_queries` has them all)
        if self.prompt is not None and self.prompts_file is not None:
            raise UsageError("give either --prompt or --prompts, not both")
        if self.prompt is None and self.prompts_file is None and not self.null_prompt:
            raise UsageError(
                "each query needs its prompt: pass --prompt TEXT (one query) or --prompts FILE "
                "(or --null-prompt alone to score under the empty text)"
            )
        refuse_still_images(self.queries)  # reads 16 bytes of each query; probes only pictures
        return self

    def validate(self) -> ScoreConfig:
        """At least one query, a bool null_prompt, a --prompt that is not blank, the choices, a number of results where --explain or vote
        needs one, the counts and a positive --decode-timeout; returns self.
        """
        if not self.queries:
            raise UsageError("give at least one query video (or a --prompts FILE that lists them)")
        if not isinstance(self.null_prompt, bool):  # a library caller's "yes" would read as True
            raise UsageError(f"null_prompt must be True or False, not {self.null_prompt!r}")
        if self.prompt is not None and not self.prompt.strip():  # as encode refuses an empty caption
            raise UsageError(
                f"--prompt {self.prompt!r} is empty; to attribute under the empty text (the unconditional "
                "branch), pass --null-prompt without --prompt"
            )
        check_choice("--aggregate", self.aggregate, AGGREGATES)
        if self.objective is not None:
            check_choice("--objective", self.objective, OBJECTIVES)
        if self.explain and self.top_k is None:
            raise UsageError(
                "--explain recomputes each result clip's per-stratum gradients (one K-draw backward per "
                "clip): give --top-k N, not all"
            )
        if self.refine and self.top_k is None:
            raise UsageError("--refine settles a top-k: give --top-k N, not all")
        if self.refine and self.explain:
            raise UsageError(
                "--refine and --explain: --explain splits the first K draws' score; run them as two scores"
            )
        if self.refine_budget is not None:
            if not self.refine:
                raise UsageError("--refine-budget needs --refine")
            check_min("--refine-budget", self.refine_budget, 0)
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
        check_choice("--executor", self.executor, EXECUTORS)
        if self.decode_timeout <= 0:
            raise UsageError(f"--decode-timeout {self.decode_timeout}: must be > 0 seconds")
        return self
