"""`finetune`: adapt a Wan2.1 transformer to a run's clips, from the latent cache, resumably.

    from carv_attrib.pipeline.finetune import FinetuneConfig, run_finetune
    summary = run_finetune(FinetuneConfig(run="runs/demo", model="models/wan", out="ft/", steps=500))
    summary = run_finetune(FinetuneConfig(run="runs/demo", model="models/wan", out="lora/", lora=16))

The clips are RUN's live ok latents and text embeddings (`store.latents`), never re-decoded;
finetune writes nothing in RUN. Which clips, and their shapes, are read once under RUN's lock taken
shared (`store.lock.read_lock`: no encode is in the middle of changing the run meanwhile), and as much
of the cache as --cache-mb holds is read then too. The rest is streamed (`_LatentCache`): each step
reads the clips it drew that are not held, shard by shard (only the latent and text columns, only
their rows kept), and checks each row is the one that was live at the start (clip id and
latent_sha; a run changed since is a UsageError, the last checkpoint kept). The bits a step trains on
are the same whichever way a clip arrived, so --cache-mb changes memory and reads, never the weights.

Memory: the decoded clips held (float32: 4 bytes x (C·T·h·w + L·D) each) stay under
max(--cache-mb, one step's drawn clips (at most --batch-clips)), least recently used evicted;
reading a shard briefly holds its latent and text columns.
The model, its gradients and the optimizer state come on top (unchanged by the cache).

The loss is the flow-matching objective of `carv.objective.clip_objective` ("loss", unit weights)
with σ ~ p(σ) = --density, minimised with the steps of `models.train` (AdamW or SGD, 20-step warm-up,
gradient norm clipped to 1). --dtype bfloat16 runs the forward (and so its backward) under bf16
autocast (`models.train.MixedPrecision`) with float32 master weights, optimizer state, gradient
clipping and loss; --dtype float32 (the default) is plain float32, bitwise what it always was.

OUT holds:
- without --lora: the fine-tuned transformer (`save_pretrained`: config.json + safetensors), usable
  as `featurize --checkpoint OUT` or `WanTransformer3DModel.from_pretrained(OUT)`;
- with --lora RANK: a diffusers LoRA directory (`models.lora.save_lora`), loadable with
  `WanPipeline.load_lora_weights(OUT)`;
- carv_finetune.json: the settings (objective, density, optimizer, lr, steps, batch, seed, the run's
  latents fingerprint and live digest, the base model's identity), their fingerprint, the losses;
- checkpoints/step-NNNNNNNN.pt: the latest resumable state (trainable weights, optimizer, schedule,
  the sampling generator's and torch's RNG states, the step, the losses), written atomically every
  --checkpoint-every steps, on Ctrl-C or SIGTERM (a batch scheduler's stop) and at the end.

A rerun with the same settings continues from the latest checkpoint (or says it is done); --steps may
grow (the schedule does not depend on the total). All of a step's randomness comes from one
generator whose state is checkpointed with the weights, so an interrupted and resumed fine-tune
gives bitwise the weights of an uninterrupted one (same device and thread count).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carv_attrib import __version__
from carv_attrib.atomic import atomic_path
from carv_attrib.carv.objective import TIMESTEP_CONVENTION
from carv_attrib.carv.timesteps import density as make_density
from carv_attrib.config.finetune import FinetuneConfig, check_out_outside_model
from carv_attrib.errors import UsageError
from carv_attrib.interrupt import sigterm_as_interrupt
from carv_attrib.models.identity import check_encoder_matches, model_identity, resolve_source
from carv_attrib.models.lora import DEFAULT_TARGETS, LORA_META, LORA_WEIGHTS, add_lora, save_lora
from carv_attrib.models.train import (
    FINETUNE_RECORD,
    WARMUP_STEPS,
    MixedPrecision,
    draw_minibatch,
    make_optimizer,
    minibatch_backward,
    optimizer_step,
    read_finetune_record,
)
from carv_attrib.models.wan import load_transformer, pad_context, resolve_device
from carv_attrib.pipeline._job import ProgressFn, noop
from carv_attrib.store.latents import CachedClip, row_to_clip
from carv_attrib.store.lock import read_lock
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import now_iso

log = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FinetuneSummary", "run_finetune", "read_record"]

RECORD = FINETUNE_RECORD
CHECKPOINTS = "checkpoints"
TRANSFORMER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
OBJECTIVE = (
    "flow matching (carv.objective.clip_objective, output 'loss', unit weights): "
    "mean((v(x_σ, t, c) − (ε − z))²), x_σ = (1−σ)·z + σ·ε, " + TIMESTEP_CONVENTION
)
PRECISION = {
    "float32": "float32 throughout",
    "bfloat16": "bfloat16 autocast of the forward and its backward (torch.autocast); float32 master "
    "weights, optimizer state, gradient clipping and loss",
}
SAMPLING = (
    "per step: batch_clips clips drawn with replacement, then draws σ ~ density and draws ε per clip, "
    "all from one torch.Generator seeded by seed (its state checkpointed)"
)


@dataclass
class FinetuneSummary:
    out: str
    run: str
    kind: str  # "transformer" (every weight) | "lora"
    steps: int  # steps of the model now in OUT
    trained_steps: int  # steps this invocation ran
    resumed_from: int  # the checkpoint's step it started from (0: from the base model)
    clips: int
    trainable_params: int
    loss_first: float | None  # the first step's loss (of the whole fine-tune)
    loss_last: float | None  # mean of the last 10 steps' losses
    seconds: float
    steps_per_s: float | None  # of this invocation's steps (model load and saves excluded)
    fingerprint: str  # of the settings (`carv_finetune.json`)
    already_done: bool = False
    dtype: str = "float32"
    shard_reads: int = 0  # latent shard reads of this invocation (the start's included)
    cache_peak_bytes: int = 0  # most bytes of decoded clips held at once

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


read_record = read_finetune_record  # OUT/carv_finetune.json, or None when absent or unreadable


def run_finetune(cfg: FinetuneConfig, progress: ProgressFn = noop) -> FinetuneSummary:
    """Fine-tune MODEL's transformer (or a LoRA adapter on it) on RUN's cached clips into OUT.

    Everything is checked before OUT is written: UsageError (exit 2) for OUT inside MODEL, a run
    without latents, a MODEL that did not encode RUN, an OUT that holds something else (unless
    --overwrite) or a finetune past --steps; RunLockedError (exit 2) while a writer holds RUN (unless
    --wait). While training, UsageError when a streamed read finds RUN's latents changed since the
    start (the last checkpoint is kept, for the run as it was; on the changed run a rerun is refused
    as other settings unless --overwrite). Progress: "start" {todo, steps, done}, then "step"
    {status, step, loss} per step.
    A KeyboardInterrupt writes a checkpoint of the last finished step, then propagates.
    """
    t0 = time.monotonic()
    cfg.validate()
    out = Path(cfg.out)
    rows, latents = _live_rows(cfg)
    lora_cfg = (
        {
            "rank": int(cfg.lora),
            "alpha": float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora),
            "targets": list(DEFAULT_TARGETS),
        }
        if cfg.lora is not None
        else None
    )
    try:
        p = make_density(cfg.density)
    except ValueError as exc:
        raise UsageError(f"--density {cfg.density}: {exc}") from None
    base = model_identity(cfg.model, ("transformer",))
    settings = {
        "objective": OBJECTIVE,
        "density": p.spec,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "schedule": f"linear warm-up over {WARMUP_STEPS} steps, then constant; gradient norm clipped to 1",
        "batch_clips": cfg.batch_clips,
        "draws": cfg.draws,
        "seed": cfg.seed,
        "sampling": SAMPLING,
        "kind": "lora" if lora_cfg else "transformer",
        "lora": lora_cfg,
        "base_model": {"fingerprint": base["fingerprint"], "components": base["components"]},
        "latents": latents,
        "clip_ids": sorted(int(i) for i in cfg.clip_ids) if cfg.clip_ids is not None else None,
    }
    fp = _fingerprint(settings, cfg.dtype)
    settings["dtype"] = cfg.dtype
    settings["precision"] = PRECISION[cfg.dtype]
    prev = _check_out(cfg, out, settings, fp)
    ckpt = _latest_checkpoint(out) if prev is not None else None
    start = ckpt[0] if ckpt is not None else 0
    if start > cfg.steps:
        raise UsageError(
            f"-o {out} holds a finetune of {start} steps, more than --steps {cfg.steps}: pass --steps {start} "
            "or more to continue it, or --overwrite to start over"
        )
    if prev is not None and prev.get("status") == "done" and prev.get("steps") == cfg.steps == start:
        return _summary(cfg, prev, len(rows), 0, start, time.monotonic() - t0, None, already_done=True)
    clips = _open_cache(cfg, rows, latents["live_digest"])

    # -- from here on OUT is written ----------------------------------------------------------------
    if prev is None and out.exists() and cfg.overwrite:
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "fingerprint": fp,
        "settings": settings,
        "status": "training",
        "steps": start,
        "run": str(Path(cfg.run).resolve()),
        "model": resolve_source(cfg.model),
        "tool_version": __version__,
        "created_at": (prev or {}).get("created_at") or now_iso(),
    }
    _write_record(out, record | {"losses": (prev or {}).get("losses", [])[:start]})

    with sigterm_as_interrupt(), torch.random.fork_rng(devices=[]):  # SIGTERM checkpoints as Ctrl-C does;
        # the caller's global RNG is left as it was
        torch.manual_seed(cfg.seed)  # (only dropout-like layers would draw from it; checkpointed too)
        transformer, params, losses, done, train_s = _train(
            cfg, out, clips, p, lora_cfg, ckpt, record, progress
        )

    meta = {
        "base_model": base["source"],
        "base_fingerprint": base["fingerprint"],
        "finetune_fingerprint": fp,
        "steps": done,
        "run": record["run"],
    }
    if lora_cfg is not None:
        save_lora(transformer, out, meta=meta)
    else:
        _save_transformer(transformer, out)
    trained = done - start
    record |= {
        "status": "done",
        "steps": done,
        "losses": losses,
        "finished_at": now_iso(),
        "trainable_params": sum(prm.numel() for prm in params),
        "clips": len(clips),
    }
    _write_record(out, record)
    rate = trained / train_s if trained and train_s > 0 else None
    log.info(
        "finetune: %d steps in %.1f s (%.3f steps/s), loss %s; %d shard reads, at most %.1f MiB of clips held",
        trained, train_s, rate or 0, losses[-1:], clips.reads, clips.peak_bytes / 2**20,
    )  # fmt: skip
    summary = _summary(cfg, record, len(clips), trained, start, time.monotonic() - t0, rate)
    summary.shard_reads, summary.cache_peak_bytes = clips.reads, clips.peak_bytes
    return summary


def _fingerprint(settings: dict[str, Any], dtype: str) -> str:
    """The settings' fingerprint; float32 (the default) adds nothing to it, so a finetune of a version
    without --dtype resumes under the same fingerprint."""
    extra = {} if dtype == "float32" else {"dtype": dtype}
    return hashlib.sha256(json.dumps(settings | extra, sort_keys=True).encode()).hexdigest()[:16]


def _train(
    cfg: FinetuneConfig,
    out: Path,
    clips: _LatentCache,
    p: Any,
    lora_cfg: dict[str, Any] | None,
    ckpt: tuple[int, Path] | None,
    record: dict[str, Any],
    progress: ProgressFn,
) -> tuple[Any, list[torch.nn.Parameter], list[float], int, float]:
    """Load the model (and a fresh adapter), restore the checkpoint, step to cfg.steps, checkpointing;
    (transformer, trainable params, losses of every step, steps done, seconds of stepping)."""
    start, fp = ckpt[0] if ckpt is not None else 0, record["fingerprint"]
    device = resolve_device(cfg.device)
    transformer = load_transformer(cfg.model, None, device=device)
    if lora_cfg is not None:
        add_lora(transformer, lora_cfg["rank"], lora_cfg["alpha"], lora_cfg["targets"], seed=cfg.seed)
    else:
        for prm in transformer.parameters():
            prm.requires_grad_(True)
    named = [(n, prm) for n, prm in transformer.named_parameters() if prm.requires_grad]
    params = [prm for _, prm in named]
    opt, sched = make_optimizer(params, cfg.optimizer, cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    if ckpt is not None:
        losses = _load_checkpoint(ckpt[1], named, opt, sched, gen, device)
    model = transformer if cfg.dtype == "float32" else MixedPrecision(transformer, getattr(torch, cfg.dtype))
    shapes = clips.shapes()

    transformer.train()
    done, saved = start, start
    rng = _rng_state(gen)
    progress("start", {"todo": cfg.steps - start, "steps": cfg.steps, "done": start})
    t_train = time.monotonic()
    try:
        while done < cfg.steps:
            opt.zero_grad(set_to_none=True)
            batch = draw_minibatch(shapes, cfg.batch_clips, cfg.draws, p, gen)  # shapes: no clip read
            held = clips.fetch(i for i, _, _ in batch)  # {index: clip}, the missing read shard by shard
            loss = minibatch_backward(model, held, _Padded(held), batch, cfg.clips_per_forward)
            del held
            with _sigint_deferred():  # the update is whole or not at all: a checkpoint never holds half
                optimizer_step(params, opt, sched)
                done += 1
                losses.append(loss)
                rng = _rng_state(gen)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                _save_checkpoint(out, done, named, opt, sched, rng, losses, fp)
                saved = done
            progress("step", {"status": "ok", "step": done, "loss": loss})
    except KeyboardInterrupt:
        if done > saved:
            _save_checkpoint(out, done, named, opt, sched, rng, losses, fp)
        _write_record(out, record | {"steps": done, "losses": losses})
        log.warning(
            "finetune interrupted at step %d of %d; checkpoint in %s", done, cfg.steps, out / CHECKPOINTS
        )
        raise
    train_s = time.monotonic() - t_train
    transformer.eval()
    return transformer, params, losses, done, train_s


# -- the run: one snapshot of its clips ------------------------------------------------------------
def _live_rows(cfg: FinetuneConfig) -> tuple[list[Any], dict[str, Any]]:
    """RUN's live ok latent rows ((clip_id, vid, row), those of cfg.clip_ids when given) and what
    identifies them: the latents stage fingerprint, the live digest and the clip count. Read under
    RUN's shared lock; nothing is read of the latents themselves."""
    with read_lock(cfg.run, "finetune", wait=cfg.wait):
        run = RunDir(cfg.run)
        lat = run.require_latents_record()
        run.require_manifest()
        live = run.live_latents()
        if live.pending:
            raise UsageError(
                f"{len(live.pending)} clips of {run}'s manifest have no latents (e.g. {live.pending[0]}): "
                "an encode was interrupted; rerun the same `carv-attrib encode` first"
            )
        check_encoder_matches(cfg.model, lat.model)
        ok = live.ok()
        if cfg.clip_ids is not None:
            keep = {int(i) for i in cfg.clip_ids}
            ok = [row for row in ok if row[0] in keep]
        if not ok:
            raise UsageError(f"{run} has no encoded clips to fine-tune on")
        digest = live.digest()
    return ok, {"fingerprint": lat.fingerprint, "live_digest": digest, "clips": len(ok)}


def _open_cache(cfg: FinetuneConfig, rows: list[Any], digest: str) -> _LatentCache:
    """The streamed clips of `rows`: their shapes, and as many clips as --cache-mb holds, read under
    RUN's shared lock from the live set `digest` names (an encode that changed it since is refused)."""
    with read_lock(cfg.run, "finetune", wait=cfg.wait):
        run = RunDir(cfg.run)
        if run.live_latents().digest() != digest:
            raise UsageError(
                f"{run} changed while finetune was starting (an encode?); rerun the same command"
            )
        cache = _LatentCache(run, rows, int(cfg.cache_mb * 2**20))
        cache.warm()
    return cache


_CHANGED = (
    "the last checkpoint is kept for the run as it was; rerun with --overwrite to fine-tune the run as it is"
)
_CLIP_COLUMNS = [
    "clip_id",
    "vid",
    "latent",
    "latent_shape",
    "latent_dtype",
    "text_emb",
    "text_len",
    "text_dim",
]
_SHAPE_COLUMNS = ["clip_id", "latent_shape", "text_len", "text_dim", "latent_sha"]


class _Shape:
    """What `draw_minibatch` reads of a clip: its latent's shape (a tensor on the meta device, no data)."""

    __slots__ = ("latent",)

    def __init__(self, shape: list[int]):
        self.latent = torch.empty(shape, device="meta")


class _LatentCache:
    """The fine-tune's clips by index (the order of `rows`: (clip_id, vid, LatentRow)), read from RUN's
    latent shards on demand.

    `fetch(indices)` returns {index: CachedClip} for one step: the clips held are reused, the others
    read shard by shard (one read per shard: its latent and text columns, only the rows wanted), each
    row checked against the live row the fine-tune started from (clip id, latent_sha; UsageError when
    RUN changed since). Decoded clips are held up to `budget` bytes (float32 latent + text embedding),
    least recently used evicted before a read makes room; a step whose own clips exceed the budget
    holds just those. So at most max(budget, one step's clips) bytes are held. `reads` counts shard
    reads, `peak_bytes` the most bytes of clips held at once."""

    def __init__(self, run: RunDir, rows: list[Any], budget: int):
        self.run = run
        self.ids = [int(cid) for cid, _, _ in rows]
        self.where = [tuple(row.where) for _, _, row in rows]
        self.sha = [row.latent_sha for _, _, row in rows]
        self.budget = budget
        self.held: OrderedDict[int, CachedClip] = OrderedDict()
        self.bytes = 0
        self.reads = 0
        self.peak_bytes = 0
        by_shard: dict[int, list[int]] = defaultdict(list)
        for i, (shard, _) in enumerate(self.where):
            by_shard[shard].append(i)
        shape: dict[int, list[int]] = {}
        size: dict[int, int] = {}
        for shard, items in sorted(by_shard.items()):
            for i, r in zip(items, self._read(shard, items, _SHAPE_COLUMNS)):
                shape[i] = list(r["latent_shape"])
                size[i] = 4 * (math.prod(shape[i]) + r["text_len"] * r["text_dim"])  # float32 bytes
        self._shapes = [_Shape(shape[i]) for i in range(len(rows))]
        self.sizes = [size[i] for i in range(len(rows))]

    def __len__(self) -> int:
        return len(self.ids)

    def shapes(self) -> list[_Shape]:
        """Per clip, an object whose `.latent` has the clip's latent shape (C, T, h, w) and no data."""
        return self._shapes

    def warm(self) -> None:
        """Read clips in storage order while they fit the budget (a run that fits is read once, here)."""
        todo, total = [], 0
        for i in sorted(range(len(self)), key=lambda i: self.where[i]):
            if total + self.sizes[i] > self.budget:
                break
            todo.append(i)
            total += self.sizes[i]
        if todo:
            self.fetch(todo)

    def fetch(self, indices: Iterable[int]) -> dict[int, CachedClip]:
        """{index: clip} of `indices` (a step's draws; a repeated index is one clip)."""
        out: dict[int, CachedClip] = {}
        missing: dict[int, list[int]] = defaultdict(list)
        for i in sorted(set(indices)):
            if i in self.held:
                self.held.move_to_end(i)
                out[i] = self.held[i]
            else:
                missing[self.where[i][0]].append(i)
        incoming = sum(self.sizes[i] for items in missing.values() for i in items)
        for i in list(self.held):  # room first, least recently used first; this step's clips stay
            if self.bytes + incoming <= self.budget:
                break
            if i not in out:
                del self.held[i]
                self.bytes -= self.sizes[i]
        for shard, items in sorted(missing.items()):
            for i, r in zip(items, self._read(shard, items, [*_CLIP_COLUMNS, "latent_sha"])):
                out[i] = self.held[i] = row_to_clip(r)
                self.bytes += self.sizes[i]
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return out

    def _read(self, shard: int, items: list[int], columns: list[str]) -> list[dict[str, Any]]:
        """Rows `items` of latent shard `shard`, `columns` only, checked to be the rows live at the start."""
        import pyarrow as pa

        self.reads += 1
        path = self.run.latents.shard_path(shard)
        try:
            table = self.run.latents.read_shard(shard, columns)
            rows = table.take(pa.array([self.where[i][1] for i in items], pa.int64())).to_pylist()
        except (OSError, IndexError, pa.ArrowException) as exc:
            raise UsageError(
                f"{path} cannot be read any more ({type(exc).__name__}): {self.run} changed during the "
                f"finetune (an encode --overwrite?); {_CHANGED}"
            ) from None
        for i, r in zip(items, rows):
            if r["clip_id"] != self.ids[i] or r["latent_sha"] != self.sha[i]:
                raise UsageError(
                    f"{path} row {self.where[i][1]} is no longer clip {self.ids[i]}'s latent: {self.run} "
                    f"changed during the finetune (an encode?); {_CHANGED}"
                )
        return rows


class _Padded:
    """clip i's text embedding zero-padded to (1, 512, D) on demand, as the pipeline feeds it: a step
    pads its B clips (microseconds) instead of the run holding 512 x D floats per clip (8 MiB each for
    Wan2.1's D = 4096)."""

    def __init__(self, clips: dict[int, CachedClip]):
        self.clips = clips

    def __getitem__(self, i: int) -> torch.Tensor:
        return pad_context(self.clips[i].text_emb)

    def __len__(self) -> int:
        return len(self.clips)


# -- OUT -----------------------------------------------------------------------------------------
def _check_out(cfg: FinetuneConfig, out: Path, settings: dict[str, Any], fp: str) -> dict[str, Any] | None:
    """The record of a resumable finetune in OUT (same settings), None for a fresh start; UsageError
    for an OUT that is a file, or non-empty with something else (unless --overwrite)."""
    check_out_outside_model(out, cfg.model)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file; finetune writes a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    prev = read_record(out)
    if prev is not None and prev["fingerprint"] == fp:
        return prev
    if cfg.overwrite:
        return None
    if prev is not None:
        before = prev.get("settings", {})
        from carv_attrib.store.shards import config_differences  # the abridged "key: old -> new" lines

        diffs = config_differences(before, settings)
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        what = f"a finetune with other settings ({shown or 'its fingerprint differs'})"
    else:
        what = "files that are not a finetune's"
    raise UsageError(
        f"-o {out} already holds {what}; rerun with the same settings to resume it, pass --overwrite to "
        "start over there, or choose another -o"
    )


def _clear(out: Path) -> None:
    """--overwrite: remove what a finetune writes in OUT (its record, checkpoints, transformer or
    adapter files); anything else there is left."""
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    for name in (RECORD, LORA_WEIGHTS, LORA_META, *TRANSFORMER_FILES):
        (out / name).unlink(missing_ok=True)


def _write_record(out: Path, record: dict[str, Any]) -> None:
    with atomic_path(out / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


def _save_transformer(transformer: Any, out: Path) -> None:
    """save_pretrained into a temporary sibling, then each file renamed into OUT (a killed save
    leaves the previous weights)."""
    tmp = out / f".save.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        transformer.save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- checkpoints ---------------------------------------------------------------------------------
def _checkpoint_path(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:08d}.pt"


def _latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    found = []
    for f in (out / CHECKPOINTS).glob("step-*.pt"):
        try:
            found.append((int(f.stem.split("-")[1]), f))
        except (IndexError, ValueError):
            continue
    return max(found) if found else None


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"generator": gen.get_state(), "torch": torch.get_rng_state()}


def _save_checkpoint(
    out: Path,
    step: int,
    named: list[tuple[str, torch.nn.Parameter]],
    opt: torch.optim.Optimizer,
    sched: Any,
    rng: dict[str, torch.Tensor],
    losses: list[float],
    fp: str,
) -> None:
    """OUT/checkpoints/step-N.pt, written atomically; the older ones are removed after it."""
    path = _checkpoint_path(out, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "fingerprint": fp,
        "weights": {n: prm.detach().to("cpu").clone() for n, prm in named},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng,
        "losses": list(losses),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for f in path.parent.glob("step-*.pt"):
        if f != path:
            f.unlink(missing_ok=True)


def _load_checkpoint(
    path: Path,
    named: list[tuple[str, torch.nn.Parameter]],
    opt: torch.optim.Optimizer,
    sched: Any,
    gen: torch.Generator,
    device: str,
) -> list[float]:
    """Restore the trainable weights, optimizer, schedule and RNG states of a checkpoint; its losses."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: the atomic write makes this a hand edit or a bad disk
        raise UsageError(
            f"{path} cannot be read ({type(exc).__name__}); remove it to resume from the base model, or "
            "pass --overwrite"
        ) from None
    weights = state["weights"]
    if sorted(weights) != sorted(n for n, _ in named):
        raise UsageError(
            f"{path} does not hold this model's trainable weights; pass --overwrite to start over"
        )
    with torch.no_grad():
        for n, prm in named:
            prm.copy_(weights[n].to(device))
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["rng"]["generator"])
    torch.set_rng_state(state["rng"]["torch"])
    return [float(x) for x in state["losses"]]


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) or SIGTERM that arrives inside the block until its end, where it is
    raised as KeyboardInterrupt: the optimizer update is never interrupted half-way. Outside the main
    thread (no signal handlers there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in DEFERRED_SIGNALS
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if caught:
        raise KeyboardInterrupt(f"signal {caught[0]}")


def _summary(
    cfg: FinetuneConfig,
    record: dict[str, Any],
    clips: int,
    trained: int,
    start: int,
    seconds: float,
    rate: float | None,
    already_done: bool = False,
) -> FinetuneSummary:
    losses = record.get("losses") or []
    return FinetuneSummary(
        out=str(cfg.out),
        run=str(cfg.run),
        kind=record["settings"]["kind"],
        steps=int(record["steps"]),
        trained_steps=trained,
        resumed_from=start if not already_done else int(record["steps"]),
        clips=clips,
        trainable_params=int(record.get("trainable_params", 0)),
        loss_first=float(losses[0]) if losses else None,
        loss_last=float(sum(losses[-10:]) / len(losses[-10:])) if losses else None,
        seconds=round(seconds, 3),
        steps_per_s=round(rate, 4) if rate else None,
        fingerprint=record["fingerprint"],
        already_done=already_done,
        dtype=record["settings"].get("dtype", "float32"),
    )
