"""Stage 1, `encode`: decode every clip once, VAE-encode it once, embed each caption once.

This is the "upstream" work that CARV amortises: paid once per clip and cached in Parquet, then
reused by every featurize run (any K, checkpoint, projection).

    from carv_attrib.pipeline.encode import EncodeConfig, run_encode
    summary = run_encode(EncodeConfig(manifest="data/manifest.json", videos="data/videos",
                                      model="models/tiny-wan", run="runs/demo"))

Output: RUN/latents/part-NNNNN.parquet, one row per encoded clip (failed clips included, with status
and error), see `latent_schema`, then RUN/manifest/clips.parquet, the committed manifest with each
clip's source key (`carv_attrib.store.sources`). A rerun on an edited manifest or edited files encodes
only the clips that are new or changed (`plan_encode`). Decoding runs in worker processes
(`DecodePool`) ahead of the main process, which batches the VAE encodes, so the two overlap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from carv_attrib import __version__
from carv_attrib.config import EncodeConfig, parse_shard
from carv_attrib.config.resume import recorded_options
from carv_attrib.errors import PartialRun
from carv_attrib.models.clip_encoder import ClipEncoder, EncodedClip, EncodeFailure
from carv_attrib.models.identity import ENCODER_COMPONENTS, model_identity, resolve_source
from carv_attrib.models.wan import (
    MAX_SEQUENCE_LENGTH,
    WanModel,
    load_wan,
    resolve_device,
    truncation_warning,
    vae_tiling_decision,
)
from carv_attrib.pipeline._job import ProgressFn, noop, record, run_in_parts
from carv_attrib.store.inputs import read_clips
from carv_attrib.store.latents import empty_latent_row, latent_schema
from carv_attrib.store.live import hashes_in_rows, latent_rows, latent_sha, selection
from carv_attrib.store.lock import run_lock
from carv_attrib.store.manifest import ClipTable
from carv_attrib.store.run import EncodeFacts, RunDir
from carv_attrib.store.shards import ShardStore, fingerprint, now_iso
from carv_attrib.store.sources import FileSurvey, SourcedClips, source_key, survey_files
from carv_attrib.video.decode import DecodedClip
from carv_attrib.video.failures import ClipFailure, failure_message
from carv_attrib.video.motion import MOTION_RULE
from carv_attrib.video.pool import DecodePool

log = logging.getLogger(__name__)

FRAME_SELECTION = "displayed-at-k/fps-v1"

__all__ = ["EncodeConfig", "EncodeSummary", "run_encode"]


LAYOUT = "content-addressed-v1"


def latents_identity(cfg: EncodeConfig, model_ident: dict[str, Any], tiled: bool = False) -> dict[str, Any]:
    """What changes the stored numbers: the fingerprinted stage config. The manifest is not in it: a
    run grows, shrinks and changes clip by clip (`carv_attrib.store.sources`), and the shard size is
    only the unit of resume."""
    policy = cfg.policy
    return (
        {
            "model": model_ident,
            "frames": policy.frames,
            "height": policy.height,
            "width": policy.width,
            "fps": policy.fps,
            # a policy, not an identity: it changes only would-be too_short clips, so it is stored but
            # left out of the fingerprint (`store.shards.POLICY_KEYS`) and a rerun may change it
            "pad_short": policy.pad_short,
            "dtype": cfg.dtype,
            "latent_dtype": cfg.latent_dtype,
            "layout": LAYOUT,
            "text_max_sequence_length": 512,
            "latent": "normalised latent_dist.mode(): (z - latents_mean) / latents_std",
            # frame k = the frame displayed at k/fps after the first displayed one (edit lists, VFR,
            # rotation and SAR honoured; video/decode.py): latents from the older index rule never mix in
            "frame_selection": FRAME_SELECTION,
        }
        | ({"vae_tiling": True} if tiled else {})
        | (  # only when on: other runs keep their fingerprint
            {"motion_masks": MOTION_RULE} if cfg.motion_masks else {}
        )
    )


@dataclass
class EncodePlan:
    """What an encode of `clips` does to the run, against its committed manifest.

    added / changed / removed / unchanged: clips new to the manifest, whose file or caption changed,
    gone from it, or the same; todo: manifest positions to encode (added and changed clips without a
    row yet, clips whose row is missing, failures with --retry-failed); retried: failures re-tried;
    resumed: added or changed clips already encoded by an interrupted run.
    """

    clips: SourcedClips
    todo: list[int]
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    retried: int = 0
    resumed: int = 0
    unhashed: int = 0  # dry run: clips to encode whose file was only stat-ed (`plan_encode`)
    survey: FileSurvey | None = None  # dry run: the stat of every file

    def counts(self) -> dict[str, int]:
        return {
            "added": self.added,
            "changed": self.changed,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "retried": self.retried,
            "resumed": self.resumed,
            "to_encode": len(self.todo),
        }


@dataclass
class EncodeSummary:
    run: str
    total: int  # clips of the manifest now live (committed); a dry run: of the current run
    ok: int
    failed: int
    failures: dict[str, int]
    changes: dict[str, int]  # `EncodePlan.counts()`
    encoded: int  # clips encoded by this invocation
    shards_written: int
    seconds: float
    clips_per_s: float
    fingerprint: str
    dry_run: bool = False
    estimated_s: float | None = None  # dry run: time the encode would take, from a short timing
    # dry run: what stat found (`dry_run_files`): missing / not-a-file counts and examples, no hashing
    files: dict[str, Any] | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few failed clips: vid, status, error
    # Distinct captions this invocation embedded that are longer than 512 UMT5 tokens (embedded truncated,
    # as WanPipeline does: the model never sees the rest), and the longest one's untruncated length.
    truncated_captions: int = 0
    truncated_tokens_max: int | None = None
    warnings: list[str] = field(default_factory=list)  # per-run notes, e.g. truncated captions

    @property
    def failure_rate(self) -> float:
        return self.failed / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The summary as a JSON-able dict (the `--format json` document and run.json's `summary`)."""
        return dataclasses.asdict(self)


def part_of(clips: ClipTable, part: tuple[int, int]) -> ClipTable:
    """The clips of part (I, N): those whose clip_id is I mod N (ids are hashes: parts are even)."""
    i, n = part
    keep = [j for j, cid in enumerate(clips.clip_id) if cid % n == i]
    return ClipTable(
        *([col[j] for j in keep] for col in (clips.clip_id, clips.vid, clips.caption, clips.path))
    )


def plan_encode(
    run: RunDir,
    clips: ClipTable,
    resumes: bool,
    retry_failed: bool,
    part: tuple[int, int] | None = None,
    hash_files: bool = True,
) -> EncodePlan:
    """Identify each clip's file (hashing only files whose stat changed since the committed manifest)
    and compare with the run: what is added, changed, removed, unchanged, and what to encode.
    `resumes`: the latents stage exists with this configuration (else everything is to do); `part`:
    only the clips of part (I, N) (`--shard`), counted alone. `hash_files=False` (the dry run): files
    are only stat-ed (`survey_files`); a regular file whose stat is not on record is counted as to
    encode (added, or changed when the clip was there before) without reading it (`plan.unhashed`)."""
    if part is not None:
        clips = part_of(clips, part)
    previous = SourcedClips.read(run.manifest_table) if resumes else None
    known = previous.known_hashes() if previous else {}
    if resumes:  # and what earlier or interrupted runs and parts recorded in their rows
        known |= hashes_in_rows(run.latents, dict(zip(clips.clip_id, clips.path)))
    survey = None
    if hash_files:
        sourced = SourcedClips.identify(clips, known)
        keys: list[str | None] = list(sourced.keys)
    else:
        survey = survey_files(clips.path, known)
        idents = [survey.ident(j) for j in range(len(clips))]
        keys = [None if i is None else source_key(i, c) for i, c in zip(idents, clips.caption)]
        sourced = SourcedClips(clips, idents, keys)  # type: ignore[arg-type]  # None: not hashed
    del known
    rows = latent_rows(run.latents) if resumes else {}
    before = dict(zip(previous.clips.clip_id, previous.keys)) if previous else {}
    del previous
    plan = EncodePlan(sourced, [], survey=survey)
    for j, (cid, key) in enumerate(zip(clips.clip_id, keys)):
        if key is None:  # dry run, stat not on record: counted as to encode, not read
            plan.unhashed += 1
            kind = "added" if cid not in before else "changed"
            setattr(plan, kind, getattr(plan, kind) + 1)
            plan.todo.append(j)
            continue
        kind = "added" if cid not in before else "changed" if before[cid] != key else "unchanged"
        setattr(plan, kind, getattr(plan, kind) + 1)
        row = rows.get((cid, key))
        if row is None:
            plan.todo.append(j)
        elif row.status != "ok" and retry_failed:
            plan.todo.append(j)
            plan.retried += 1
        elif kind != "unchanged":
            plan.resumed += 1
    gone = set(before) - set(clips.clip_id)
    plan.removed = len(gone if part is None else {c for c in gone if c % part[1] == part[0]})
    return plan


_LISTED = 5  # paths named per kind of absent file in a dry run


def dry_run_files(plan: EncodePlan) -> dict[str, Any]:
    """What a dry run found on disk, from stat alone (`plan.survey`): missing and non-regular files
    (count and the first few paths), the files present, and how many clips to encode are counted
    without reading their file."""
    survey = plan.survey
    assert survey is not None
    paths = plan.clips.clips.path
    todo = np.asarray(plan.todo, np.int64)
    missing = np.flatnonzero(survey.missing)
    odd = np.flatnonzero(~survey.missing & ~survey.regular)
    present_todo = int(np.count_nonzero(survey.regular[todo])) if len(todo) else 0
    return {
        "hashed": False,
        "missing": len(missing),
        "missing_examples": [paths[j] for j in missing[:_LISTED]],
        "not_a_file": len(odd),
        "not_a_file_examples": [paths[j] for j in odd[:_LISTED]],
        "present": int(np.count_nonzero(survey.regular)),
        "to_encode_present": present_todo,
        "to_encode_unhashed": plan.unhashed,
    }


DRY_RUN_PROBES = 200  # files a dry run probes for their length: all of them up to this, else a sample


def predict_short(plan: EncodePlan, policy: Any) -> dict[str, Any]:
    """How many clips to encode would fail `too_short` (or are still images), from a probe of their
    file (one demux pass, `video.probe.probe_video`; no decode of the clip): every present file to
    encode up to DRY_RUN_PROBES, else that many evenly spaced, and the count scaled to all of them
    (`sampled`). `needs_s`: how long a clip must last for the policy (None for fps 0)."""
    from carv_attrib.video.probe import probe_video
    from carv_attrib.video.shortness import needed_seconds, predict_too_short

    todo = plan.todo
    if plan.survey is not None:
        todo = [j for j in todo if plan.survey.regular[j]]
    picked = (
        todo
        if len(todo) <= DRY_RUN_PROBES
        else [todo[int(k)] for k in np.linspace(0, len(todo) - 1, DRY_RUN_PROBES)]
    )
    paths = plan.clips.clips.path
    short, still = [], []
    for j in picked:
        try:
            if predict_too_short(probe_video(paths[j]), policy):
                short.append(paths[j])
        except ClipFailure as exc:  # unreadable files are the encode's per-clip failures; a picture is named
            if exc.kind == "still_image":
                still.append(paths[j])
    scale = len(todo) / len(picked) if picked else 0.0
    return {
        "probed": len(picked),
        "of": len(todo),
        "sampled": len(picked) < len(todo),
        "too_short": round(len(short) * scale),
        "too_short_probed": len(short),
        "too_short_examples": short[:_LISTED],
        "still_image": round(len(still) * scale),
        "still_image_examples": still[:_LISTED],
        "needs_s": needed_seconds(policy),
        "pad_short": bool(policy.pad_short),
    }


class _TextCache:
    """Stored embeddings of distinct captions; bounded, because a real UMT5 row set is ~1 MB."""

    def __init__(self, encoder: ClipEncoder, capacity: int = 2048):
        self.encoder = encoder
        self.capacity = capacity
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.encoded = 0
        self.truncated: dict[str, int] = {}  # sha256 of a caption past 512 tokens -> its token count

    def get_many(self, captions: list[str]) -> list[np.ndarray]:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            for cap, n in zip(missing, self.encoder.token_lengths(missing)):
                if n > MAX_SEQUENCE_LENGTH:  # a digest: an evicted caption embedded again counts once
                    self.truncated[hashlib.sha256(cap.encode()).hexdigest()] = n
            for cap, emb in zip(missing, self.encoder.embed(missing)):
                self._cache[cap] = emb
            self.encoded += len(missing)
        out = []
        for c in captions:
            self._cache.move_to_end(c)
            out.append(self._cache[c])
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return out


def _fill(row: dict[str, Any], out: EncodedClip | EncodeFailure) -> None:
    """A latent row's latent and motion map (or its failure) from the clip's stored form."""
    if isinstance(out, EncodeFailure):
        row.update(status=out.kind, error=out.detail)
        return
    z = out.latent  # (C, T, h, w) latent_dtype
    row.update(latent=z.tobytes(), latent_shape=list(z.shape), latent_dtype=str(z.dtype))
    if out.motion is not None:  # --motion-masks: the flow pooled onto this latent's grid
        row.update(motion=out.motion.tobytes(), motion_shape=list(out.motion.shape))


def _identify_model(cfg: EncodeConfig) -> tuple[dict[str, Any], WanModel | None]:
    """The encoder components' identity (file hashes). A Hub id not in the local cache yet has no
    files to hash: loading downloads it (the loaded model is returned for reuse), then it is hashed."""
    ident = model_identity(cfg.model, ENCODER_COMPONENTS)
    if all(c.get("files") for c in ident["components"].values()):
        return ident, None
    wan = load_wan(cfg.model, ENCODER_COMPONENTS, device=cfg.device, dtype=cfg.dtype)
    return model_identity(cfg.model, ENCODER_COMPONENTS), wan


class _ShardEncoder:
    """Turns decoded clips into latent rows: VAE batches of `batch_size`, captions embedded once per
    distinct text at the end of each shard, then the shard written with its stats."""

    def __init__(
        self, cfg: EncodeConfig, encoder: ClipEncoder, store: ShardStore, table: ClipTable, provenance: dict
    ):
        self.cfg, self.encoder, self.store, self.provenance = cfg, encoder, store, provenance
        self.texts = _TextCache(encoder)
        self.caption_of = dict(zip(table.clip_id, table.caption))
        self.rows: dict[int, list[dict[str, Any]]] = {}
        self.pending: list[tuple[dict[str, Any], DecodedClip]] = []
        self.timers: Counter[str] = Counter()
        self.shard_t0 = time.monotonic()

    def add(
        self, shard: int, row: dict[str, Any], result: DecodedClip | ClipFailure, progress: ProgressFn
    ) -> None:
        self.rows.setdefault(shard, []).append(row)
        if isinstance(result, ClipFailure):
            row.update(status=result.kind, error=failure_message(result, "encode"))
            progress("clip", {"status": result.kind, "vid": row["vid"]})
        else:
            row.update(
                frame_indices=result.indices,
                source_fps=result.source_fps,
                fps=self.cfg.fps,
                decoder=result.decoder,
                frame_timestamps=result.timestamps,
                decode_reasons=result.reasons,
                padded_frames=result.padded,
            )
            self.pending.append((row, result))

    def flush(self, progress: ProgressFn) -> None:
        """VAE-encode the pending clips in one call."""
        if not self.pending:
            return
        t = time.monotonic()
        for (row, _), out in zip(self.pending, self.encoder.encode_frames([c for _, c in self.pending])):
            _fill(row, out)
        self.timers["vae_s"] += time.monotonic() - t
        for r, _ in self.pending:
            progress("clip", {"status": r["status"], "vid": r["vid"]})
        self.pending = []

    def finish_shard(self, shard: int, progress: ProgressFn) -> None:
        """Embed the shard's captions, write it and its done marker."""
        t = time.monotonic()
        shard_rows = self.rows.pop(shard)
        ok_rows = [r for r in shard_rows if r["status"] == "ok"]
        for r, emb in zip(ok_rows, self.texts.get_many([self.caption_of[r["clip_id"]] for r in ok_rows])):
            r.update(text_emb=emb.tobytes(), text_len=emb.shape[0], text_dim=emb.shape[1])  # (L, D)
            r["latent_sha"] = latent_sha(r["latent"], r["text_emb"])
        self.timers["text_s"] += time.monotonic() - t
        kinds = Counter(r["status"] for r in shard_rows)
        stats = {
            "shard": shard,
            "clips": len(shard_rows),
            "ok": kinds.pop("ok", 0),
            "failures": dict(kinds),
            "wall_s": round(time.monotonic() - self.shard_t0, 4),
            **{k: round(v, 4) for k, v in self.timers.items()},
            "finished_at": now_iso(),
        }
        table = pa.Table.from_pylist(shard_rows, schema=latent_schema())
        self.store.write_shard(shard, table, stats, self.provenance)
        progress("shard", stats)
        self.timers.clear()
        self.shard_t0 = time.monotonic()


def _estimate(cfg: EncodeConfig, plan: EncodePlan, facts: EncodeFacts, wan: WanModel | None) -> float:
    """Seconds the encode of `plan` would take: model load plus a timed encode of up to 2 of its clips
    (decode + VAE + caption) scaled to all whose file is present (a missing file or a special file is
    a failure row, not a decode), with the VAE batching of the real run ignored."""
    todo = plan.todo
    if plan.survey is not None:  # the dry run's stat: only present regular files cost a decode
        todo = [j for j in todo if plan.survey.regular[j]]
    if not todo:
        return 0.0
    t0 = time.monotonic()
    wan = wan or load_wan(cfg.model, ENCODER_COMPONENTS, device=cfg.device, dtype=cfg.dtype)
    encoder = ClipEncoder(wan, facts)
    load_s = time.monotonic() - t0
    sample = todo[:2]
    clips = plan.clips.clips
    t1 = time.monotonic()
    for j in sample:
        try:
            decoded = encoder.decode(clips.path[j])
        except ClipFailure:
            continue
        encoder.encode(decoded, clips.caption[j])
    per_clip = (time.monotonic() - t1) / len(sample)
    return round(load_s + per_clip * len(todo), 3)


def run_encode(
    cfg: EncodeConfig, progress: ProgressFn = noop, *, check_failures: bool = False
) -> EncodeSummary:
    """Encode the clips of cfg.manifest that RUN/latents does not hold yet (`_encode`), then record
    the invocation in RUN/run.json (not for a dry run).

    check_failures: apply the failure policy, as the CLI does: raise PartialRun(summary) (exit 3)
    once the run is recorded, when more than cfg.max_failure_rate of the run's clips failed. A
    `--shard` part is not judged (the commit pass without --shard is). Off by default, so that a
    library caller still gets the summary of a run with failed clips as a return value.
    Raises UsageError / ConfigMismatchError (exit 2) before any write, as `_encode`, and
    RunLockedError (exit 2) while another command writes RUN (unless cfg.wait).
    """
    started = time.monotonic()
    # One writer per run (`store.lock`): two encodes planning at once would pick the same shard names.
    # --shard parts share it (they write disjoint shards); a dry run writes nothing and takes none.
    with run_lock(
        cfg.run,
        "encode",
        wait=cfg.wait,
        shared=cfg.shard is not None,
        create=True,
        skip=cfg.dry_run or cfg.lock_held,
    ):
        summary = _encode(cfg, progress)
        if not summary.dry_run:
            record(
                cfg.run,
                "encode",
                device=resolve_device(cfg.device),  # the device it ran on, not "auto"
                started=started,
                summary=summary.to_dict(),
                options=recorded_options(cfg),
            )
    if check_failures and cfg.shard is None and summary.failure_rate > cfg.max_failure_rate:
        raise PartialRun(
            f"too many failures: {summary.failed}/{summary.total} clips "
            f"({summary.failure_rate:.1%} > --max-failure-rate {cfg.max_failure_rate:.1%})",
            summary,
        )
    return summary


def _encode(cfg: EncodeConfig, progress: ProgressFn = noop) -> EncodeSummary:
    """Encode the clips of cfg.manifest that RUN/latents does not hold yet (all of them the first
    time; then what was added or changed, and failures with --retry-failed), then commit the manifest.

    Everything is checked before the first write, so a refused invocation changes nothing; a killed
    one leaves the previous manifest live and its finished shards for the rerun. Raises UsageError /
    ConfigMismatchError (exit 2) for bad options, a bad manifest or a run made with other settings;
    per-clip failures are recorded in the rows.
    """
    t0 = time.monotonic()
    cfg.validate()
    part = parse_shard(cfg.shard)
    run = RunDir(cfg.run)
    table = read_clips(cfg.manifest, cfg.videos, cfg.manifest_options)  # a manifest, tars, a dataset, ...
    ident, wan = _identify_model(cfg)
    policy = cfg.policy
    tiled = vae_tiling_decision(
        cfg.vae_tiling, policy.height, policy.width, cfg.batch_size, cfg.dtype, cfg.device
    )
    config = latents_identity(cfg, ident, tiled)
    facts = EncodeFacts.from_latents_config(config)  # what score and plan read back from the run
    store = run.latents
    resumes = store.check(config, overwrite=cfg.overwrite, what="encode")
    if cfg.executor == "ray" and not cfg.dry_run:
        return _encode_with_ray(cfg, run, config, progress)
    # A dry run stats the files and reads none (10^6 rows: seconds, not the hours hashing takes).
    plan = plan_encode(run, table, resumes, cfg.retry_failed, part, hash_files=not cfg.dry_run)
    progress("plan", plan.counts())
    if cfg.dry_run:
        estimate = _estimate(cfg, plan, facts, wan)
        summary = summarize(run, plan, fingerprint(config), 0, 0, time.monotonic() - t0, estimate)
        summary.files = dry_run_files(plan) | {"length": predict_short(plan, cfg.policy)}
        return summary

    run.root.mkdir(parents=True, exist_ok=True)
    fp = store.prepare(config, overwrite=cfg.overwrite, what="encode")
    table = plan.clips.clips  # the part's clips with --shard
    shards = [plan.todo[s : s + cfg.shard_size] for s in range(0, len(plan.todo), cfg.shard_size)]
    names = store.part_shards(len(shards), part)
    progress("start", {"total": len(table), "todo": len(plan.todo), "shards": len(shards), "skipped": 0})
    if shards:
        wan = wan or load_wan(cfg.model, ENCODER_COMPONENTS, device=cfg.device, dtype=cfg.dtype)
        clip_encoder = ClipEncoder(wan, facts)  # tiles the VAE when the facts say so
        provenance = {"stage": "latents", "fingerprint": fp, "tool_version": __version__, "config": config}
        encoder = _ShardEncoder(cfg, clip_encoder, store, table, provenance)
        sourced = plan.clips
        tasks = [((names[si], j), table.path[j]) for si, shard in enumerate(shards) for j in shard]
        last = {names[si]: shard[-1] for si, shard in enumerate(shards)}
        with DecodePool(  # the flow is computed in the workers too
            cfg.policy, workers=cfg.workers, timeout=cfg.decode_timeout, decode_fn=clip_encoder.decode_fn
        ) as pool:
            t_wait = time.monotonic()
            for (name, j), result in pool.imap(tasks):  # decoding in workers overlaps the VAE here
                encoder.timers["wait_decode_s"] += time.monotonic() - t_wait
                row = empty_latent_row(table.clip_id[j], table.vid[j], sourced.keys[j], sourced.ids[j])
                encoder.add(name, row, result, progress)
                if len(encoder.pending) >= cfg.batch_size or j == last[name]:
                    encoder.flush(progress)
                if j == last[name]:
                    encoder.finish_shard(name, progress)
                t_wait = time.monotonic()
    if part is None:
        plan.clips.write(run.manifest_table)  # the commit: from here on the new manifest is live
    summary = summarize(run, plan, fp, len(plan.todo), len(shards), time.monotonic() - t0)
    if shards:
        note_truncation(
            summary, len(encoder.texts.truncated), max(encoder.texts.truncated.values(), default=0)
        )
    return summary


def note_truncation(summary: EncodeSummary, count: int, longest: int) -> None:
    """Record `count` captions past 512 UMT5 tokens (longest: its untruncated token count) in the
    summary: its counts and a warning line (`truncation_warning`), replacing an earlier one."""
    summary.truncated_captions = count
    summary.truncated_tokens_max = longest if count else None
    summary.warnings = [w for w in summary.warnings if "UMT5 tokens" not in w]
    if count:
        summary.warnings.append(truncation_warning(count) + f" (the longest has {longest} tokens)")


def _encode_with_ray(
    cfg: EncodeConfig, run: RunDir, config: dict[str, Any], progress: ProgressFn
) -> EncodeSummary:
    """`--executor ray`: the stage is created here, its N parts run as Ray tasks (`run_in_parts`), then
    a local pass finds their rows, encodes whatever a part could not, and commits the manifest."""
    # Workers on other nodes start in another directory: every path they get is absolute. The
    # driver's tiling decision goes to every part: an `auto` on another machine could differ.
    cfg = dataclasses.replace(
        cfg,
        manifest=Path(cfg.manifest).resolve(),
        videos=Path(cfg.videos).resolve() if cfg.videos is not None else None,
        run=Path(cfg.run).resolve(),
        model=resolve_source(cfg.model),
        vae_tiling="on" if config.get("vae_tiling") else "off",
    )

    def prepare() -> None:
        run.root.mkdir(parents=True, exist_ok=True)
        run.latents.prepare(config, overwrite=cfg.overwrite, what="encode")

    def merge(final: EncodeSummary, done: list[EncodeSummary]) -> None:
        # The parts' counts partition the clips (each part plans its own); the final pass adds what a
        # part missed (its "resumed" are the parts' work, not new).
        final.changes = {k: sum(p.changes[k] for p in done) for k in final.changes}
        final.changes["to_encode"] += final.encoded
        final.encoded += sum(p.encoded for p in done)
        final.shards_written += sum(p.shards_written for p in done)
        # A caption shared by two parts counts in each (the parts do not share their caption caches).
        parts = [final, *done]
        note_truncation(
            final,
            sum(p.truncated_captions for p in parts),
            max((p.truncated_tokens_max or 0 for p in parts), default=0),
        )

    final = run_in_parts(_encode, cfg, prepare, lambda s: {"encoded": s.encoded}, merge, progress)
    final.clips_per_s = round(final.encoded / final.seconds, 3) if final.encoded else 0.0
    return final


def summarize(
    run: RunDir,
    plan: EncodePlan,
    fp: str,
    encoded: int,
    shards_written: int,
    seconds: float,
    estimated_s: float | None = None,
) -> EncodeSummary:
    """Totals over the live clips (this invocation's and earlier ones'), plus a few failure examples.
    A dry run (estimated_s given) reports the run as it is."""
    live = run.live_latents()
    statuses = live.statuses()
    ok = statuses.pop("ok", 0)
    failed_where = [r.where for r in live.rows if r.status != "ok"][:5]
    examples = [
        row
        for shard, rows in selection(failed_where).items()
        for row in pq.read_table(run.latents.shard_path(shard), columns=["vid", "status", "error"])
        .take(pa.array(rows, pa.int64()))
        .to_pylist()
    ]
    return EncodeSummary(
        run=str(run),
        total=len(live),
        ok=ok,
        failed=sum(statuses.values()),
        failures=statuses,
        changes=plan.counts(),
        encoded=encoded,
        shards_written=shards_written,
        seconds=round(seconds, 3),
        clips_per_s=round(encoded / seconds, 3) if seconds and encoded else 0.0,
        fingerprint=fp,
        dry_run=estimated_s is not None,
        estimated_s=estimated_s,
        examples=examples,
    )
