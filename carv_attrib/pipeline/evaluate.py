"""`evaluate`: how faithful are the attributions on this run? LDS of featurize settings, with CIs.

Protocol (TRAK's linear datamodeling score; `carv_attrib.lds.metric`): `queries` ok clips of RUN
are held out (seeded choice); the rest are the training clips. MODEL's transformer is the shared init:
the *full model* is it fine-tuned on all training clips, and each of `subsets` random halves is
fine-tuned from it the same way (same steps, schedule, optimizer, seed). Each subset model's loss on
each query over fixed draws is the measured output (gt = −loss). Attributions are computed with the
full model for each requested setting (`carv_attrib.lds.study.NAMED_VARIANTS`), replicated over
projection and estimator seeds, and scored by LDS with a bootstrap CI over queries and seeds; the LDS
of random scores is the noise floor. With `ground_truth`, no model is trained: the file gives the
subsets and their measured outputs, and MODEL's own transformer is attributed.

    doc = run_evaluate(EvaluateConfig(run="runs/demo", model="models/tiny-wan", subsets=16))

Retrained models are cached under RUN/evaluate/<protocol fingerprint>/, so a rerun resumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from carv_attrib import __version__
from carv_attrib.carv.timesteps import density as make_density
from carv_attrib.config import MIN_EVAL_SUBSETS, MIN_EVAL_TRAIN, EvaluateConfig
from carv_attrib.errors import UsageError
from carv_attrib.lds.metric import random_floor
from carv_attrib.lds.retrain import TrainJob, run_trainings, subset_model
from carv_attrib.lds.study import NAMED_VARIANTS, LdsProblem, score_variants
from carv_attrib.models.identity import check_encoder_matches, checkpoint_identity
from carv_attrib.optional import require_matplotlib
from carv_attrib.store.latents import CachedClip, iter_cached
from carv_attrib.store.lock import run_lock
from carv_attrib.store.manifest import read_text_file
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import fingerprint, now_iso, write_json_atomic

__all__ = ["EvaluateConfig", "run_evaluate"]


def _split(clips: list[CachedClip], cfg: EvaluateConfig) -> tuple[list[CachedClip], list[CachedClip]]:
    """(training clips, held-out queries), both in manifest order; the queries are a seeded choice."""
    need = MIN_EVAL_TRAIN + cfg.queries
    if len(clips) < need:
        raise UsageError(
            f"evaluate needs at least {need} ok clips in the run ({MIN_EVAL_TRAIN} to train on + --queries "
            f"{cfg.queries}); {cfg.run} has {len(clips)}"
        )
    held = set(np.random.default_rng(cfg.seed).choice(len(clips), cfg.queries, replace=False).tolist())
    return [c for i, c in enumerate(clips) if i not in held], [c for i, c in enumerate(clips) if i in held]


def _retrained_problem(
    run: RunDir, cfg: EvaluateConfig, clips: list[CachedClip], say: Callable[[str], None]
) -> LdsProblem:
    train, query = _split(clips, cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    half = len(train) // 2
    positions = np.stack([np.sort(rng.choice(len(train), half, replace=False)) for _ in range(cfg.subsets)])
    protocol = {
        "latents": run.require_latents_record().fingerprint,  # run_evaluate checked it exists
        # the weights, not the path: new weights at the same path retrain, another path to them resumes
        "model": checkpoint_identity(cfg.model, None)["fingerprint"],
        "queries": [c.clip_id for c in query],
        "positions": positions.tolist(),
        **{k: getattr(cfg, k) for k in ("steps", "lr", "optimizer", "density", "gt_draws", "seed")},
        **({"full_batch": True} if cfg.full_batch else {}),  # absent when off: older caches keep resuming
    }
    work = run.root / "evaluate" / fingerprint(protocol)
    write_json_atomic(work / "protocol.json", protocol)
    base = dict(
        model=cfg.model, checkpoint=None, run=str(run.root), query_ids=[c.clip_id for c in query], steps=cfg.steps,
        lr=cfg.lr, optimizer=cfg.optimizer, density=cfg.density, seed=cfg.seed + 2, gt_draws=cfg.gt_draws,
        full_batch=cfg.full_batch,
    )  # fmt: skip
    ids = [c.clip_id for c in train]
    jobs = [
        TrainJob(name="full", out=str(work / "models" / "full"), train_ids=ids, save_moments=True, **base)
    ]
    jobs += [
        dataclasses.replace(
            TrainJob(
                name=subset_model(m, s),
                out=str(work / "models" / subset_model(m, s)),
                train_ids=[ids[i] for i in p],
                **base,
            ),
            seed=base["seed"] + 1000 * s,
        )
        for m, p in enumerate(positions)
        for s in range(cfg.train_seeds)
    ]
    n_models = cfg.subsets * cfg.train_seeds
    say(f"retraining: the full model and {n_models} subset models, {cfg.steps} steps each -> {work}")
    results = run_trainings(jobs, cfg.workers, say)
    gt = -np.asarray(
        [
            np.mean([results[subset_model(m, s)]["query_loss"] for s in range(cfg.train_seeds)], axis=0)
            for m in range(cfg.subsets)
        ],
        dtype=np.float64,
    )
    adam = work / "models" / "full" / "adam_v.pt"
    return LdsProblem(
        name=str(run), model=cfg.model, checkpoint=str(work / "models" / "full" / "transformer"), train=train,
        query=query, positions=positions, gt_values=gt, adam_moments=str(adam) if adam.exists() else None,
        density=cfg.density,
    )  # fmt: skip


def _file_problem(run: RunDir, cfg: EvaluateConfig, clips: list[CachedClip]) -> LdsProblem:
    """The problem a ground-truth file describes (vids of RUN); MODEL's own transformer is attributed."""
    import json

    path = Path(cfg.ground_truth)  # type: ignore[arg-type]
    try:
        doc = json.loads(read_text_file(path, "--ground-truth"))
        qv, subsets, gt = doc["queries"], doc["subsets"], np.asarray(doc["gt_values"], dtype=np.float64)
        if not (
            isinstance(qv, list) and isinstance(subsets, list) and all(isinstance(s, list) for s in subsets)
        ):
            raise TypeError("queries must be a list of vids and subsets a list of lists of vids")
        qv, subsets = [str(v) for v in qv], [[str(v) for v in s] for s in subsets]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--ground-truth {path}: expected {{queries, subsets, gt_values}} ({exc})") from exc
    by_vid = {c.vid: c for c in clips}
    missing = [v for v in qv + [v for s in subsets for v in s] if v not in by_vid]
    if missing:
        raise UsageError(
            f"--ground-truth {path}: not ok clips of {run}: {', '.join(sorted(set(missing))[:5])}"
        )
    overlap = sorted({v for s in subsets for v in s} & set(qv))
    if overlap or any(len(set(s)) != len(s) for s in subsets):
        raise UsageError(
            f"--ground-truth {path}: a subset lists a query ({', '.join(overlap[:5]) or 'none'}) or a vid twice; "
            "subsets hold training clips only, each once"
        )
    query = [by_vid[v] for v in qv]
    train = [c for c in clips if c.vid not in set(qv)]
    pos = {c.vid: i for i, c in enumerate(train)}
    if gt.shape != (len(subsets), len(qv)):
        raise UsageError(
            f"--ground-truth {path}: gt_values is {gt.shape}, expected ({len(subsets)}, {len(qv)})"
        )
    if len(subsets) < MIN_EVAL_SUBSETS or len(qv) < 2 or len(train) < MIN_EVAL_TRAIN:
        raise UsageError(
            f"--ground-truth {path}: needs at least {MIN_EVAL_SUBSETS} subsets, 2 queries and {MIN_EVAL_TRAIN} "
            f"training clips (has {len(subsets)}, {len(qv)}, {len(train)})"
        )
    positions = [np.asarray(sorted(pos[v] for v in s)) for s in subsets]
    return LdsProblem(
        name=str(run),
        model=cfg.model,
        checkpoint=None,
        train=train,
        query=query,
        positions=positions,
        gt_values=gt,
        density=cfg.density,
    )


def run_evaluate(cfg: EvaluateConfig, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Evaluate cfg.variant settings on RUN; writes cfg.out (and cfg.plot) and returns the document.
    Raises UsageError (exit 2) for too few clips, queries or subsets (naming the minimum), unknown
    settings, or a model that did not encode RUN; RunLockedError (exit 2) while another command
    writes RUN (unless cfg.wait)."""
    cfg.validate()
    try:
        make_density(cfg.density)
    except ValueError as exc:
        raise UsageError(f"--density {cfg.density}: {exc}") from exc
    unknown = [v for v in cfg.variant if v not in NAMED_VARIANTS]
    if unknown:
        raise UsageError(f"--variant {', '.join(unknown)}: choose from {', '.join(NAMED_VARIANTS)}")
    if cfg.plot is not None:
        require_matplotlib()
    run = RunDir(cfg.run)
    # evaluate writes its retrainings into RUN/evaluate and reads the latents all along: one writer
    with run_lock(run.root, "evaluate", wait=cfg.wait):
        return _evaluate(cfg, run, say)


def _evaluate(cfg: EvaluateConfig, run: RunDir, say: Callable[[str], None]) -> dict[str, Any]:
    check_encoder_matches(cfg.model, run.require_latents_record().model)
    clips = list(iter_cached(run))
    problem = _file_problem(run, cfg, clips) if cfg.ground_truth else _retrained_problem(run, cfg, clips, say)
    problem.device = cfg.device
    variants = [NAMED_VARIANTS[v] for v in cfg.variant]
    variants = [v if v.kind == "exact" else _with_replicates(v, cfg.replicates) for v in variants]
    rows = score_variants(problem, variants, say)
    doc = {
        "schema": "carv-attrib/evaluation-1",
        "tool_version": __version__,
        "created_at": now_iso(),
        "run": str(run),
        "model": cfg.model,
        "protocol": {
            "train_clips": len(problem.train),
            "queries": len(problem.query),
            "subsets": len(problem.positions),
            "ground_truth": str(cfg.ground_truth) if cfg.ground_truth else "retrained",
            **(
                {}
                if cfg.ground_truth
                else {
                    k: getattr(cfg, k)
                    for k in (
                        "steps",
                        "lr",
                        "optimizer",
                        "full_batch",
                        "train_seeds",
                        "density",
                        "gt_draws",
                        "seed",
                    )
                }
            ),
        },
        "random_floor": random_floor(problem.gt_values, problem.positions, len(problem.train)),
        "settings": rows,
    }
    write_json_atomic(Path(cfg.out), doc, sort_keys=False)
    if cfg.plot is not None:
        plot_evaluation(doc, Path(cfg.plot))
    return doc


def _with_replicates(v: Any, r: int) -> Any:
    import dataclasses

    return dataclasses.replace(v, replicates=r)


def plot_evaluation(doc: dict[str, Any], path: Path) -> None:
    """One point per setting: mean LDS with its 95 % CI; the random-score floor as a band."""
    import matplotlib  # optional dependency ([plot] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["settings"])
    means = [doc["settings"][n]["lds"]["mean"] for n in names]
    cis = [doc["settings"][n]["lds"].get("ci95_subsets", doc["settings"][n]["lds"]["ci95"]) for n in names]
    lo = [m - ci[0] for ci, m in zip(cis, means)]
    hi = [ci[1] - m for ci, m in zip(cis, means)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.6))
    ax.errorbar(range(len(names)), means, yerr=[lo, hi], fmt="o", capsize=4)
    floor = doc["random_floor"]
    ax.axhspan(
        floor["mean"] - 2 * floor["sd"],
        floor["mean"] + 2 * floor["sd"],
        color="grey",
        alpha=0.2,
        label="random scores ±2 sd",
    )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("LDS (mean, 95 % CI)")
    p = doc["protocol"]
    ax.set_title(f"{p['train_clips']} clips, {p['queries']} queries, {p['subsets']} subsets", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
