"""Effective compute multiplier (ECM) of CARV's estimators, measured like for like.

For each method every evaluation clip gets R independent estimates (replicate seeds, per-clip
noise) of its feature; ECM = (Var_a · Cost_a) / (Var_m · Cost_m) against (a) the baseline "a fresh
decode + VAE + text encode for every draw, iid σ ~ p, K = 1", repeated K times. The methods encode
once and reuse the encode for K draws: (b) iid, (c) stratified, (d) stratified-is with the proposal
`carv-attrib plan` fits on disjoint pilot clips, (e) antithetic variants.

Like for like:
- **Cost**: every estimate's K draws run in one backward for the baseline as for the methods, so
  c_draw (median seconds per draw at batch K) is the same on both sides; c_enc is the median of
  timed decode + VAE + text encodes. Cost_a = K·(c_enc + c_draw), Cost_m = c_enc + K·c_draw, so
  ECM = (Var_a/Var_m) · K(ρ+1)/(ρ+K) with ρ = c_enc/c_draw: a *variance* factor times a *reuse*
  factor. The encode is deterministic (the posterior mode), so the reuse factor is pure amortisation.
- **ρ**: the measured toy ratio, and Wan2.1-T2V-1.3B's at 17x480x832 (and 81 frames) from FLOP counts
  of the real configs (`bench/wan_costs.py`: VAE encode + UMT5 forward over one transformer
  forward+backward; the same hardware efficiency is assumed for both).
- **Variance of what attribution uses**: the raw feature (tr Cov), the stored feature (unit-normalised
  per checkpoint block, the default cosine index), and the scores against fixed queries (each query's
  feature at K = 64, normalised): mean over clips and queries of Var_r(score).
- **Bias**: baseline and methods use disjoint seeds (independent noise); on 8 fixed directions per
  clip a Welch t-test compares the replicate means, and the family-wise (Bonferroni) p-value over all
  directions and clips must stay above 0.01.

    .venv/bin/python bench/ecm.py            # ~10 min on 2 cores -> bench/results/ecm.json
    .venv/bin/python bench/ecm.py --output-fn sqnorm   # D-TRAK's output -> ecm_sqnorm.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_model import BenchModel, prepare

METHODS = (
    ("iid", False),
    ("stratified", False),
    ("stratified-is", False),
    ("iid", True),
    ("stratified-is", True),
)


def name_of(scheme: str, antithetic: bool) -> str:
    return scheme + ("+antithetic" if antithetic else "")


class Encoder:
    """The upstream work for one clip: decode (decord) + VAE encode + text embedding, as encode does."""

    def __init__(self, model: str, run: Path):
        import pyarrow.parquet as pq

        from carv_attrib.models.wan import load_wan
        from carv_attrib.store.shards import ShardStore
        from carv_attrib.video.decode import FramePolicy

        cfg = ShardStore(run, "latents").read_config()["config"]
        self.policy = FramePolicy(
            frames=cfg["frames"], height=cfg["height"], width=cfg["width"], fps=cfg["fps"]
        )
        self.rows = {r["clip_id"]: r for r in pq.read_table(run / "manifest" / "clips.parquet").to_pylist()}
        self.wan = load_wan(model, ("vae", "text_encoder", "tokenizer"), device="cpu")

    def __call__(self, clip_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        from carv_attrib.models.wan import encode_prompts, encode_video
        from carv_attrib.video.decode import decode_clip, frames_to_tensor

        row = self.rows[clip_id]
        frames = decode_clip(row["path"], self.policy).frames
        z = encode_video(self.wan.vae, frames_to_tensor(frames)[None])[0]  # (C, T, h, w)
        (emb,) = encode_prompts(self.wan, [row["caption"]])  # (L, D)
        return z, emb


def estimates(
    featurizer: Any,
    latents: dict[int, tuple[torch.Tensor, torch.Tensor]],
    clip_ids: list[int],
    rule: Any,
    replicates: int,
) -> tuple[torch.Tensor, list[float]]:
    """(φ̂ (R, N, D) float64, seconds per draw of each estimate). The K draws of an estimate run in
    one backward for every method, the baseline included: its K single-draw estimates with fresh
    encodes equal, in distribution, K iid draws on the one (deterministic) encode, so only the encode
    cost differs and is accounted for separately."""
    feats = torch.zeros(replicates, len(clip_ids), featurizer.dim, dtype=torch.float64)
    per_draw = []
    for r in range(replicates):
        featurizer.use_rule(dataclasses.replace(rule, seed=rule.seed + 100_003 * r))
        for n, cid in enumerate(clip_ids):
            t0 = time.perf_counter()
            f, _, _ = featurizer.features([(cid, *latents[cid])])
            per_draw.append((time.perf_counter() - t0) / rule.k)
            feats[r, n] = f[0].double()
    return feats, per_draw


def encode_seconds(encoder: Encoder, clip_ids: list[int], repeats: int) -> tuple[dict[int, Any], float]:
    """The encodes of the clips and the median seconds of one decode + VAE + text encode."""
    times, out = [], {}
    for _ in range(repeats):
        for cid in clip_ids:
            t0 = time.perf_counter()
            out[cid] = encoder(cid)
            times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def total_variance(feats: torch.Tensor) -> float:
    """Mean over clips of tr Cov over replicates: feats (R, N, D)."""
    return float(feats.var(dim=0, unbiased=True).sum(dim=1).mean())


def unit(feats: torch.Tensor) -> torch.Tensor:
    """Unit-normalised along the last axis: the stored feature of the cosine index (one block)."""
    return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def variances(feats: torch.Tensor, queries: torch.Tensor) -> dict[str, float]:
    """feats (R, N, D), queries (Q, D) unit → raw, stored (unit) and score variances."""
    u = unit(feats)
    scores = u @ queries.T  # (R, N, Q)
    return {
        "raw": total_variance(feats),
        "stored": total_variance(u),
        "score": float(scores.var(dim=0, unbiased=True).mean()),
    }


def reuse_factor(k: int, rho: float) -> float:
    """Cost_baseline / Cost_method = K(ρ+1)/(ρ+K) for ρ = c_enc/c_draw at equal batching."""
    return k * (rho + 1) / (rho + k)


def bias_z(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Welch t of replicate means on fixed directions and its Welch–Satterthwaite degrees of
    freedom: a, b (R, N, D), directions (D, M) → (t (N, M), df (N, M))."""
    pa, pb = a @ directions, b @ directions  # (R, N, M)
    va, vb = pa.var(0, unbiased=True) / pa.shape[0], pb.var(0, unbiased=True) / pb.shape[0]
    se2 = (va + vb).clamp_min(1e-300)
    df = se2**2 / (va**2 / (pa.shape[0] - 1) + vb**2 / (pb.shape[0] - 1)).clamp_min(1e-300)
    return (pa.mean(0) - pb.mean(0)) / se2.sqrt(), df


def bonferroni_p(t: torch.Tensor, df: torch.Tensor) -> float:
    """The smallest two-sided Welch p-value times the number of tests (capped at 1): the family-wise
    error of "some direction of some clip is biased" with Student-t tails at R replicates."""
    from scipy.stats import t as student_t

    p = 2 * student_t.sf(t.abs().numpy(), df.numpy())
    return float(min(1.0, p.min() * p.size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench/_work/model"))
    ap.add_argument("--draws", type=int, default=8, help="K draws per encode")
    ap.add_argument("--clips", type=int, default=8, help="evaluation clips (disjoint from the plan's pilot)")
    ap.add_argument("--replicates", type=int, default=12)
    ap.add_argument("--pilot-clips", type=int, default=8)
    ap.add_argument("--queries", type=int, default=4, help="fixed query clips for the score variance")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--output-fn", default="loss", choices=("loss", "sqnorm"), help="featurize's output function"
    )
    ap.add_argument("--out", type=Path, help="default bench/results/ecm.json (ecm_sqnorm.json for sqnorm)")
    args = ap.parse_args()
    if args.out is None:
        args.out = Path(
            "bench/results/ecm.json"
            if args.output_fn == "loss"
            else f"bench/results/ecm_{args.output_fn}.json"
        )
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    from carv_attrib.attrib.featurizer import build_projector, load_featurizer
    from carv_attrib.carv.draws import DrawRule
    from carv_attrib.carv.timesteps import Proposal
    from carv_attrib.pipeline.plan import PlanConfig, run_plan
    from carv_attrib.store.latents import iter_cached

    bm = prepare(BenchModel(work=args.work))
    clips = list(iter_cached(bm.run))
    if len(clips) < args.pilot_clips + args.clips:
        raise SystemExit(f"need {args.pilot_clips + args.clips} clips, the benchmark run has {len(clips)}")
    t0 = time.perf_counter()
    plan = run_plan(
        PlanConfig(
            run=bm.run,
            model=str(bm.model),
            out=args.work / ("plan.json" if args.output_fn == "loss" else f"plan_{args.output_fn}.json"),
            output_fn=args.output_fn,
            pilot_clips=args.pilot_clips,
            draws=args.draws,
            device="cpu",
        )
    )
    plan_seconds = time.perf_counter() - t0
    proposal = Proposal.from_json(plan["proposal"])
    eval_ids = [c.clip_id for c in clips[args.pilot_clips : args.pilot_clips + args.clips]]

    featurizer = load_featurizer(
        str(bm.model),
        [None],
        DrawRule(k=args.draws),
        args.output_fn,
        "cpu",
        "float32",
        new_projector=lambda t: build_projector("kron", t, ("blocks.*",), 0, None, "gaussian"),
    )
    encoder = Encoder(str(bm.model), bm.run)
    encoder(eval_ids[0])  # warm-up: first calls pay one-off allocations
    latents, c_enc = encode_seconds(encoder, eval_ids, repeats=3)
    featurizer.features([(eval_ids[0], *latents[eval_ids[0]])])
    # Fixed queries for the score variance: other clips' features at K = 64 (iid, shared noise), unit.
    query_ids = [c.clip_id for c in clips[args.pilot_clips + args.clips :][: args.queries]]
    qlat, _ = encode_seconds(encoder, query_ids, repeats=1)
    featurizer.use_rule(DrawRule(seed=999, scheme="iid", k=64))
    queries = unit(torch.cat([featurizer.features([(q, *qlat[q])])[0] for q in query_ids]).double())

    results: dict[str, Any] = {}
    feats: dict[str, torch.Tensor] = {}
    draw_times: list[float] = []
    # Disjoint seeds: the baseline's noise is independent of every method's (a fair bias test).
    rules = {"baseline": DrawRule(seed=7_000_001, scheme="iid", k=args.draws, noise="per-clip")}
    for scheme, anti in METHODS:
        rules[name_of(scheme, anti)] = DrawRule(
            seed=1, scheme=scheme, k=args.draws, noise="per-clip", antithetic=anti,
            proposal=proposal if scheme == "stratified-is" else None,
        )  # fmt: skip
    for name, rule in rules.items():
        print(f"{name}, K={args.draws}")
        feats[name], times = estimates(featurizer, latents, eval_ids, rule, args.replicates)
        draw_times += times
        results[name] = {"variance": variances(feats[name], queries), "draws": args.draws}
    c_draw = statistics.median(draw_times)
    rho = {"measured": c_enc / c_draw, **wan_ratios()}
    base = results["baseline"]
    for name, row in results.items():
        vr = {kind: base["variance"][kind] / row["variance"][kind] for kind in row["variance"]}
        row["variance_factor_vs_baseline"] = vr
        reuse = {
            where: 1.0 if name == "baseline" else reuse_factor(args.draws, r) for where, r in rho.items()
        }
        row["ecm"] = {where: {kind: vr[kind] * reuse[where] for kind in vr} for where in rho}
    gen = torch.Generator().manual_seed(1234)
    dirs = torch.randn(featurizer.dim, 8, generator=gen, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    for name in results:
        if name == "baseline":
            continue
        z, df = bias_z(feats[name], feats["baseline"], dirs)
        results[name]["bias_max_abs_t"] = float(z.abs().max())
        results[name]["bias_p_bonferroni"] = bonferroni_p(z, df)
    methods = [n for n in results if n != "baseline"]
    best = max(methods, key=lambda n: results[n]["ecm"]["measured"]["stored"])
    is_share = {
        kind: results["stratified-is"]["variance_factor_vs_baseline"][kind]
        / results["iid"]["variance_factor_vs_baseline"][kind]
        for kind in ("raw", "stored", "score")
    }
    summary = {
        "best_method_stored": best,
        "costs": {"c_enc_s": c_enc, "c_draw_s": c_draw, "rho": rho},
        "reuse_factor": {where: reuse_factor(args.draws, r) for where, r in rho.items()},
        "is_strat_over_plain_reuse_at_equal_K": is_share,
        "targets": {
            "ecm_stored_overall>=4_measured": results[best]["ecm"]["measured"]["stored"] >= 4,
            "ecm_stored_overall>=4_wan_17f": max(
                results[n]["ecm"]["wan_17x480x832"]["stored"] for n in methods
            )
            >= 4,
            "is_strat_over_reuse>=1.3_stored": is_share["stored"] >= 1.3,
            "no_bias_at_family_wise_p>0.01": all(
                r.get("bias_p_bonferroni", 1) > 0.01 for r in results.values()
            ),
        },
    }
    out = {
        "config": {
            **vars(args),
            "work": str(args.work),
            "out": str(args.out),
            "model": "small (trained)",
            "plan_pilot_clips": args.pilot_clips,
            "queries": query_ids,
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_start": load_start,
            "load_end": os.getloadavg(),
        },
        "plan": {
            "seconds": plan_seconds,
            "costs": plan["costs"],
            "recommended": plan["recommended"],
            "bins": plan["bins"],  # per-σ-bin RMS projected-gradient norm: where the IS gain comes from
            "variance_ratio_vs_iid": {k: v["variance_ratio_vs_iid"] for k, v in plan["schemes"].items()},
        },
        "methods": results,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")

    print(
        f"\nc_enc {c_enc:.4f} s, c_draw {c_draw:.4f} s; ρ: "
        + ", ".join(f"{k} {v:.3g}" for k, v in rho.items())
    )
    print(
        f"{'method':28s} {'Var_a/Var (raw/stored/score)':>30s} {'ECM stored: measured / Wan 17f':>32s} {'p bias':>7s}"
    )
    for name, r in results.items():
        v = r["variance_factor_vs_baseline"]
        e = r["ecm"]
        print(
            f"{name:28s} {v['raw']:9.2f} {v['stored']:9.2f} {v['score']:9.2f} "
            f"{e['measured']['stored']:14.2f} {e['wan_17x480x832']['stored']:14.2f} {r.get('bias_p_bonferroni', float('nan')):7.3f}"
        )
    print(f"written {args.out}")


def wan_ratios() -> dict[str, float]:
    """ρ = (VAE encode + UMT5 forward) / (transformer forward+backward of one draw) for
    Wan2.1-T2V-1.3B, from bench/results/wan_costs.json (FLOP counts of the real configs)."""
    path = Path(__file__).resolve().parent / "results" / "wan_costs.json"
    doc = json.loads(path.read_text())
    return {f"wan_{k}": v["rho"] for k, v in doc["clip_sizes"].items()}


if __name__ == "__main__":
    main()
