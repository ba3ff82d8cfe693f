"""Where LDS is won and lost: every attribution factor against the fixed reference, on every world.

For each world of the suite (`bench/worlds.py`, built first), the full gradients of the training
and query clips are computed once per draw rule (`carv_attrib.lds.reference.exact_gradients`),
and every layer set, projection and preconditioner is derived from them
(`carv_attrib.lds.gradspace`: kron features from G equal the tool's KronProjector features for
the same draws, tested). Gram matrices are cached under WORK/NAME/study/, so a rerun only computes
what is new. Rows:

- the fixed references: the training loss, all parameters, unprojected, grad-dot, K = 256 iid σ ~ p
  (the world's training density), with common draws ("ref-crn", 2 seeds) and independent per-clip
  draws ("ref-per-clip", 1 seed);
- estimator jobs: output function (loss | sqnorm) × scheme (iid | stratified | stratified-is with the
  plan's fitted proposal) × K, common draws, 3 seeds; each seed r is the estimator seed *and* the
  projection seed, so CIs cover queries, estimator and projection;
- per job: layer sets (blocks, all-linear, all), projections (none, kron k×k, dense), preconditioners
  (identity, cosine, normalize α, trak λ, diag: the run's own per-coordinate second moment, adam: the
  full model's AdamW v̂ where one was trained);
- the tool's own featurize path (`carv_attrib.lds.study.product_features`) for the shipped
  settings, so the table also says what `carv-attrib featurize` gives.

    .venv/bin/python bench/factors.py                 # every built world -> bench/results/factors.json
    .venv/bin/python bench/factors.py ft-uniform       # some worlds (merged into the JSON)
    .venv/bin/python bench/factors.py ft-uniform --no-product --jobs ref-crn-256,loss-sis-8   # some jobs
    .venv/bin/python bench/factors.py --analyze        # no rerun: selection, fidelity, plan calibration,
                                                       # diagnosis rows of the best (worlds with Grams on disk)
    .venv/bin/python bench/factors.py --analyze --setting 'loss-sis-8|blocks/kron-16x16-gaussian|normalize-0.5'
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _util import load_avg, machine_info

from carv_attrib.attrib.featurizer import build_projector, load_featurizer
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.timesteps import Proposal, density
from carv_attrib.config import PlanConfig
from carv_attrib.lds.gradspace import FeatureSpec, features, gram, scores_from_gram
from carv_attrib.lds.metric import (
    LdsBootstrap,
    common_factor_lds,
    interval,
    query_centered,
    random_floor,
    subset_sums,
)
from carv_attrib.lds.reference import exact_gradients, reference_rule
from carv_attrib.lds.study import Variant, product_features
from carv_attrib.lds.world import WORLD_SUITE, World
from carv_attrib.models.wan import load_transformer

WORK = Path(__file__).resolve().parent / "_work" / "worlds"
OUT = Path(__file__).resolve().parent / "results" / "factors.json"
ADAM_EPS = 1e-8

NONE = tuple(FeatureSpec(layers=s) for s in ("blocks", "all-linear", "all"))
KRON16 = FeatureSpec(layers="blocks", projection="kron")
BASIC = (*NONE, KRON16, FeatureSpec(layers="all-linear", projection="kron"))
SWEEP = (
    *BASIC,
    *(
        FeatureSpec(layers=ls, projection="kron", k_out=k, k_in=k)
        for ls in ("blocks", "all-linear")
        for k in (4, 8, 32)
    ),
    FeatureSpec(layers="all", projection="kron"),
    FeatureSpec(layers="blocks", projection="kron", matrix="rademacher"),
    FeatureSpec(layers="blocks", projection="dense", dim=5120),
)


@dataclass(frozen=True)
class GradJob:
    """One draw rule and output function whose full gradients are computed (per replicate)."""

    name: str
    output_fn: str = "loss"
    scheme: str = "stratified-is"
    k: int = 8
    noise: str = "shared"
    reference: str | None = None  # "crn" | "per-clip": reference seeds and iid draws
    replicates: int = 3
    specs: tuple[FeatureSpec, ...] = BASIC
    keep: bool = False  # keep G on disk (later studies of new features need no backward)


JOBS = (
    GradJob("ref-crn-256", scheme="iid", k=256, reference="crn", replicates=2, specs=NONE, keep=True),
    GradJob(
        "ref-per-clip-256", scheme="iid", k=256, reference="per-clip", replicates=1, specs=NONE, keep=True
    ),
    GradJob("sqnorm-ref-crn-256", "sqnorm", scheme="iid", k=256, reference="crn", replicates=1, specs=NONE),
    GradJob("loss-sis-8", specs=SWEEP, keep=True),
    GradJob("sqnorm-sis-8", "sqnorm", specs=SWEEP, keep=True),
    GradJob("loss-iid-8", scheme="iid"),
    GradJob("loss-strat-8", scheme="stratified"),
    GradJob("sqnorm-iid-8", "sqnorm", scheme="iid"),
    GradJob("sqnorm-strat-8", "sqnorm", scheme="stratified"),
    GradJob("loss-sis-8-per-clip", noise="per-clip"),
    *(GradJob(f"loss-sis-{k}", k=k) for k in (1, 2, 4, 16, 32)),
    *(GradJob(f"sqnorm-sis-{k}", "sqnorm", k=k) for k in (1, 2, 4, 16, 32)),
    *(GradJob(f"loss-iid-{k}", scheme="iid", k=k) for k in (1, 2, 4, 16, 32)),
    *(GradJob(f"loss-strat-{k}", scheme="stratified", k=k) for k in (1, 2, 4, 16, 32)),
)

# preconditioners scored on every Gram: (label, kind, params, gram variant)
PRECONDITIONERS: tuple[tuple[str, str, dict[str, float], str], ...] = (
    ("identity", "identity", {}, "plain"),
    ("cosine", "cosine", {}, "plain"),
    ("normalize-0.5", "normalize", {"alpha": 0.5}, "plain"),
    *((f"trak-{lam:g}", "trak", {"lambda_rel": lam}, "plain") for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0)),
    ("diag-identity", "identity", {}, "diag"),
    ("diag-cosine", "cosine", {}, "diag"),
    ("adam-identity", "identity", {}, "adam"),
    ("adam-cosine", "cosine", {}, "adam"),
)

# The tool's shipped settings, run through its own featurizer (kron on blocks.*, K = 8).
PRODUCT = {
    "old default (loss, kron 8x8, cosine)": dict(output_fn="loss", kron_dims="8x8", precondition="cosine"),
    "last default (sqnorm, kron 16x16, cosine)": dict(
        output_fn="sqnorm", kron_dims="16x16", precondition="cosine"
    ),
}


# -- cache --------------------------------------------------------------------------------------
class Store:
    """Gram matrices (and kept gradients) of one world, one .npy per key under WORK/NAME/study."""

    def __init__(self, root: Path):
        self.root = root
        (root / "grams").mkdir(parents=True, exist_ok=True)
        (root / "grads").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _name(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:20] + ".npy"

    def gram_path(self, key: str) -> Path:
        return self.root / "grams" / self._name(key)

    def grad_path(self, key: str) -> Path:
        return self.root / "grads" / self._name(key)

    def get(self, key: str) -> np.ndarray | None:
        p = self.gram_path(key)
        return np.load(p) if p.exists() else None

    def put(self, key: str, value: np.ndarray) -> None:
        tmp = self.gram_path(key).with_suffix(".tmp.npy")
        np.save(tmp, value)
        tmp.rename(self.gram_path(key))


def gram_key(job: GradJob, r: int, spec: FeatureSpec, variant: str) -> str:
    return f"{job.name}|{job.output_fn}|{job.scheme}|{job.k}|{job.noise}|{job.reference}|r{r}|{spec.key}|{variant}"


# -- draws --------------------------------------------------------------------------------------
def proposal_for(world: World, output_fn: str) -> Proposal:
    """The plan's fitted q for this world and output function: `carv-attrib plan`'s fit with its
    defaults (8 pilot clips, 10 bins x 2 draws, mix 0.1, kron 16x16 on blocks.*), cached."""
    path = world.root / "study" / f"proposal-{output_fn}.json"
    if path.exists():
        return Proposal.from_json(path.read_text())
    from carv_attrib.attrib.pilot import PilotSettings, fit_proposal
    from carv_attrib.pipeline.plan import _pilot_clips
    from carv_attrib.store.run import RunDir

    spec = world.spec
    cfg = PlanConfig(
        run=world.run("train"), model=str(world.model), density=spec.density, output_fn=output_fn
    )
    rule = DrawRule(seed=0, scheme="iid", k=8, density=spec.density, noise="per-clip")
    fz = load_featurizer(
        str(world.model), [None], rule, output_fn, "cpu", "float32",
        new_projector=lambda t: build_projector("kron", t, ["blocks.*"], 0),
    )  # fmt: skip
    clips = _pilot_clips(RunDir(world.run("train")), cfg.pilot_clips)
    q, _ = fit_proposal(fz, clips, PilotSettings.from_config(cfg), density(spec.density))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(q.to_dict()))
    return q


def rule_for(job: GradJob, world: World, r: int, proposals: dict[str, Proposal]) -> DrawRule:
    d = world.spec.density
    if job.reference is not None:
        return reference_rule(d, job.k, job.reference, r)
    q = proposals[job.output_fn] if job.scheme == "stratified-is" else None
    return DrawRule(seed=r, scheme=job.scheme, k=job.k, density=d, proposal=q, noise=job.noise)


# -- compute ------------------------------------------------------------------------------------
def adam_scale(world: World, transformer: torch.nn.Module) -> np.ndarray | None:
    """(P,) 1/(sqrt(v̂)+ε) of the full model's AdamW training, in `named_parameters` order."""
    path = world.second_moments_path
    if not path.exists():
        return None
    v = torch.load(path)
    return (
        torch.cat(
            [
                (1.0 / (v[n].sqrt() + ADAM_EPS)).reshape(-1) if n in v else torch.ones(p.numel())
                for n, p in transformer.named_parameters()
            ]
        )
        .double()
        .numpy()
    )


def compute_job(
    job: GradJob, world: World, store: Store, transformer: torch.nn.Module, clips: list, n_train: int,
    proposals: dict[str, Proposal], adam: np.ndarray | None, say: Any,
) -> None:  # fmt: skip
    for r in range(job.replicates):
        keys = [
            (s, v)
            for s in job.specs
            for v in ("plain", "diag") + (("adam",) if s.layers == "all" and s.projection == "none" else ())
        ]
        todo = [(s, v) for s, v in keys if not store.gram_path(gram_key(job, r, s, v)).exists()]
        if not todo:
            continue
        gkey = gram_key(job, r, FeatureSpec(layers="all"), "grad")
        gpath = store.grad_path(gkey)
        t0 = time.monotonic()
        if gpath.exists():
            G = np.load(gpath)
        else:
            G = exact_gradients(transformer, clips, rule_for(job, world, r, proposals), job.output_fn)
            if job.keep:
                np.save(gpath.with_suffix(".tmp.npy"), G)
                gpath.with_suffix(".tmp.npy").rename(gpath)
        t1 = time.monotonic()
        for spec in {s for s, _ in todo}:
            F = features(G, transformer, spec, seed=r)
            for s, v in todo:
                if s != spec:
                    continue
                if v == "plain":
                    K = gram(F)
                elif v == "diag":  # the run's own per-coordinate second moment (training clips only)
                    K = gram(F, 1.0 / (np.sqrt((np.asarray(F[:n_train], np.float64) ** 2).mean(0)) + 1e-30))
                elif adam is not None:  # the full model's AdamW v̂ (unprojected, all parameters)
                    K = gram(F, adam)
                else:
                    continue
                store.put(gram_key(job, r, s, v), K)
        say(
            f"{world.spec.name} {job.name} r{r}: gradients {t1 - t0:.0f} s, features {time.monotonic() - t1:.0f} s"
        )


def lds_rows(
    job: GradJob, world: World, store: Store, n_train: int, gt: np.ndarray, pos: np.ndarray, dims: dict
) -> dict:
    rows = {}
    for spec in job.specs:
        for label, kind, params, variant in PRECONDITIONERS:
            grams = [store.get(gram_key(job, r, spec, variant)) for r in range(job.replicates)]
            if any(g is None for g in grams):
                continue
            sums = [
                subset_sums(scores_from_gram(g, n_train, kind, dim=dims[spec.key], **params), pos)
                for g in grams
            ]
            rows[f"{job.name}|{spec.key}|{label}"] = {
                "job": job.name, "output_fn": job.output_fn, "scheme": job.scheme, "k": job.k, "noise": job.noise,
                "reference": job.reference, "features": spec.key, "dim": dims[spec.key], "precondition": label,
                "sums": sums,
            }  # fmt: skip
    return rows


def finish_rows(rows: dict[str, Any], gt: np.ndarray) -> dict[str, Any]:
    """Per row: LDS (mean over seeds, CI over subsets, queries and seeds), its ratio to the fixed
    reference with a paired CI (one bootstrap for all rows of the world), and its two parts
    (`evaluate.lds`): the query-specific LDS (and its ratio) and the common-factor LDS; the
    per-replicate sums are dropped."""
    boot = LdsBootstrap(gt.shape[0], gt.shape[1], n_boot=1000, seed=0)
    common_boot = LdsBootstrap(gt.shape[0], 1, n_boot=1000, seed=1)
    gt_c = query_centered(gt)

    def part(
        sums: list[np.ndarray], target: np.ndarray, samples: np.ndarray | None = None
    ) -> tuple[float, list[float], np.ndarray]:
        per_rep = [float(np.nanmean(_spearman(s, target))) for s in sums]
        return float(np.mean(per_rep)), per_rep, boot.samples(sums, target) if samples is None else samples

    ref_sums = rows[REF]["sums"]
    ref_mean, _, ref = part(ref_sums, gt)
    ref_qs_mean, _, ref_qs = part([query_centered(s) for s in ref_sums], gt_c)
    samples_of = {k: boot.samples(r["sums"], gt) for k, r in rows.items()}
    all_sums = {k: r["sums"] for k, r in rows.items()}
    out = {}
    for key, row in rows.items():
        twin = key.split("|")
        twin[1] = twin[1].split("/")[0] + "/none"
        twin_key = "|".join(twin)
        vs_twin = None
        if twin_key != key and twin_key in rows:
            d = samples_of[key] - samples_of[twin_key]
            vs_twin = {"twin": twin_key, "diff": round(float(np.mean([np.nanmean(_spearman(a, gt)) - np.nanmean(_spearman(b, gt)) for a, b in zip(all_sums[key], all_sums[twin_key])])), 4), "ci95": [round(x, 4) for x in interval(d)]}  # fmt: skip
        sums = row.pop("sums")
        mean, per_rep, samples = part(sums, gt, samples_of[key])
        qs_mean, _, qs = part([query_centered(s) for s in sums], gt_c)
        common = [np.asarray(s).mean(1, keepdims=True) for s in sums]
        common_samples = common_boot.samples(common, gt.mean(1, keepdims=True))
        out[key] = {
            **row,
            "lds": {"mean": round(mean, 4), "ci95": [round(x, 4) for x in interval(samples)],
                    "replicates": [round(x, 4) for x in per_rep]},
            "ratio": round(mean / ref_mean, 4),
            "ratio_ci95": [round(x, 4) for x in interval(samples / ref)],
            "query_specific": {"mean": round(qs_mean, 4), "ci95": [round(x, 4) for x in interval(qs)],
                               "ratio": round(qs_mean / ref_qs_mean, 4),
                               "ratio_ci95": [round(x, 4) for x in interval(qs / ref_qs)]},
            "common_factor": {"mean": round(float(np.mean([common_factor_lds(s, gt) for s in sums])), 4),
                              "ci95": [round(x, 4) for x in interval(common_samples)]},
            **({"vs_unprojected": vs_twin} if vs_twin else {}),
        }  # fmt: skip
    return out


def _spearman(sums: np.ndarray, gt: np.ndarray) -> np.ndarray:
    from carv_attrib.lds.metric import _spearman_columns

    return _spearman_columns(sums, gt, axis=0)


def product_rows(world: World, problem: Any, proposals: dict[str, Proposal], pos: np.ndarray) -> dict:
    """The tool's own featurize path (`study.product_features`) for the shipped settings."""
    rows = {}
    for name, kw in PRODUCT.items():
        v = Variant(name, timesteps="stratified-is", density=world.spec.density, draws=8, **kw)
        sums = []
        for r in range(3):
            prob = replace(problem, proposal=proposals[v.output_fn])
            ft = product_features(prob, v, r, problem.train)
            fq = product_features(prob, v, r, problem.query)
            n = len(problem.train)
            K = gram(np.concatenate([ft, fq]))
            sums.append(subset_sums(scores_from_gram(K, n, v.precondition, dim=ft.shape[1]), pos))
        rows[f"product|{name}"] = {
            **kw, "job": "product", "output_fn": v.output_fn, "scheme": v.timesteps, "k": v.draws, "noise": v.noise,
            "reference": None, "features": f"blocks/kron-{kw['kron_dims']}-gaussian", "dim": ft.shape[1],
            "precondition": v.precondition, "sums": sums,
        }  # fmt: skip
    return rows


def run_world(world: World, say: Any, jobs: set[str] | None = None, products: bool = True) -> dict[str, Any]:
    problem = world.problem()
    clips = problem.train + problem.query
    n_train = len(problem.train)
    gt, pos = problem.gt_values, problem.positions
    store = Store(world.root / "study")
    transformer = load_transformer(str(world.model))
    proposals = {fn: proposal_for(world, fn) for fn in ("loss", "sqnorm")}
    adam = adam_scale(world, transformer)
    from carv_attrib.lds.gradspace import describe

    dims = {s.key: describe(s, transformer)["dim"] for s in SWEEP}
    t0 = time.monotonic()
    rows: dict[str, Any] = {}
    for job in JOBS:
        if jobs is not None and job.name not in jobs and not job.name.startswith("ref-crn"):
            continue
        compute_job(job, world, store, transformer, clips, n_train, proposals, adam, say)
        rows.update(lds_rows(job, world, store, n_train, gt, pos, dims))
    if products:
        rows.update(product_rows(world, problem, proposals, pos))
    return {
        "spec": world.spec.to_dict(),
        "description": world.spec.describe(),
        "random": random_floor(gt, pos, n_train),
        "query_gt_correlation": float(np.corrcoef(gt.T)[np.triu_indices(gt.shape[1], 1)].mean()),
        "rows": finish_rows(rows, gt),
        "proposals": {fn: q.to_dict() for fn, q in proposals.items()},
        "seconds": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    args = sys.argv[1:]
    jobs = None
    if "--jobs" in args:
        i = args.index("--jobs")
        jobs, args = set(args[i + 1].split(",")), args[:i] + args[i + 2 :]
    setting = None  # --analyze --setting KEY: analyse the shipped setting rather than the ranking's winner
    if "--setting" in args:
        i = args.index("--setting")
        setting, args = args[i + 1], args[:i] + args[i + 2 :]
    products = "--no-product" not in args
    analyze = "--analyze" in args
    args = [a for a in args if a not in ("--no-product", "--analyze")]
    names = args or ([] if analyze else [w.name for w in WORLD_SUITE])  # --analyze alone: no rerun
    doc = json.loads(OUT.read_text()) if OUT.exists() else {}
    if "suite" not in doc:
        doc = {"suite": "WORLD_SUITE", "worlds": {}}
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    for spec in WORLD_SUITE:
        world = World(spec, WORK / spec.name)
        if spec.name not in names or not (world.root / "installed.json").exists():
            continue
        new = run_world(world, say, jobs, products)
        old = doc["worlds"].get(spec.name, {}).get("rows", {})
        new["rows"] = {**old, **new["rows"]}  # the same ground truth and bootstrap: rows stay comparable
        doc["worlds"][spec.name] = new
        doc["machine"], doc["load_avg"] = machine_info(), load_avg()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(doc) + "\n")
        say(f"{spec.name}: done")
    doc["selection"] = select(doc)
    best = setting or doc["selection"].get("best", {}).get("setting")
    if best is not None and analyze:
        job, features, precond = best.split("|")
        fn = next(j.output_fn for j in JOBS if j.name == job)
        doc["fidelity"], doc["calibration"] = {}, {}
        for spec in WORLD_SUITE:
            world = World(spec, WORK / spec.name)
            # fidelity and calibration read the cached Grams: only worlds whose study is on disk
            if spec.name in doc["worlds"] and (world.root / "study" / "grams").is_dir():
                doc["fidelity"][spec.name] = fidelity(world, fn, features, precond)
                doc["calibration"][spec.name] = calibration(
                    world, fn, features, precond, doc["worlds"][spec.name]["rows"]
                )
        doc["diagnosis_rows"] = diagnosis_rows(best)
    OUT.write_text(json.dumps(doc) + "\n")


def diagnosis_rows(best: str) -> list[str]:
    """One factor at a time around the chosen setting: reference, draws, scheme, output function,
    preconditioner, layer set, projection size and kind."""
    job, features, precond = best.split("|")
    layers = features.split("/")[0]
    fn = job.split("-")[0]
    other_fn = "sqnorm" if fn == "loss" else "loss"
    rows = [REF, REF_PER_CLIP, "ref-crn-256|all/none|cosine", "ref-crn-256|all/none|adam-identity", best]
    rows += [f"{fn}-sis-8|{layers}/none|{precond}", f"{fn}-sis-8|all/none|{precond}"]
    rows += [f"{fn}-{s}-8|{features}|{precond}" for s in ("iid", "strat")]
    rows += [f"{fn}-sis-8-per-clip|{features}|{precond}", f"{other_fn}-sis-8|{features}|{precond}"]
    rows += [
        f"{job}|{features}|{p}"
        for p in ("identity", "cosine", "normalize-0.5", "trak-0.1", "trak-1", "diag-identity")
        if p != precond
    ]
    rows += [
        f"{job}|{ls}/kron-{k}x{k}-gaussian|{precond}"
        for ls in ("blocks", "all-linear")
        for k in (4, 8, 16, 32)
    ]
    rows += [
        f"{job}|all/kron-16x16-gaussian|{precond}",
        f"{job}|blocks/kron-16x16-rademacher|{precond}",
        f"{job}|blocks/dense-5120-gaussian|{precond}",
    ]
    rows += [f"{fn}-sis-{k}|{features}|{precond}" for k in (1, 2, 4, 16, 32)]
    seen: list[str] = []
    return [r for r in rows if not (r in seen or seen.append(r))]  # type: ignore[func-returns-value]


# -- analysis -----------------------------------------------------------------------------------
REF = "ref-crn-256|all/none|identity"
# The tool's settings before and after this study, as study rows (kron on blocks.*, K = 8; gradspace's
# kron equals the tool's KronProjector, tests/lds/test_gradspace.py); bench/report.py labels its
# tables with these names (from the JSON's selection.shipped).
SHIPPED = {
    "old default": "loss-sis-8|blocks/kron-8x8-gaussian|cosine",
    "last default": "sqnorm-sis-8|blocks/kron-16x16-gaussian|cosine",
    "loss + cosine": "loss-sis-8|blocks/kron-16x16-gaussian|cosine",
    "new default": "loss-sis-8|blocks/kron-16x16-gaussian|normalize-0.5",
    "new default, iid at equal cost": "loss-iid-8|blocks/kron-16x16-gaussian|normalize-0.5",
}
REF_PER_CLIP = "ref-per-clip-256|all/none|identity"


def shippable(row: dict[str, Any]) -> bool:
    """A setting featurize can run at Wan2.1 scale: projected, K = 8, common draws, no optimizer state."""
    return (
        row["reference"] is None and row["k"] == 8 and row["noise"] == "shared"
        and "/none" not in row["features"] and not row["precondition"].startswith("adam")
    )  # fmt: skip


def select(doc: dict[str, Any]) -> dict[str, Any]:
    """Every shippable setting against the fixed reference on every world, ranked by its worst world.

    The rule: maximise the minimum over *all* worlds of LDS − reference LDS (a difference is defined
    where the reference has no signal, a ratio is not); ties within 0.005 go to the larger mean. Beside
    it: the ratio to the reference on the worlds where the reference has signal (its LDS CI above 0)
    and the query-specific LDS ratio on every world."""
    worlds = doc["worlds"]
    signal = [w for w, x in worlds.items() if x["rows"][REF]["lds"]["ci95"][0] > 0]
    keys = set.intersection(*(set(w["rows"]) for w in worlds.values()))
    table = {}
    for key in keys:
        rows = {w: worlds[w]["rows"][key] for w in worlds}
        if not shippable(next(iter(rows.values()))):
            continue
        ratios = {w: rows[w]["ratio"] for w in signal}
        # the query-specific part is missing from rows computed before it was defined
        qs = {w: rows[w]["query_specific"]["ratio"] for w in worlds if "query_specific" in rows[w]}
        diffs = {w: round(rows[w]["lds"]["mean"] - worlds[w]["rows"][REF]["lds"]["mean"], 4) for w in worlds}
        table[key] = {
            "min_diff_to_reference": min(diffs.values()),
            "mean_diff_to_reference": round(float(np.mean(list(diffs.values()))), 4),
            "diff_to_reference": diffs,
            "min": min(ratios.values()) if ratios else None,
            "mean": float(np.mean(list(ratios.values()))) if ratios else None,
            "ratios": ratios,
            "ratio_ci95": {w: rows[w]["ratio_ci95"] for w in signal},
            "query_specific_min": min(qs.values()) if qs else None,
            "query_specific_ratios": qs,
        }
    # the worst world first; among the settings within 0.005 of the best worst world, the larger mean
    top = max((t["min_diff_to_reference"] for t in table.values()), default=0.0)

    def order(k: str) -> tuple[bool, float]:
        t = table[k]
        near = t["min_diff_to_reference"] >= top - 0.005
        return (not near, -(t["mean_diff_to_reference"] if near else t["min_diff_to_reference"]))

    ranked = sorted(table, key=order)
    out: dict[str, Any] = {
        "rule": "max over settings of min over worlds of (LDS - fixed reference LDS); ties (0.005) by mean",
        "worlds": list(worlds), "worlds_with_reference_signal": signal,
        "ranked": [{"setting": k, **table[k]} for k in ranked[:60]],
        "shipped": {k: {"label": label, **table[k]} for label, k in SHIPPED.items() if k in table},
    }  # fmt: skip
    if ranked:
        out["best"] = {"setting": ranked[0], **table[ranked[0]]}
    return out


SCHEME_ABBR = {"iid": "iid", "stratified": "strat", "stratified-is": "sis"}
K_SWEEP = (1, 2, 4, 8, 16, 32)


def _scores(
    store: Store, job_name: str, r: int, features: str, precond: str, n_train: int, dim: int
) -> np.ndarray | None:
    job = next(j for j in JOBS if j.name == job_name)
    spec = next(s for s in SWEEP if s.key == features)
    label, kind, params, variant = next(p for p in PRECONDITIONERS if p[0] == precond)
    K = store.get(gram_key(job, r, spec, variant))
    return None if K is None else scores_from_gram(K, n_train, kind, dim=dim, **params)


def _spearman_mean(a: np.ndarray, b: np.ndarray) -> float:
    from carv_attrib.lds.metric import _spearman_columns

    return float(np.nanmean(_spearman_columns(a, b, axis=0)))


def fidelity(world: World, output_fn: str, features: str, precond: str) -> dict[str, Any]:
    """CARV's own claim, apart from LDS: Spearman (per query, over training clips) of a setting's
    K-draw scores with the same setting's K = 256 scores, unprojected over the same layers (the mean
    of the reference seeds' scores), per scheme and K; mean and SE over the 3 estimator seeds. Both
    the setting as given (projected) and its unprojected twin (the estimator alone)."""
    store, n_train = Store(world.root / "study"), world.spec.n_train
    transformer = load_transformer(str(world.model))
    from carv_attrib.lds.gradspace import describe

    dims = {s.key: describe(s, transformer)["dim"] for s in SWEEP}
    layers = features.split("/")[0]
    target_job = "ref-crn-256" if output_fn == "loss" else "sqnorm-ref-crn-256"
    reps = next(j for j in JOBS if j.name == target_job).replicates
    targets = [
        _scores(store, target_job, r, f"{layers}/none", precond, n_train, dims[f"{layers}/none"])
        for r in range(reps)
    ]
    if any(t is None for t in targets):
        return {}
    target = np.mean(targets, axis=0)
    out: dict[str, Any] = {"target": f"{target_job}|{layers}/none|{precond}"}
    for feats in (features, f"{layers}/none"):
        table = {}
        for scheme, ab in SCHEME_ABBR.items():
            for k in K_SWEEP:
                name = f"{output_fn}-{ab}-{k}"
                if not any(j.name == name for j in JOBS):
                    continue
                per = [_scores(store, name, r, feats, precond, n_train, dims[feats]) for r in range(3)]
                if any(p is None for p in per):
                    continue
                rho = [_spearman_mean(p, target) for p in per]
                table.setdefault(scheme, {})[str(k)] = {
                    "mean": round(float(np.mean(rho)), 4), "se": round(float(np.std(rho, ddof=1) / np.sqrt(3)), 4),
                }  # fmt: skip
        out[feats] = table
    return out


def calibration(
    world: World, output_fn: str, features: str, precond: str, doc_rows: dict[str, Any]
) -> dict[str, Any]:
    """`plan`'s rule on this world: the first K (stratified-is) at which estimator seeds 0 and 1 agree
    (top-10 overlap ≥ 0.9 and Spearman ≥ 0.95 over the training clips, mean over queries), beside
    the setting's LDS at each K. The agreement is measured on the unprojected twin (same layers and
    preconditioner): `plan` holds the projection fixed and varies the estimator seed only, while the
    study's seed r changes both."""
    from carv_attrib.lds.gradspace import describe
    from carv_attrib.search.stability import is_stable, ranking_agreement

    store, n_train = Store(world.root / "study"), world.spec.n_train
    transformer = load_transformer(str(world.model))
    twin = features.split("/")[0] + "/none"
    dim = describe(next(s for s in SWEEP if s.key == twin), transformer)["dim"]
    curve, chosen = [], None
    for k in K_SWEEP:
        name = f"{output_fn}-sis-{k}"
        a, b = (_scores(store, name, r, twin, precond, n_train, dim) for r in (0, 1))
        if a is None or b is None:
            continue
        overlap, rho = ranking_agreement(a, b, top_k=10)
        row = doc_rows.get(f"{name}|{features}|{precond}", {})
        curve.append({"draws": k, "top10_overlap": round(overlap, 4), "spearman": round(rho, 4),
                      "lds": row.get("lds", {}).get("mean"), "lds_ci95": row.get("lds", {}).get("ci95")})  # fmt: skip
        if chosen is None and is_stable(overlap, rho):
            chosen = k
    return {
        "setting": f"{output_fn}|{features}|{precond}",
        "agreement_on": twin,
        "stable_draws": chosen,
        "curve": curve,
    }


if __name__ == "__main__":
    main()
