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

With `lora` (a directory `carv-attrib finetune RUN -m MODEL --lora RANK` wrote), LoRA attribution is
evaluated: MODEL's transformer is the frozen base, and every model is a fresh adapter trained with
DIR's recipe as its carv_finetune.json records it (rank, alpha, targets, steps, lr, optimizer,
batch, draws, density, seed: the same initialisation A, B = 0, and the same minibatch generator
seed; `lds.retrain.train_lora`). DIR itself is not attributed: finetune trains on every clip of
RUN, the held-out queries included (the document's `saw_queries` says whether DIR did), so its
training set is not the one the subsets are halves of. The
faithful *full model* is DIR's recipe retrained on the training clips only, and the subset adapters
are the same recipe on each half; the settings attribute through the full adapter's A/B gradients
as `featurize --lora` computes them (exact when small). `--train-seeds` > 1 varies the minibatch
seed only (the initialisation stays DIR's). The document records DIR (its weights' sha256, rank,
alpha, targets, as the index records an adapter) and the retrained full adapter.

    doc = run_evaluate(EvaluateConfig(run="runs/demo", model="models/tiny-wan", subsets=16))
    doc = run_evaluate(EvaluateConfig(run="runs/demo", model="models/tiny-wan", lora="lora/"))

Retrained models (or adapters) are cached under RUN/evaluate/<protocol fingerprint>/, so a rerun
resumes.
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
from carv_attrib.lds.retrain import LoraTrainJob, TrainJob, run_trainings, subset_model
from carv_attrib.lds.study import NAMED_VARIANTS, LdsProblem, score_variants
from carv_attrib.models.identity import check_encoder_matches, checkpoint_identity, model_identity
from carv_attrib.models.lora import file_sha256, is_lora_dir
from carv_attrib.models.train import FINETUNE_RECORD as RECORD
from carv_attrib.models.train import read_finetune_record as read_record
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


def _positions(cfg: EvaluateConfig, n_train: int) -> np.ndarray:
    """(subsets, n_train // 2) sorted positions into the training clips: the seeded random halves."""
    rng = np.random.default_rng(cfg.seed + 1)
    return np.stack([np.sort(rng.choice(n_train, n_train // 2, replace=False)) for _ in range(cfg.subsets)])


def _retrained_problem(
    run: RunDir, cfg: EvaluateConfig, clips: list[CachedClip], say: Callable[[str], None]
) -> LdsProblem:
    train, query = _split(clips, cfg)
    positions = _positions(cfg, len(train))
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


# evaluate's options that --lora takes from the adapter's record instead (a value other than the
# default that disagrees with the record is refused)
LORA_RECIPE_OPTIONS = ("steps", "lr", "optimizer", "density")


def lora_recipe(cfg: EvaluateConfig, run: RunDir) -> dict[str, Any]:
    """DIR's finetune recipe, from DIR/carv_finetune.json: {rank, alpha, targets, steps, lr,
    optimizer, batch_clips, draws, density, seed, finetune_fingerprint}. UsageError (exit 2, one line)
    when DIR is not a LoRA directory, has no finetune record (adapters trained elsewhere), holds a
    full-transformer or unfinished finetune, was trained on another base model or another run
    (latents fingerprint), or when --steps/--lr/--optimizer/--density disagree with it."""
    lora = Path(cfg.lora)  # type: ignore[arg-type]
    if not is_lora_dir(lora):
        raise UsageError(
            f"--lora {lora}: not a LoRA directory (no pytorch_lora_weights.safetensors); train one with "
            f"`carv-attrib finetune {cfg.run} -m {cfg.model} -o DIR --lora RANK`"
        )
    rec = read_record(lora)
    if rec is None:
        raise UsageError(
            f"--lora {lora}: no {RECORD} (the record `carv-attrib finetune --lora` writes): evaluate retrains "
            "the adapter with its recipe, so it needs an adapter finetune trained"
        )
    st = rec.get("settings") or {}
    if st.get("kind") != "lora" or not isinstance(st.get("lora"), dict):
        raise UsageError(f"--lora {lora}: its {RECORD} is a full-transformer finetune, not a LoRA adapter's")
    if rec.get("status") != "done":
        raise UsageError(
            f"--lora {lora}: its finetune is unfinished (status {rec.get('status')!r}); rerun that finetune first"
        )
    base = model_identity(cfg.model, ("transformer",))["fingerprint"]
    if (st.get("base_model") or {}).get("fingerprint") != base:
        raise UsageError(
            f"--lora {lora}: trained on another base model ({rec.get('model')}), not -m {cfg.model}'s transformer"
        )
    latents = run.require_latents_record().fingerprint
    if (st.get("latents") or {}).get("fingerprint") != latents:
        raise UsageError(
            f"--lora {lora}: trained on another run ({rec.get('run')}, latents "
            f"{(st.get('latents') or {}).get('fingerprint')}), not {cfg.run} (latents {latents})"
        )
    if st.get("dtype", "float32") != "float32":
        # the retrainings run in float32 (lds.retrain.train_lora): another precision is not DIR's recipe
        raise UsageError(
            f"--lora {lora}: trained with --dtype {st['dtype']}; evaluate --lora retrains in float32 only, "
            "so its subsets would not follow that recipe: evaluate an adapter fine-tuned with --dtype float32"
        )
    recipe = {
        "rank": int(st["lora"]["rank"]),
        "alpha": float(st["lora"]["alpha"]),
        "targets": list(st["lora"]["targets"]),
        "steps": int(rec["steps"]),
        **{k: st[k] for k in ("lr", "optimizer", "batch_clips", "draws", "density", "seed")},
        "finetune_fingerprint": rec["fingerprint"],
    }
    defaults = {f.name: f.default for f in dataclasses.fields(EvaluateConfig)}
    for k in LORA_RECIPE_OPTIONS:
        given = getattr(cfg, k)
        same = make_density(given).spec == recipe[k] if k == "density" else given == recipe[k]
        if given != defaults[k] and not same:
            flag = "--" + k.replace("_", "-")
            raise UsageError(
                f"{flag} {given}: with --lora the retrainings follow {lora}'s recipe ({k} {recipe[k]}); drop {flag}"
            )
    return recipe


def _lora_problem(
    run: RunDir, cfg: EvaluateConfig, clips: list[CachedClip], say: Callable[[str], None]
) -> tuple[LdsProblem, dict[str, Any]]:
    """The LoRA problem (see the module docstring) and the document's "adapter" record."""
    lora = Path(cfg.lora)  # type: ignore[arg-type]
    recipe = lora_recipe(cfg, run)
    train, query = _split(clips, cfg)
    positions = _positions(cfg, len(train))
    protocol = {
        "kind": "lora",
        "latents": run.require_latents_record().fingerprint,
        "model": checkpoint_identity(cfg.model, None)["fingerprint"],
        "recipe": {k: v for k, v in recipe.items() if k != "finetune_fingerprint"},
        "queries": [c.clip_id for c in query],
        "positions": positions.tolist(),
        **{k: getattr(cfg, k) for k in ("gt_draws", "seed", "train_seeds")},
    }
    work = run.root / "evaluate" / fingerprint(protocol)
    write_json_atomic(work / "protocol.json", protocol)
    ids = [c.clip_id for c in train]
    base = dict(
        model=cfg.model, run=str(run.root), query_ids=[c.clip_id for c in query], gt_draws=cfg.gt_draws,
        **{k: recipe[k] for k in ("rank", "alpha", "targets", "steps", "batch_clips", "draws", "lr", "optimizer",
                                  "density", "seed")},
        meta={"base_fingerprint": protocol["model"], "recipe_of": str(lora.resolve())},
    )  # fmt: skip
    models = work / "models"
    jobs = [LoraTrainJob(name="full", out=str(models / "full"), train_ids=ids, **base)]
    jobs += [
        LoraTrainJob(
            name=subset_model(m, s),
            out=str(models / subset_model(m, s)),
            train_ids=[ids[i] for i in p],
            sample_seed=recipe["seed"] + 1000 * s,
            **base,
        )  # fmt: skip
        for m, p in enumerate(positions)
        for s in range(cfg.train_seeds)
    ]
    say(
        f"retraining {lora}'s recipe (rank {recipe['rank']}, {recipe['steps']} steps): the full adapter on "
        f"{len(train)} training clips and {cfg.subsets * cfg.train_seeds} subset adapters -> {work}"
    )
    results = run_trainings(jobs, cfg.workers, say)
    gt = -np.asarray(
        [
            np.mean([results[subset_model(m, s)]["query_loss"] for s in range(cfg.train_seeds)], axis=0)
            for m in range(cfg.subsets)
        ],
        dtype=np.float64,
    )
    full = models / "full"
    dir_ids = ((read_record(lora) or {}).get("settings") or {}).get("clip_ids")  # None: every clip of RUN
    adapter = {
        "path": str(lora.resolve()),
        "weights_sha256": file_sha256(lora / "pytorch_lora_weights.safetensors"),
        **recipe,
        # DIR is not what is attributed: whether its own training saw the held-out queries
        "saw_queries": dir_ids is None or bool({c.clip_id for c in query} & {int(i) for i in dir_ids}),
        "full_adapter": {
            "path": str(full.resolve()),
            "weights_sha256": file_sha256(full / "pytorch_lora_weights.safetensors"),
            "train_clips": len(train),
            "note": "the adapter attributed: DIR's recipe retrained on the training clips (queries held out)",
        },
    }
    problem = LdsProblem(
        name=str(run), model=cfg.model, checkpoint=None, train=train, query=query, positions=positions,
        gt_values=gt, density=recipe["density"], lora=str(full),
    )  # fmt: skip
    return problem, adapter


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


# product settings that choose the base model's layers: meaningless through an adapter
LORA_REFUSED_VARIANTS = ("all-linear",)


def run_evaluate(cfg: EvaluateConfig, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Evaluate cfg.variant settings on RUN; writes cfg.out (and cfg.plot) and returns the document.
    Raises UsageError (exit 2) for too few clips, queries or subsets (naming the minimum), unknown
    settings, or a model that did not encode RUN; RunLockedError (exit 2) while another command
    writes RUN (unless cfg.wait); with cfg.lora, UsageError for an adapter `lora_recipe` refuses or
    a setting that is not a LoRA one (exact-*, all-linear)."""
    cfg.validate()
    try:
        make_density(cfg.density)
    except ValueError as exc:
        raise UsageError(f"--density {cfg.density}: {exc}") from exc
    unknown = [v for v in cfg.variant if v not in NAMED_VARIANTS]
    if unknown:
        raise UsageError(f"--variant {', '.join(unknown)}: choose from {', '.join(NAMED_VARIANTS)}")
    if cfg.lora is not None:
        exact = [v for v in cfg.variant if NAMED_VARIANTS[v].kind == "exact" or v in LORA_REFUSED_VARIANTS]
        if exact:
            raise UsageError(
                f"--variant {', '.join(exact)}: not a LoRA setting (the exact reference and all-linear "
                "differentiate the base model's weights); --lora attributes through the adapter's A/B gradients"
            )
    if cfg.plot is not None:
        require_matplotlib()
    run = RunDir(cfg.run)
    # evaluate writes its retrainings into RUN/evaluate and reads the latents all along: one writer
    with run_lock(run.root, "evaluate", wait=cfg.wait):
        return _evaluate(cfg, run, say)


def _evaluate(cfg: EvaluateConfig, run: RunDir, say: Callable[[str], None]) -> dict[str, Any]:
    check_encoder_matches(cfg.model, run.require_latents_record().model)
    clips = list(iter_cached(run))
    adapter = None
    if cfg.lora is not None:
        problem, adapter = _lora_problem(run, cfg, clips, say)
    elif cfg.ground_truth:
        problem = _file_problem(run, cfg, clips)
    else:
        problem = _retrained_problem(run, cfg, clips, say)
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
        "protocol": _protocol_doc(cfg, problem, adapter),
        **({"adapter": adapter} if adapter is not None else {}),
        "random_floor": random_floor(problem.gt_values, problem.positions, len(problem.train)),
        "settings": rows,
    }
    write_json_atomic(Path(cfg.out), doc, sort_keys=False)
    if cfg.plot is not None:
        plot_evaluation(doc, Path(cfg.plot))
    return doc


def _protocol_doc(cfg: EvaluateConfig, problem: LdsProblem, adapter: dict[str, Any] | None) -> dict[str, Any]:
    """The document's protocol: counts, where the ground truth came from, and the retrainings' recipe
    (evaluate's options, or with --lora DIR's: its training seed as `train_seed`, `seed` the split's)."""
    out: dict[str, Any] = {
        "train_clips": len(problem.train),
        "queries": len(problem.query),
        "subsets": len(problem.positions),
        "ground_truth": str(cfg.ground_truth) if cfg.ground_truth else "retrained",
    }
    if adapter is not None:
        return out | {
            "ground_truth": "retrained LoRA adapters (DIR's recipe, base frozen)",
            **{k: adapter[k] for k in ("rank", "alpha", "targets", "steps", "lr", "optimizer", "batch_clips",
                                       "draws", "density")},
            "train_seed": adapter["seed"],
            **{k: getattr(cfg, k) for k in ("train_seeds", "gt_draws", "seed")},
        }  # fmt: skip
    if cfg.ground_truth:
        return out
    keys = ("steps", "lr", "optimizer", "full_batch", "train_seeds", "density", "gt_draws", "seed")
    return out | {k: getattr(cfg, k) for k in keys}


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
