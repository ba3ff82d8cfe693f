"""LoRA attribution on LDS worlds: does attributing through a LoRA adapter's A/B gradient beat the
full-parameter features of the merged model at the same feature dimension?

Each world (seeded) is a fine-tune the way users make one:
1. a tiny Wan2.1 pipeline (`make-model --size tiny`) whose transformer is pretrained from scratch on
   `n_pretrain` demo clips (all parameters, `models.train.train_on_clips`): the frozen base;
2. a LoRA adapter (`models.lora.add_lora`, rank `rank`, the attention projections) trained on the
   `n_train` fine-tuning clips, the base frozen: the user's adapter ("full");
3. ground truth: the adapter retrained from the same initialisation (same A, B = 0, same steps and
   optimizer) on each of `subsets` random halves of the fine-tuning clips; gt = −(query loss over fixed
   draws) of each retrained adapter (`lds.retrain.query_losses`). LoRA training is full-batch with
   per-(clip, step) seeded draws, so two subsets see the same draws for the clips they share and
   differ by their data only (lower-noise ground truth, like the full-batch worlds of lds/world.py).

Features at the full adapter, K draws per clip (the tool's default estimator), three replicates
(estimator and projection seeds):
  (a) lora:         the adapter's A/B gradient, exact (`featurize --lora`: identity projection, D = p_lora);
  (b) merged-kron:  the merged model W + sBA, every Linear of its blocks (the default `featurize`
                    selection), kron-projected to a total of D = p_lora (`--proj-dim`): equal cost
                    (one forward+backward per draw, the same D in the index);
  (c) merged-exact: (b)'s gradient unprojected (D = p_blocks, larger: a reference, not equal cost).
LDS (Spearman over subsets, per query) with the tool's default preconditioner (normalize) and TRAK;
CIs over queries and replicates (and over subsets), the paired difference (a) − (b), pooled over worlds.

For a user's own adapter, `carv-attrib evaluate RUN -m MODEL --lora DIR` runs the same protocol in
the library (`lds.retrain.LoraTrainJob`, `lds.study` with `LdsProblem.lora`), retraining with the
minibatch recipe `finetune --lora` recorded; this bench keeps its full-batch recipe (lower-noise
ground truth) and the merged-model comparisons, which are research questions, not a command.

    nice /work/main/.venv/bin/python bench/lora_lds.py            # all worlds; resumes from bench/_work
    nice /work/main/.venv/bin/python bench/lora_lds.py --table    # the README table from the JSON
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "lora_lds"
OUT = Path(__file__).resolve().parent / "results" / "lora_lds.json"
REPLICATES = 3
FEATURE_DRAWS = 8  # featurize's default K
PRECONDITIONERS = ("normalize", "trak")


@dataclass(frozen=True)
class LoraWorld:
    name: str
    seed: int
    rank: int
    density: str = "uniform"
    n_pretrain: int = 24
    n_train: int = 24
    n_query: int = 8
    subsets: int = 20
    pretrain_steps: int = 200
    steps: int = 60
    lr: float = 5e-3
    gt_draws: int = 64

    def describe(self) -> str:
        return (
            f"base pretrained {self.pretrain_steps} steps on {self.n_pretrain} clips; rank-{self.rank} LoRA "
            f"(attention) trained {self.steps} full-batch AdamW steps on {self.n_train} clips, σ ~ {self.density}; "
            f"{self.subsets} half-subsets, {self.n_query} queries, tiny transformer, seed {self.seed}"
        )


WORLDS = (
    LoraWorld("r4-uniform", seed=30, rank=4),
    LoraWorld("r8-uniform", seed=31, rank=8),
    LoraWorld("r4-logitnormal", seed=32, rank=4, density="logit-normal:0,1"),
    LoraWorld("r2-shift", seed=33, rank=2, density="shift:3"),
)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- building ---------------------------------------------------------------------------------------
def prepare(w: LoraWorld, root: Path) -> None:
    """Tiny pipeline, encoded splits, and the pretrained base as MODEL/transformer."""
    from carv_attrib.config import EncodeConfig
    from carv_attrib.lds.retrain import save_transformer
    from carv_attrib.lds.synthetic import make_demo_data
    from carv_attrib.models.tiny import make_model
    from carv_attrib.models.train import train_on_clips
    from carv_attrib.models.wan import load_transformer
    from carv_attrib.pipeline.encode import run_encode
    from carv_attrib.store.latents import iter_cached

    model = root / "model"
    if not (model / "model_index.json").exists():
        make_model(str(model), "tiny", seed=w.seed)
    for split, n, off in (("pretrain", w.n_pretrain, 2), ("train", w.n_train, 0), ("query", w.n_query, 1)):
        run = root / "runs" / split
        if (run / "latents" / "config.json").exists():
            continue
        data = root / "data" / split
        manifest = make_demo_data(data, clips=n, seed=1000 * w.seed + off)
        run_encode(
            EncodeConfig(
                manifest=manifest, videos=data / "videos", model=str(model), run=run, frames=9, size="32x32",
                fps=8, workers=0, device="cpu", shard_size=max(n, 1),
            )
        )  # fmt: skip
    marker = root / "base.json"
    if not marker.exists():
        t0 = time.monotonic()
        base = load_transformer(str(model))
        losses = train_on_clips(
            base, list(iter_cached(root / "runs" / "pretrain")), w.pretrain_steps, 8, 2, 2e-3,
            density=w.density, seed=w.seed + 1,
        )  # fmt: skip
        for p in base.parameters():
            p.requires_grad_(False)
        save_transformer(base, model / "transformer")
        marker.write_text(json.dumps({"loss": [losses[0], losses[-1]], "seconds": time.monotonic() - t0}))


def _step_draws(seed: int, clip_id: int, step: int, shape: tuple[int, ...], density: Any) -> tuple:
    g = torch.Generator().manual_seed((seed * 1_000_003 + (clip_id % (1 << 40)) * 7919 + step) % (1 << 62))
    sigma = density.icdf(torch.rand(1, generator=g, dtype=torch.float64))
    return sigma, torch.randn((1, *shape), generator=g)


def train_lora(args: tuple[dict[str, Any], str, list[int] | None, str | None]) -> dict[str, Any]:
    """Train the world's adapter (same init) on `train_ids` (None: all) with the base frozen; save it
    to OUT when given; return the query losses over the fixed ground-truth draws."""
    spec, root_s, train_ids, out = args
    w, root = LoraWorld(**spec), Path(root_s)
    from carv_attrib.carv.objective import clip_objective
    from carv_attrib.carv.timesteps import density as make_density
    from carv_attrib.lds.retrain import query_losses
    from carv_attrib.models.lora import add_lora, save_lora
    from carv_attrib.models.wan import load_transformer, pad_context
    from carv_attrib.store.latents import iter_cached

    torch.set_num_threads(1)
    t = load_transformer(str(root / "model"))
    add_lora(t, rank=w.rank, seed=w.seed)  # the same A for every subset, B = 0
    params = [p for n, p in t.named_parameters() if "lora_" in n]
    clips = list(iter_cached(root / "runs" / "train"))
    if train_ids is not None:
        keep = set(train_ids)
        clips = [c for c in clips if c.clip_id in keep]
    ctx = [pad_context(c.text_emb) for c in clips]
    p = make_density(w.density)
    opt = torch.optim.AdamW(params, lr=w.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    t.train()
    losses = []
    for step in range(w.steps):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for c, cx in zip(clips, ctx):
            sigma, eps = _step_draws(w.seed, c.clip_id, step, tuple(c.latent.shape), p)
            obj, _ = clip_objective(t, c.latent, cx, sigma, eps, torch.ones(1))
            total = total + obj / len(clips)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(total.detach()))
    t.eval()
    if out is not None:
        save_lora(t, out, meta={"base": str(root / "model"), "steps": w.steps, "rank": w.rank})
    q = query_losses(t, list(iter_cached(root / "runs" / "query")), w.gt_draws, w.density)
    return {"query_loss": q.tolist(), "train_loss": [losses[0], losses[-1]]}


def positions(w: LoraWorld) -> np.ndarray:
    rng = np.random.default_rng(w.seed + 17)
    return np.stack([np.sort(rng.choice(w.n_train, w.n_train // 2, replace=False)) for _ in range(w.subsets)])


def ground_truth(w: LoraWorld, root: Path, workers: int) -> dict[str, Any]:
    from carv_attrib.store.latents import iter_cached

    path = root / "gt.json"
    if path.exists():
        return json.loads(path.read_text())
    ids = [c.clip_id for c in iter_cached(root / "runs" / "train")]
    spec = dataclasses.asdict(w)
    jobs = [(spec, str(root), None, str(root / "adapter"))]
    jobs += [(spec, str(root), [ids[i] for i in pos], None) for pos in positions(w)]
    t0 = time.monotonic()
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(train_lora, jobs)
    doc = {
        "full": results[0],
        "subsets": [r["query_loss"] for r in results[1:]],
        "train_loss_first_last": results[0]["train_loss"],
        "seconds": time.monotonic() - t0,
    }
    path.write_text(json.dumps(doc))
    return doc


# -- features and LDS -------------------------------------------------------------------------------
def features(
    w: LoraWorld, root: Path, replicate: int
) -> dict[str, tuple[np.ndarray, np.ndarray, int, float]]:
    """{method: (train (n, D), query (Q, D), D, seconds)} at the full adapter, one replicate."""
    from carv_attrib.attrib.featurizer import Featurizer, build_draw_rule, build_projector
    from carv_attrib.attrib.projection import KronProjector, select_linear_layers
    from carv_attrib.models.lora import load_lora, merge_lora
    from carv_attrib.models.wan import load_transformer
    from carv_attrib.store.latents import iter_cached

    train = list(iter_cached(root / "runs" / "train"))
    query = list(iter_cached(root / "runs" / "query"))
    rule = build_draw_rule(seed=replicate, scheme="stratified-is", k=FEATURE_DRAWS, density=w.density)

    adapted = load_transformer(str(root / "model"))
    load_lora(adapted, root / "adapter")
    lora_proj = build_projector("kron", adapted, lora=True, seed=replicate)
    merged = load_transformer(str(root / "model"))
    load_lora(merged, root / "adapter")
    merge_lora(merged)
    d = lora_proj.dim
    kron = build_projector("kron", merged, proj_dim=d, seed=replicate)
    layers = select_linear_layers(merged)
    exact = KronProjector(merged, layers, exact={n: (True, True) for n, _ in layers}, patterns=["blocks.*"])
    out = {}
    for name, t, proj in (
        ("lora", adapted, lora_proj),
        ("merged-kron", merged, kron),
        ("merged-exact", merged, exact),
    ):
        fz = Featurizer([t], [proj], rule, "loss", "cpu")
        t0 = time.monotonic()
        rows = []
        for clips in (train, query):
            f = [
                fz.features([(c.clip_id, c.latent, c.text_emb) for c in clips[i : i + 4]])[0]
                for i in range(0, len(clips), 4)
            ]
            rows.append(torch.cat(f).double().numpy())
        out[name] = (rows[0], rows[1], proj.dim, time.monotonic() - t0)
    return out


def study(w: LoraWorld, root: Path, gt: dict[str, Any]) -> dict[str, Any]:
    from carv_attrib.lds.gradspace import scores_from_gram
    from carv_attrib.lds.metric import lds_per_query, lds_summary, random_floor, subset_sums
    from carv_attrib.search.precondition import DEFAULT_NORMALIZE_ALPHA

    def score_matrix(ft: np.ndarray, fq: np.ndarray, kind: str) -> np.ndarray:
        # the index's preconditioners from the (n + Q)² Gram (`lds.gradspace.scores_from_gram`, equal to
        # `search.precondition`'s): TRAK in feature space would factor a D x D matrix
        f = np.concatenate([ft, fq])
        alpha = DEFAULT_NORMALIZE_ALPHA if kind == "normalize" else 1.0
        return scores_from_gram(f @ f.T, len(ft), kind, dim=f.shape[1], alpha=alpha)

    gt_values = -np.asarray(gt["subsets"], dtype=np.float64)  # (M, Q)
    pos = positions(w)
    per_query: dict[tuple[str, str], list[np.ndarray]] = {}
    sums: dict[tuple[str, str], list[np.ndarray]] = {}
    dims: dict[str, int] = {}
    secs: dict[str, list[float]] = {}
    for r in range(REPLICATES):
        feats = features(w, root, r)
        for name, (ft, fq, d, s) in feats.items():
            dims[name] = d
            secs.setdefault(name, []).append(round(s, 2))
            for kind in PRECONDITIONERS:
                sc = score_matrix(ft, fq, kind)
                per_query.setdefault((name, kind), []).append(lds_per_query(sc, gt_values, pos))
                sums.setdefault((name, kind), []).append(subset_sums(sc, pos))
        say(f"{w.name}: replicate {r + 1}/{REPLICATES} featurized")
    res: dict[str, Any] = {
        "dims": dims,
        "feature_seconds": secs,
        "methods": {},
        "paired": {},
        "per_query": {},
    }
    for (name, kind), pq in per_query.items():
        res["methods"][f"{name}/{kind}"] = lds_summary(pq, sums=sums[(name, kind)], gt_values=gt_values)
        res["per_query"][f"{name}/{kind}"] = [x.tolist() for x in pq]
    for kind in PRECONDITIONERS:
        diff = [a - b for a, b in zip(per_query[("lora", kind)], per_query[("merged-kron", kind)])]
        res["paired"][f"lora-minus-merged-kron/{kind}"] = lds_summary(diff)
    res["random_floor"] = random_floor(gt_values, pos, w.n_train)
    spread = gt_values - gt_values.mean(0, keepdims=True)
    res["gt_sd_over_subsets"] = float(spread.std(axis=0, ddof=1).mean())
    return res


def pooled(doc: dict[str, Any]) -> dict[str, Any]:
    """Every world's queries pooled, per replicate: mean LDS with CIs over (world, query) and replicates."""
    from carv_attrib.lds.metric import lds_summary

    worlds = [v for v in doc["worlds"].values() if "study" in v]
    out: dict[str, Any] = {"worlds": len(worlds)}
    if not worlds:
        return out
    keys = worlds[0]["study"]["per_query"].keys()
    for key in keys:
        reps = [
            np.concatenate([np.asarray(v["study"]["per_query"][key][r]) for v in worlds])
            for r in range(REPLICATES)
        ]
        out[key] = lds_summary(reps)
    for kind in PRECONDITIONERS:
        a = [
            np.concatenate([np.asarray(v["study"]["per_query"][f"lora/{kind}"][r]) for v in worlds])
            for r in range(REPLICATES)
        ]
        b = [
            np.concatenate([np.asarray(v["study"]["per_query"][f"merged-kron/{kind}"][r]) for v in worlds])
            for r in range(REPLICATES)
        ]
        out[f"lora-minus-merged-kron/{kind}"] = lds_summary([x - y for x, y in zip(a, b)])
    return out


def _ci(s: dict[str, Any]) -> str:
    return f"{s['mean']:+.3f} [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}]"


def table(doc: dict[str, Any]) -> str:
    lines = [
        "| world | D: lora / merged-kron / merged-exact | precond. | (a) lora | (b) merged-kron | (a) − (b), paired | (c) merged-exact | random floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in doc["worlds"].items():
        if "study" not in v:
            continue
        st = v["study"]
        for kind in PRECONDITIONERS:
            m = st["methods"]
            lines.append(
                f"| {name} | {st['dims']['lora']} / {st['dims']['merged-kron']} / {st['dims']['merged-exact']} | {kind} | {_ci(m[f'lora/{kind}'])} | "
                f"{_ci(m[f'merged-kron/{kind}'])} | {_ci(st['paired'][f'lora-minus-merged-kron/{kind}'])} | "
                f"{_ci(m[f'merged-exact/{kind}'])} | {st['random_floor']['mean']:+.3f} ± {st['random_floor']['sd']:.3f} |"
            )
    p = doc.get("pooled", {})
    for kind in PRECONDITIONERS:
        if f"lora/{kind}" in p:
            lines.append(
                f"| **pooled ({p['worlds']} worlds)** | | {kind} | {_ci(p[f'lora/{kind}'])} | {_ci(p[f'merged-kron/{kind}'])} | "
                f"{_ci(p[f'lora-minus-merged-kron/{kind}'])} | {_ci(p[f'merged-exact/{kind}'])} | |"
            )
    return "\n".join(lines)


def main() -> None:
    global OUT
    torch.set_num_threads(1)  # the tiny model: more threads only oversubscribe shared cores
    if "--table" in sys.argv:
        print(table(json.loads(OUT.read_text())))
        return
    names = [a for a in sys.argv[1:] if not a.startswith("-")] or [w.name for w in WORLDS]
    workers = 2
    work, worlds = WORK, WORLDS
    if "--smoke" in sys.argv:  # the code paths at a toy size, results to /tmp
        work, OUT = WORK.parent / "lora_lds_smoke", Path("/tmp/lora_lds_smoke.json")
        small = dict(n_pretrain=4, n_train=8, n_query=3, subsets=3, pretrain_steps=3, steps=3, gt_draws=4)
        worlds = tuple(dataclasses.replace(w, **small) for w in WORLDS)
        names = names[:1]
    doc = json.loads(OUT.read_text()) if OUT.exists() else {"worlds": {}}
    by_name = {w.name: w for w in worlds}
    for name in names:
        w = by_name[name]
        root = work / name
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        say(f"{name}: {w.describe()}")
        prepare(w, root)
        say(f"{name}: base ready ({time.monotonic() - t0:.0f} s); {w.subsets + 1} LoRA trainings")
        gt = ground_truth(w, root, workers)
        say(f"{name}: trainings done ({gt['seconds']:.0f} s)")
        st = study(w, root, gt)
        doc["worlds"][name] = {
            "spec": dataclasses.asdict(w),
            "description": w.describe(),
            "base": json.loads((root / "base.json").read_text()),
            "lora_train_loss_first_last": gt["train_loss_first_last"],
            "training_seconds": gt["seconds"],
            "study": st,
            "seconds": round(time.monotonic() - t0, 1),
        }
        doc["pooled"] = pooled(doc)
        doc["machine"] = machine_info()
        doc["protocol"] = {
            "replicates": REPLICATES, "feature_draws": FEATURE_DRAWS, "preconditioners": list(PRECONDITIONERS),
            "ground_truth": "adapter retrained from the same init on each half-subset, base frozen; gt = -query loss",
        }  # fmt: skip
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(doc, indent=1) + "\n")
        m = st["methods"]
        say(
            f"{name}: LDS normalize lora {m['lora/normalize']['mean']:+.3f}, merged-kron "
            f"{m['merged-kron/normalize']['mean']:+.3f}, merged-exact {m['merged-exact/normalize']['mean']:+.3f}"
        )
    print(table(doc))


if __name__ == "__main__":
    main()
