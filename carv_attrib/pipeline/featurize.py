"""Stage 2, `featurize`: per-clip projected gradients from the latent cache.

For each ok clip of RUN/latents, K (σ, ε) draws reuse its cached latent (the CARV amortisation);
`carv_attrib.attrib.featurizer` turns B clips x K draws into one feature per clip with one backward.

    from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
    summary = run_featurize(FeaturizeConfig(run="runs/demo", model="models/tiny-wan", draws=8))

Output: RUN/features/part-NNNNN.parquet (`carv_attrib.store.features`), appended: each run computes
the live latents that have no feature row yet (`carv_attrib.store.live`), so a grown or edited run
costs only its new and changed clips, and a killed run resumes from its last finished shard.
`featurize_and_index` then builds RUN/index (`carv_attrib.pipeline.index`), as the CLI does.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from carv_attrib import __version__
from carv_attrib.attrib.featurizer import (
    Featurizer,
    build_draw_rule,
    build_projector,
    load_featurizer,
)
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.objective import TIMESTEP_CONVENTION
from carv_attrib.carv.timesteps import Proposal
from carv_attrib.config import FeaturizeConfig, parse_shard
from carv_attrib.config.resume import recorded_options
from carv_attrib.errors import ConfigMismatchError, UsageError
from carv_attrib.interrupt import sigterm_as_interrupt
from carv_attrib.models.identity import check_encoder_matches, checkpoint_identity, resolve_source
from carv_attrib.models.wan import resolve_device
from carv_attrib.pipeline._job import ProgressFn, noop, record, run_in_parts
from carv_attrib.pipeline.index import build_run_index, index_config_keeping, precheck_index
from carv_attrib.store.features import feature_row, feature_schema
from carv_attrib.store.latents import read_latents
from carv_attrib.store.live import LatentRow, LiveFeatures, LiveLatents, selection
from carv_attrib.store.lock import run_lock
from carv_attrib.store.records import IndexInfo, PlanDoc
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import ShardStore, fingerprint, now_iso
from carv_attrib.video.motion import check_objective_inputs, objective_spec

log = logging.getLogger(__name__)

__all__ = [
    "FeaturizeConfig",
    "FeaturizeResult",
    "FeaturizeSummary",
    "featurize_and_index",
    "run_featurize",
    "read_plan_proposal",
    "draw_rule",
]


@dataclass
class FeaturizeSummary:
    run: str
    clips: int  # live ok latents (each has a feature row after the run; a dry run: before it)
    ok: int
    nonfinite: int
    dim: int
    changes: dict[str, int]  # new / changed / unchanged / removed clips, to_compute
    computed: int  # features computed by this invocation
    shards_written: int
    seconds: float
    clips_per_s: float
    fingerprint: str
    density: str
    dry_run: bool = False
    estimated_s: float | None = None  # dry run: from one timed batch
    index: dict[str, Any] | None = None  # after the index build: count, dim, preconditioner, kept

    def to_dict(self) -> dict[str, Any]:
        """The summary as a JSON-able dict (the `--format json` document and run.json's `summary`)."""
        return dataclasses.asdict(self)


@dataclass
class FeaturizeResult:
    """What `featurize_and_index` did: the features' summary, the index it built (None for a dry run
    or a `--shard` part, which leave the index alone) and the index choices it kept from the run's
    previous index ({flag: value}, those that differ from the defaults)."""

    summary: FeaturizeSummary
    index: IndexInfo | None = None
    kept: dict[str, Any] = dataclasses.field(default_factory=dict)


def read_plan_proposal(
    path: Path, output_fn: str, objective: str = "uniform", lora: str | Path | None = None
) -> Proposal:
    """The fitted proposal q of a plan.json, refused (exit 2) when it is missing or was fitted for
    another output function or objective (q is fitted to one output's gradient norms; another's
    would stay unbiased under it but could lose the variance reduction the plan promised)."""
    if not path.exists():
        raise UsageError(f"--plan {path}: no such file")
    plan = PlanDoc.read(path)
    if plan.proposal is None:
        raise UsageError(f"--plan {path}: not a plan.json from `carv-attrib plan` (no 'proposal')")
    plan_fn = plan.output_fn
    if plan_fn != output_fn:
        raise UsageError(
            f"--plan {path} was fitted for --output-fn {plan_fn}, not {output_fn}; featurize "
            f"with --output-fn {plan_fn}, or run `carv-attrib plan ... --output-fn {output_fn}`"
        )
    plan_obj = plan.objective
    if plan_obj != objective:
        raise UsageError(
            f"--plan {path} was fitted for --objective {plan_obj}, not {objective}; featurize with "
            f"--objective {plan_obj}, or run `carv-attrib plan ... --objective {objective}`"
        )
    _check_plan_lora(path, plan.rest.get("lora"), lora)
    return Proposal.from_json(plan.proposal)


def _check_plan_lora(path: Path, planned: dict[str, Any] | None, lora: str | Path | None) -> None:
    """A plan's proposal is fitted to the gradients it piloted: the full model's layers, or one
    adapter's A/B parameters (`plan --lora`, recorded by weights sha256). Featurizing the other kind
    with it stays unbiased but can lose the variance reduction: refused, naming the plan to make."""
    from carv_attrib.models.lora import lora_identity  # peft stays unimported without --lora

    want = None if lora is None else lora_identity(lora)["weights_sha256"]
    have = (planned or {}).get("weights_sha256")
    if want == have:
        return
    if have is None:
        raise UsageError(
            f"--plan {path} was fitted on the model's own layers, not on the adapter --lora {lora}; run "
            f"`carv-attrib plan RUN -m MODEL --lora {lora}` and featurize with that plan"
        )
    if want is None:
        raise UsageError(
            f"--plan {path} was fitted on a LoRA adapter's gradients ({planned.get('path')}); featurize "
            "with that --lora, or make a plan without --lora for the model's own layers"
        )
    raise UsageError(
        f"--plan {path} was fitted on another LoRA adapter ({planned.get('path')}, weights "
        f"{str(have)[:12]}), not --lora {lora} ({want[:12]}); run `carv-attrib plan RUN -m MODEL --lora {lora}`"
    )


def draw_rule(cfg: FeaturizeConfig) -> DrawRule:
    """The DrawRule of a featurize config. p(σ) is --density when given, else the plan's density
    (with --plan), else uniform; an explicit --density that contradicts the plan is refused."""
    proposal = (
        read_plan_proposal(Path(cfg.plan), cfg.output_fn, cfg.objective, cfg.lora)
        if cfg.plan is not None
        else None
    )
    density = cfg.density or (proposal.density if proposal is not None else "uniform")
    return build_draw_rule(
        seed=cfg.seed,
        scheme=cfg.timesteps,
        k=cfg.draws,
        density=density,
        proposal=proposal,
        noise=cfg.noise,
        antithetic=cfg.antithetic,
    )


# What of an adapter's record identifies the features (its path is provenance: the shards' metadata
# and index_info.json keep it for score).
LORA_IDENTITY_KEYS = ("weights_sha256", "rank", "alpha", "targets")


def lora_record(featurizer: Featurizer, lora: str | None) -> dict[str, Any] | None:
    """The adapter the features go through: `lora_identity` (weights sha256, path, carv_lora.json's
    base and training settings) with its rank, alpha and targets; None without --lora."""
    if lora is None:
        return None
    from carv_attrib.models.lora import lora_config, lora_identity

    return lora_identity(lora) | lora_config(featurizer.transformers[0])


def _features_identity(
    cfg: FeaturizeConfig,
    latents_fp: str,
    ckpt_ids: list[dict[str, Any]],
    rule: DrawRule,
    proj_spec: dict[str, Any],
    lora: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What changes the stored features: the fingerprinted stage config (the objective only when it
    is not uniform, and the LoRA adapter only with --lora, so that earlier runs keep their
    fingerprint)."""
    objective = objective_spec(cfg.objective)
    adapter = {"lora": {k: lora.get(k) for k in LORA_IDENTITY_KEYS}} if lora is not None else {}
    return (
        {
            "latents": latents_fp,
            "transformers": [c["fingerprint"] for c in ckpt_ids],
            "draws": rule.to_dict(),
            "output_fn": cfg.output_fn,
            "timestep": TIMESTEP_CONVENTION,
            "projector": {k: v for k, v in proj_spec.items() if k != "rng"},
            "dtype": cfg.dtype,
            "context": "UMT5 embedding zero-padded to 512 tokens, batch 1 broadcast over draws",
        }
        | ({"objective": objective} if objective["kind"] != "uniform" else {})
        | adapter
    )


def _load(cfg: FeaturizeConfig, rule: DrawRule) -> tuple[Featurizer, list[str | None]]:
    # Absolute paths: index_info.json records them for `score`, which may run from anywhere.
    checkpoints: list[str | None] = [str(Path(c).resolve()) for c in cfg.checkpoints] or [None]
    lora = None if cfg.lora is None else str(Path(cfg.lora).resolve())
    featurizer = load_featurizer(
        cfg.model,
        checkpoints,
        rule,
        cfg.output_fn,
        cfg.device,
        cfg.dtype,
        new_projector=lambda t: build_projector(
            cfg.projector,
            t,
            cfg.layers,
            cfg.seed,
            cfg.proj_dim,
            cfg.matrix,
            cfg.kron_shape,
            lora=lora is not None,
        ),
        objective=objective_spec(cfg.objective),
        lora=lora,
    )
    featurizer.draws_per_backward = cfg.draws_per_backward  # memory only: not in the fingerprint
    return featurizer, checkpoints


def _feature_batches(
    featurizer: Featurizer,
    run: RunDir,
    todo: list[tuple[int, str, LatentRow]],
    batch_clips: int,
    n_ckpt: int,
    progress: ProgressFn,
) -> Iterator[list[dict[str, Any]]]:
    """The feature rows of `todo`, one list per backward of B clips (latents streamed: one latent
    shard in memory at a time, clips in shard order)."""
    sha = {cid: row.latent_sha for cid, _, row in todo}
    clips = read_latents(run, selection([row.where for _, _, row in todo]))
    while chunk := list(itertools.islice(clips, batch_clips)):
        feats, losses, draws = featurizer.features(
            [(c.clip_id, c.latent, c.text_emb, c.motion) for c in chunk]
        )
        rows = []
        for c, f, ell, (sigma, w) in zip(chunk, feats, losses, draws):
            rows.append(feature_row(c.clip_id, c.vid, sha[c.clip_id], f, ell, sigma, w, n_ckpt))
            progress("clip", {"status": rows[-1]["status"], "vid": c.vid})
        yield rows


def _changes(live: LiveLatents, feats: LiveFeatures) -> dict[str, int]:
    live_ids = set(live.clip_id)
    changed = sum(cid in feats.had_feature for cid, _, _ in feats.missing)
    return {
        "new": len(feats.missing) - changed,
        "changed": changed,
        "unchanged": len(feats.rows),
        "removed": len(feats.had_feature - live_ids),
        "to_compute": len(feats.missing),
    }


def _estimate(featurizer: Featurizer, run: RunDir, feats: LiveFeatures, cfg: FeaturizeConfig) -> float:
    """Seconds the featurize would take: one timed batch of B clips scaled to all (model load and the
    index build not included)."""
    if not feats.missing:
        return 0.0
    sample = feats.missing[: cfg.batch_clips]
    t = time.monotonic()
    for _ in _feature_batches(featurizer, run, sample, cfg.batch_clips, len(featurizer.blocks), noop):
        pass
    return round((time.monotonic() - t) / len(sample) * len(feats.missing), 3)


def featurize_and_index(
    cfg: FeaturizeConfig, index_options: dict[str, Any] | None = None, progress: ProgressFn = noop
) -> FeaturizeResult:
    """`carv-attrib featurize`: compute the features RUN/features lacks (`run_featurize`), then
    rebuild RUN/index over them, and record the invocation in RUN/run.json (not for a dry run).

    index_options: IndexConfig's fields but `run` ({"precondition": "trak", ...}); a field absent or
    None keeps the run's current index's choice (IndexConfig's default when there is no index yet).
    They are validated, and the index is checked to be buildable for the features' dim and clip
    count, before any feature is computed. A `--shard` part and a dry run leave the index alone.
    Raises UsageError / ConfigMismatchError / RunLockedError (exit 2) as `run_featurize` and
    `build_run_index` do.
    """
    with _lock(cfg):
        return _featurize_and_index(cfg, index_options, progress)


def _lock(cfg: FeaturizeConfig) -> AbstractContextManager[None]:
    """RUN's writer lock for a featurize (`store.lock`): shared by --shard parts (disjoint shards),
    none for a dry run (it writes nothing) or a Ray part (its driver holds it)."""
    return run_lock(
        cfg.run, "featurize", wait=cfg.wait, shared=cfg.shard is not None, skip=cfg.dry_run or cfg.lock_held
    )


def _featurize_and_index(
    cfg: FeaturizeConfig, index_options: dict[str, Any] | None, progress: ProgressFn
) -> FeaturizeResult:
    started = time.monotonic()
    index_cfg, kept = index_config_keeping(cfg.run, dict(index_options or {}))  # refused before the work
    check = (
        None if cfg.shard is not None else (lambda dim, n, blocks: precheck_index(index_cfg, dim, n, blocks))
    )
    summary = run_featurize(cfg, progress, index_check=check)
    if summary.dry_run:
        return FeaturizeResult(summary)
    info = None
    if cfg.shard is None:  # one part of several: the index waits for all of them
        info = build_run_index(index_cfg)
        summary.index = {
            "count": info.count,
            "dim": info.dim,
            "preconditioner": info.preconditioner["kind"],
            "kept": kept,
        }
    record(
        cfg.run,
        "featurize",
        device=resolve_device(cfg.device),  # the device it ran on, not "auto"
        started=started,
        summary=summary.to_dict(),
        options=recorded_options(cfg),
    )
    return FeaturizeResult(summary, info, kept if info is not None else {})


def run_featurize(
    cfg: FeaturizeConfig,
    progress: ProgressFn = noop,
    index_check: Callable[[int, int, list[int]], None] | None = None,
) -> FeaturizeSummary:
    """Compute the features RUN/features lacks: one per live ok latent (all the first time; then the
    clips added or changed since, `carv_attrib.store.live`). Everything is checked before the first
    write. Raises UsageError / ConfigMismatchError (exit 2) for a run without latents, a model that
    did not encode it, or a stage made with other options. `index_check(dim, clips, blocks)` (the CLI's
    `pipeline.index.precheck_index`) refuses an index that could not be built, before any work.
    RunLockedError (exit 2) while another command writes RUN (unless cfg.wait)."""
    with _lock(cfg):
        return _run_featurize(cfg, progress, index_check)


def _run_featurize(
    cfg: FeaturizeConfig,
    progress: ProgressFn = noop,
    index_check: Callable[[int, int, list[int]], None] | None = None,
) -> FeaturizeSummary:
    t0 = time.monotonic()
    cfg.validate()
    part = parse_shard(cfg.shard)
    run = RunDir(cfg.run)
    lat = run.require_latents_record()
    live = run.live_latents()
    if live.pending:
        raise UsageError(
            f"{len(live.pending)} clips of {run}'s manifest have no latents (e.g. {live.pending[0]}): "
            f"an encode was interrupted; rerun the same `carv-attrib encode` first"
        )
    check_encoder_matches(cfg.model, lat.model)
    check_objective_inputs(cfg.objective, lat.config, run)
    rule = draw_rule(cfg)
    featurizer, checkpoints = _load(cfg, rule)
    ckpt_ids = [checkpoint_identity(cfg.model, ck) for ck in checkpoints]
    lora = lora_record(featurizer, None if cfg.lora is None else str(Path(cfg.lora).resolve()))
    config = _features_identity(cfg, lat.fingerprint, ckpt_ids, rule, featurizer.projectors[0].spec(), lora)
    store = run.features
    try:
        resumes = store.check(config, overwrite=cfg.overwrite, what="featurize")
    except ConfigMismatchError as exc:
        before = ((store.read_config() or {}).get("config") or {}).get("lora")
        if (before is None) == (lora is None):
            raise
        # features through an adapter and through the model's layers are two indexes of one run's
        # latents: keep both by copying the run (the latents come along, nothing is re-encoded)
        raise ConfigMismatchError(
            f"{exc}. To keep this run's index and add one {'through the adapter' if lora else 'of the model'}"
            f", copy the run (`cp -r {run.root} {run.root}-{'lora' if lora else 'full'}`: its latents are "
            "reused, nothing is re-encoded) and featurize the copy with --overwrite"
        ) from None
    if index_check is not None:
        index_check(featurizer.dim, len(live.ok()), featurizer.blocks)  # per checkpoint: trak's blocks
    if cfg.executor == "ray" and not cfg.dry_run:
        del featurizer  # the parts load their own; the driver's final pass loads it again
        before = run.live_features(live) if resumes else LiveFeatures({}, live.ok(), set(), 0)
        return _featurize_with_ray(cfg, store, config, progress, _changes(live, before))
    feats = run.live_features(live) if resumes else LiveFeatures({}, live.ok(), set(), 0)
    if part is not None:  # --shard I/N: this part's clips only
        feats.missing = [m for m in feats.missing if m[0] % part[1] == part[0]]
    changes = _changes(live, feats)
    progress("plan", changes)
    if cfg.dry_run:
        estimate = _estimate(featurizer, run, feats, cfg)
        return _summary(run, live, feats, featurizer, rule, fingerprint(config), changes, 0, 0, t0, estimate)

    fp = store.prepare(config, overwrite=cfg.overwrite, what="featurize")
    provenance = {
        "stage": "features",
        "fingerprint": fp,
        "tool_version": __version__,
        "config": config,
        "checkpoints": [c["checkpoint"] for c in ckpt_ids],
        "checkpoint_paths": checkpoints,
        "checkpoint_fingerprints": [c["fingerprint"] for c in ckpt_ids],
        "blocks": featurizer.blocks,
    } | ({"lora": lora} if lora is not None else {})
    todo = feats.missing
    chunks = [todo[s : s + cfg.shard_size] for s in range(0, len(todo), cfg.shard_size)]
    progress("start", {"total": len(live), "todo": len(todo), "shards": len(chunks), "skipped": 0})
    schema = feature_schema(featurizer.dim, len(checkpoints) * cfg.draws)
    written = _write_features(featurizer, run, store, todo, cfg, part, schema, provenance, progress)
    feats = run.live_features(live)
    return _summary(run, live, feats, featurizer, rule, fp, changes, len(todo), written, t0)


def _write_features(
    featurizer: Featurizer,
    run: RunDir,
    store: ShardStore,
    todo: list[tuple[int, str, LatentRow]],
    cfg: FeaturizeConfig,
    part: tuple[int, int] | None,
    schema: pa.Schema,
    provenance: dict[str, Any],
    progress: ProgressFn,
) -> int:
    """Compute `todo` B clips at a time and commit a shard every --shard-size clips, every
    --commit-every seconds of work and when interrupted (Ctrl-C, SIGTERM): a rerun then loses at most
    the batch in flight. Returns the number of shards written."""
    n_ckpt = len(provenance["checkpoint_paths"])
    rows: list[dict[str, Any]] = []
    t_shard = time.monotonic()
    written = 0

    def commit() -> None:
        nonlocal rows, t_shard, written
        if not rows:
            return
        name = store.part_shards(1, part)[0]  # after every done shard, ≡ I mod N: parts never collide
        stats = {
            "shard": name,
            "clips": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows),
            "nonfinite": sum(r["status"] != "ok" for r in rows),
            "wall_s": round(time.monotonic() - t_shard, 4),
            "finished_at": now_iso(),
        }
        store.write_shard(name, pa.Table.from_pylist(rows, schema=schema), stats, provenance)
        progress("shard", stats)
        rows, t_shard, written = [], time.monotonic(), written + 1

    try:
        with sigterm_as_interrupt():
            for batch in _feature_batches(featurizer, run, todo, cfg.batch_clips, n_ckpt, progress):
                rows.extend(batch)
                if len(rows) >= cfg.shard_size or time.monotonic() - t_shard >= cfg.commit_every:
                    commit()
            commit()
    except KeyboardInterrupt:
        commit()  # the finished clips are kept; the batch in flight is recomputed by the rerun
        raise
    return written


def _featurize_with_ray(
    cfg: FeaturizeConfig,
    store: ShardStore,
    config: dict[str, Any],
    progress: ProgressFn,
    changes: dict[str, int],
) -> FeaturizeSummary:
    """`--executor ray`: the stage is created here, its N parts run as Ray tasks (`run_in_parts`),
    then a local pass computes whatever a part could not and reports the run."""
    # Workers on other nodes start in another directory: every path they get is absolute.
    cfg = dataclasses.replace(
        cfg,
        run=Path(cfg.run).resolve(),
        model=resolve_source(cfg.model),
        plan=None if cfg.plan is None else Path(cfg.plan).resolve(),
        lora=None if cfg.lora is None else Path(cfg.lora).resolve(),
        checkpoints=[str(Path(c).resolve()) if Path(c).exists() else c for c in cfg.checkpoints],
    )

    def merge(final: FeaturizeSummary, done: list[FeaturizeSummary]) -> None:
        final.changes = changes  # counted before the parts ran
        final.computed += sum(p.computed for p in done)
        final.shards_written += sum(p.shards_written for p in done)

    final = run_in_parts(
        run_featurize,
        cfg,
        lambda: store.prepare(config, overwrite=cfg.overwrite, what="featurize"),
        lambda s: {"computed": s.computed},
        merge,
        progress,
    )
    final.clips_per_s = round(final.computed / final.seconds, 3) if final.computed else 0.0
    return final


def _summary(
    run: RunDir,
    live: LiveLatents,
    feats: LiveFeatures,
    featurizer: Featurizer,
    rule: DrawRule,
    fp: str,
    changes: dict[str, int],
    computed: int,
    shards: int,
    t0: float,
    estimated_s: float | None = None,
) -> FeaturizeSummary:
    seconds = time.monotonic() - t0
    nonfinite = sum(st != "ok" for _, st in feats.rows.values())
    return FeaturizeSummary(
        run=str(run),
        clips=len(live.ok()),
        ok=len(feats.rows) - nonfinite,
        nonfinite=nonfinite,
        dim=featurizer.dim,
        changes=changes,
        computed=computed,
        shards_written=shards,
        seconds=round(seconds, 3),
        clips_per_s=round(computed / seconds, 3) if computed else 0.0,
        fingerprint=fp,
        density=rule.density,
        dry_run=estimated_s is not None,
        estimated_s=estimated_s,
    )
