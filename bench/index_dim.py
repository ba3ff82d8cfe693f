"""LDS against the index dimension D' (`carv-attrib index --index-dim`): is a compressed index as good?

Worlds: the suite's ft-shift-short itself (32 subsets x 3 training seeds) and reduced members of the LDS suite (`carv_attrib.lds.world`), same kinds and seeds but
16 subsets and 1 training seed each (the full suite's 32 x 2-3 trainings did not fit this bench's
CPU budget; idx-ft-logitnormal-short trains 40 steps where the suite's logit-normal world trains 300), built under bench/_work/index_dim/NAME. Per world, the exact gradients of the training
and query clips are computed once per replicate r (`lds.reference.exact_gradients`, K = 8
stratified draws of the world's density, seed r), kron features of the transformer blocks' Linear
layers are derived from them (`lds.gradspace.features`, projection seed r; equal to the tool's
KronProjector features for the same draws), preconditioned as the index would
(`search.precondition`), and then sketched to D' (`search.sketch`, SKETCH_SEEDS sketch seeds per
replicate). No PCA: with n_train = 48-64 < D' it keeps every training vector exactly, so these
worlds cannot measure it (see `search.sketch`).

LDS (`lds.metric`): mean over replicates, CI over subsets and queries (bootstrap) and replicates;
the difference to the uncompressed index of the same replicate is a paired bootstrap.

    nice -n 10 .venv/bin/python bench/index_dim.py --build      # build the worlds (resumes)
    nice -n 10 .venv/bin/python bench/index_dim.py              # -> bench/results/index_dim.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from carv_attrib.lds.world import WORLD_SUITE, World, WorldSpec, build_world

WORK = Path(__file__).resolve().parent / "_work" / "index_dim"
OUT = Path(__file__).resolve().parent / "results" / "index_dim.json"

_SMALL = dict(n_train=48, n_query=12, subsets=16, train_seeds=1)
_SUITE_KEPT = {w.name: w for w in WORLD_SUITE}[
    "ft-shift-short"
]  # the suite's own world (32 subsets x 3 seeds)
WORLDS = (
    _SUITE_KEPT,
    WorldSpec(name="idx-ft-shift-short", seed=12, steps=40, density="shift:3", **_SMALL),
    WorldSpec(name="idx-ft-logitnormal-short", seed=11, steps=40, density="logit-normal:0,1", **_SMALL),
    WorldSpec(
        name="idx-scratch-minibatch-short",
        seed=19,
        steps=60,
        batch_clips=8,
        init="scratch",
        lr=2e-3,
        **_SMALL,
    ),
)


def say(s: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)


def build(names: list[str]) -> None:
    from carv_attrib.pipeline.encode import run_encode

    for spec in WORLDS:
        if names and spec.name not in names:
            continue
        t0 = time.monotonic()
        build_world(spec, WORK / spec.name, workers=1, say=say, encode=run_encode)
        say(f"{spec.name}: built in {time.monotonic() - t0:.0f} s")


INDEX_DIMS = (2048, 4096, 8192, 16384)
KINDS = ("srht", "countsketch")
PRECONDITIONERS = ("normalize", "identity", "cosine")  # trak at D = 20480 needs a 20480² inverse per seed
REPLICATES = 3  # draw + projection seeds r
SKETCH_SEEDS = 5  # sketch seeds s per replicate
BASES = ((32, 32), (16, 16))  # kron k_out x k_in per layer: D = 20 layers x 1024 = 20480; 5120


def gradients(world: World, transformer: object, clips: list, r: int) -> np.ndarray:
    """(n_train + n_query, P) exact gradients, K = 8 stratified draws (seed r, shared), cached."""
    from carv_attrib.carv.draws import DrawRule
    from carv_attrib.lds.reference import exact_gradients

    path = world.root / "index_dim" / f"grads-r{r}.npy"
    if path.exists():
        return np.load(path)
    rule = DrawRule(seed=r, scheme="stratified", k=8, density=world.spec.density, noise="shared")
    G = exact_gradients(transformer, clips, rule, "loss")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), G)
    path.with_suffix(".tmp.npy").rename(path)
    return G


def _spearman_mean(a: np.ndarray, b: np.ndarray) -> float:
    from carv_attrib.lds.metric import _spearman_columns

    return float(np.nanmean(_spearman_columns(a, b, axis=0)))


def _self_top1(train: np.ndarray, query: np.ndarray) -> float:
    """The fraction of training clips that, as queries, rank themselves first."""
    return float(np.mean(np.argmax(query @ train.T, axis=1) == np.arange(len(train))))


def measure(spec: WorldSpec) -> dict:
    from carv_attrib.lds.gradspace import FeatureSpec, features
    from carv_attrib.lds.metric import LdsBootstrap, interval, lds_from_sums, subset_sums
    from carv_attrib.models.wan import load_transformer
    from carv_attrib.search.precondition import fit_preconditioner
    from carv_attrib.search.sketch import Sketch, SketchSpec

    world = World(spec, WORK / spec.name)
    problem = world.problem()
    clips = problem.train + problem.query
    n = len(problem.train)
    gt, pos = problem.gt_values, problem.positions
    transformer = load_transformer(str(world.model))
    grads = [gradients(world, transformer, clips, r) for r in range(REPLICATES)]
    boot = LdsBootstrap(gt.shape[0], gt.shape[1], n_boot=1000, seed=0)
    lds = lambda sums: float(np.nanmean(lds_from_sums(sums, gt)))  # noqa: E731
    rows: dict = {}
    for k_out, k_in in BASES:
        fspec = FeatureSpec(layers="blocks", projection="kron", k_out=k_out, k_in=k_in)
        feats = [features(G, transformer, fspec, seed=r) for r, G in enumerate(grads)]
        dim = feats[0].shape[1]
        for kind in PRECONDITIONERS:
            pre = fit_preconditioner(kind, dim=dim)
            psi = [(pre.prepare_train(F[:n]), pre.prepare_query(F[n:])) for F in feats]
            selfq = [pre.prepare_query(F[:n]).astype(np.float64) for F in feats]  # training clips as queries
            base_scores = [t.astype(np.float64) @ q.astype(np.float64).T for t, q in psi]  # (n, Q) each
            base_sums = [subset_sums(s, pos) for s in base_scores]
            paired = [base_sums[r] for r in range(REPLICATES) for _ in range(SKETCH_SEEDS)]
            base_samples = boot.samples(paired, gt)
            key0 = f"kron-{k_out}x{k_in}|{kind}"
            rows[f"{key0}|none"] = {
                "features": f"blocks/kron-{k_out}x{k_in}", "dim": dim, "precondition": kind,
                "sketch": None, "index_dim": dim,
                "self_top1": round(float(np.mean([_self_top1(t.astype(np.float64), q) for (t, _), q in zip(psi, selfq)])), 4),
                "lds": {"mean": round(float(np.mean([lds(s) for s in base_sums])), 4),
                        "ci95": [round(x, 4) for x in interval(base_samples)],
                        "replicates": [round(lds(s), 4) for s in base_sums]},
            }  # fmt: skip
            for sk_kind in KINDS:
                for d2 in INDEX_DIMS:
                    if d2 >= dim:
                        continue
                    t0 = time.monotonic()
                    sums, fid, err, top1 = [], [], [], []
                    for r, (t, q) in enumerate(psi):
                        for s in range(SKETCH_SEEDS):
                            sk = Sketch(SketchSpec(sk_kind, dim, d2, seed=1000 * r + s))
                            st, sq = sk.apply(t, np.float64), sk.apply(q, np.float64)
                            sc = st @ sq.T
                            sums.append(subset_sums(sc, pos))
                            top1.append(_self_top1(st, sk.apply(selfq[r], np.float64)))
                            fid.append(_spearman_mean(sc, base_scores[r]))
                            # the sketch's error on what a query's ranking reads: its scores' deviations
                            # from their mean over the training clips (a common shift ranks nothing),
                            # relative to the spread of the exact scores
                            e = sc - base_scores[r]
                            e = e - e.mean(axis=0, keepdims=True)
                            err.append(float(np.sqrt(np.mean(e**2)) / np.mean(base_scores[r].std(axis=0))))
                    samples = boot.samples(sums, gt)
                    per = [lds(s) for s in sums]
                    diff = samples - base_samples
                    rows[f"{key0}|{sk_kind}-{d2}"] = {
                        "features": f"blocks/kron-{k_out}x{k_in}", "dim": dim, "precondition": kind,
                        "sketch": sk_kind, "index_dim": d2,
                        "lds": {"mean": round(float(np.mean(per)), 4), "ci95": [round(x, 4) for x in interval(samples)],
                                "replicates": [round(x, 4) for x in per]},
                        "diff_vs_none": {"mean": round(float(np.mean(per)) - rows[f"{key0}|none"]["lds"]["mean"], 4),
                                         "ci95": [round(x, 4) for x in interval(diff)]},
                        "score_spearman_vs_none": round(float(np.mean(fid)), 4),
                        "self_top1": round(float(np.mean(top1)), 4),
                        "score_error_vs_spread": round(float(np.mean(err)), 4),
                        "seconds": round(time.monotonic() - t0, 2),
                    }  # fmt: skip
                    say(
                        f"{spec.name} {key0} {sk_kind}-{d2}: {rows[f'{key0}|{sk_kind}-{d2}']['diff_vs_none']}"
                    )
    return {"spec": spec.to_dict(), "description": spec.describe(), "n_train": n, "n_query": gt.shape[1],
            "subsets": gt.shape[0], "rows": rows}  # fmt: skip


def recommend(doc: dict) -> dict:
    """Per sketch kind, the smallest D' from which on every D' up to the largest measured loses
    < 0.01 mean LDS on every world and preconditioner at the largest base D ("kind"), and the same
    with the paired CI's lower end above −0.01 ("kind-ci"); None where even the largest fails."""
    out = {}
    for kind in KINDS:
        for strict in (False, True):

            def passes(d2: int, strict: bool = strict, kind: str = kind) -> bool:
                rows = [
                    row
                    for w in doc["worlds"].values()
                    for key, row in w["rows"].items()
                    if row["sketch"] == kind and row["index_dim"] == d2 and key.startswith("kron-32x32")
                ]
                pick = (
                    (lambda r: r["diff_vs_none"]["ci95"][0])
                    if strict
                    else (lambda r: r["diff_vs_none"]["mean"])
                )
                return bool(rows) and all(pick(r) > -0.01 for r in rows)

            best = None
            for d2 in reversed(INDEX_DIMS):
                if not passes(d2):
                    break
                best = d2
            out[f"{kind}{'-ci' if strict else ''}"] = best
    return out


def table(doc: dict) -> str:
    """The README's markdown table: LDS (CI) without compression, and its change (paired CI) per D'."""
    lines = []
    for wname, w in doc["worlds"].items():
        for key, row in w["rows"].items():
            if row["sketch"] is not None:
                continue
            base = key.rsplit("|", 1)[0]
            cells = [f"{wname}", row["features"].split("/")[1], str(row["dim"]), row["precondition"],
                     f"{row['lds']['mean']:.3f} [{row['lds']['ci95'][0]:.3f}, {row['lds']['ci95'][1]:.3f}]"]  # fmt: skip
            for kind in KINDS:
                for d2 in INDEX_DIMS:
                    r = w["rows"].get(f"{base}|{kind}-{d2}")
                    if r is None:
                        cells.append("")
                        continue
                    d = r["diff_vs_none"]
                    cells.append(f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
            lines.append("| " + " | ".join(cells) + " |")
    head = ["world", "kron", "D", "precondition", "LDS, no sketch"] + [
        f"{kind} {d2 // 1024}k" for kind in KINDS for d2 in INDEX_DIMS
    ]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines])


def throughput() -> dict:
    """Seconds to sketch 256 float32 vectors of Wan2.1-1.3B's default D = 76,800 (the index build's
    extra cost per shard), best of 3, per kind and D'."""
    from carv_attrib.search.sketch import Sketch, SketchSpec

    x = np.random.default_rng(0).standard_normal((256, 76800)).astype(np.float32)
    out = {}
    for kind in KINDS:
        for d2 in INDEX_DIMS:
            sk = Sketch(SketchSpec(kind, 76800, d2))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                sk.apply(x)
                times.append(time.perf_counter() - t0)
            out[f"{kind}-{d2}"] = {
                "s_per_256": round(min(times), 3),
                "ms_per_clip": round(1000 * min(times) / 256, 2),
            }
    return out


def main(names: list[str]) -> None:
    from _util import load_avg, machine_info

    doc = json.loads(OUT.read_text()) if OUT.exists() else {"worlds": {}}
    for spec in WORLDS:
        if names and spec.name not in names:
            continue
        if not (WORK / spec.name / "installed.json").exists():
            say(f"{spec.name}: not built (run --build first); skipped")
            continue
        t0 = time.monotonic()
        doc["worlds"][spec.name] = measure(spec) | {"seconds": round(time.monotonic() - t0, 1)}
    doc["settings"] = {
        "index_dims": list(INDEX_DIMS), "sketches": list(KINDS), "preconditioners": list(PRECONDITIONERS),
        "replicates": REPLICATES, "sketch_seeds_per_replicate": SKETCH_SEEDS,
        "draws": "K = 8 stratified, density of the world, shared noise, seed r",
        "features": "blocks.* Linear layers, kron k_out x k_in gaussian, projection seed r",
        "ci": "bootstrap over subsets and queries (1000), replicates resampled; diff paired",
    }  # fmt: skip
    doc["recommendation"] = recommend(doc)
    doc["throughput_d76800"] = throughput()
    doc["machine"], doc["load_avg"] = machine_info(), load_avg()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    say(f"wrote {OUT}: recommendation {doc['recommendation']}")


if __name__ == "__main__":
    import torch

    # one thread: the 2 cores are shared, and two threads under contention ran the lite
    # pretraining ~50x slower than the suite's 16 s
    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--build" in sys.argv:
        build(args)
    elif "--recommend" in sys.argv:  # recomputed from the JSON, no rerun
        doc = json.loads(OUT.read_text())
        doc["recommendation"] = recommend(doc)
        OUT.write_text(json.dumps(doc, indent=1) + "\n")
        print(doc["recommendation"])
    elif "--table" in sys.argv:
        print(table(json.loads(OUT.read_text())))
    else:
        main(args)
