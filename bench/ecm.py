"""Effective compute multiplier (ECM) of CARV's estimators, measured: variance AND wall-clock cost.

For each method, every evaluation clip gets R independent estimates (replicate seeds, per-clip
noise) of its projected gradient feature φ̂ ≈ P·E_{σ~p,ε}[∇θ ℓ]; the variance is the mean over clips
of tr Cov_r(φ̂), the cost the measured seconds per estimate, and

    ECM(method) = (Var_a · Cost_a) / (Var_method · Cost_method)

against (a) the baseline: a fresh decode + VAE encode + text encode for every draw, iid σ ~ p,
K = 1, repeated K times (journey-TRAK style; Var·Cost does not depend on how many are averaged).
The methods encode once per estimate (decode + VAE + text, timed) and reuse it for K draws:
(b) iid, (c) stratified, (d) stratified-is with the proposal fitted by `carv-attrib plan`,
(e) antithetic variants. The model is the trained `small` benchmark model (bench/bench_model.py);
the plan's pilot clips are disjoint from the evaluation clips.

Bias check: all methods estimate the same expectation, so on 8 fixed random directions of each
clip's feature the replicate means must agree with the baseline's within 4 standard errors.

    .venv/bin/python bench/ecm.py            # ~10 min on 2 cores, writes bench/results/ecm.json
    .venv/bin/python bench/ecm.py --output-fn sqnorm   # the same for D-TRAK's output -> ecm_sqnorm.json

Results depend on the machine and on c_enc/c_draw: the real Wan2.1 VAE and transformer have a
different cost ratio than this CPU-sized model (see the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
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

        from carv_attrib.data.store import ShardStore
        from carv_attrib.data.video import FramePolicy
        from carv_attrib.models.wan import load_wan

        cfg = ShardStore(run, "latents").read_config()["config"]
        self.policy = FramePolicy(
            frames=cfg["frames"], height=cfg["height"], width=cfg["width"], fps=cfg["fps"]
        )
        self.rows = {r["clip_id"]: r for r in pq.read_table(run / "manifest" / "clips.parquet").to_pylist()}
        self.wan = load_wan(model, ("vae", "text_encoder", "tokenizer"), device="cpu")

    def __call__(self, clip_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        from carv_attrib.data.video import decode_clip, frames_to_tensor
        from carv_attrib.models.wan import encode_prompts, encode_video

        row = self.rows[clip_id]
        frames = decode_clip(row["path"], self.policy).frames
        z = encode_video(self.wan.vae, frames_to_tensor(frames)[None])[0]  # (C, T, h, w)
        (emb,) = encode_prompts(self.wan, [row["caption"]])  # (L, D)
        return z, emb


def estimates(
    featurizer: Any, encoder: Encoder, clip_ids: list[int], rule: Any, replicates: int, fresh_per_draw: bool
) -> tuple[torch.Tensor, float]:
    """(φ̂ (R, N, D) float64, seconds per estimate). Every estimate pays its own encode(s)."""
    feats = torch.zeros(replicates, len(clip_ids), featurizer.dim, dtype=torch.float64)
    t0 = time.perf_counter()
    for r in range(replicates):
        for n, cid in enumerate(clip_ids):
            if fresh_per_draw:
                # Baseline: K independent iid draws, each with its own fresh decode + encode.
                for k in range(rule.k):
                    z, emb = encoder(cid)
                    featurizer.use_rule(dataclasses.replace(rule, seed=rule.seed + 100_003 * r + k, k=1))
                    f, _, _ = featurizer.features([(cid, z, emb)])
                    feats[r, n] += f[0].double() / rule.k
            else:
                z, emb = encoder(cid)  # encode once, reuse for K draws
                featurizer.use_rule(dataclasses.replace(rule, seed=rule.seed + 100_003 * r))
                f, _, _ = featurizer.features([(cid, z, emb)])
                feats[r, n] = f[0].double()
    return feats, (time.perf_counter() - t0) / (replicates * len(clip_ids))


def total_variance(feats: torch.Tensor) -> float:
    """Mean over clips of tr Cov over replicates: feats (R, N, D)."""
    return float(feats.var(dim=0, unbiased=True).sum(dim=1).mean())


def bias_z(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Welch z of replicate means on fixed directions: a, b (R, N, D), directions (D, M) → (N, M)."""
    pa, pb = a @ directions, b @ directions  # (R, N, M)
    se2 = pa.var(0, unbiased=True) / pa.shape[0] + pb.var(0, unbiased=True) / pb.shape[0]
    return (pa.mean(0) - pb.mean(0)) / se2.clamp_min(1e-300).sqrt()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench/_work/model"))
    ap.add_argument("--draws", type=int, default=8, help="K draws per encode")
    ap.add_argument("--clips", type=int, default=8, help="evaluation clips (disjoint from the plan's pilot)")
    ap.add_argument("--replicates", type=int, default=12)
    ap.add_argument("--pilot-clips", type=int, default=8)
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
    from carv_attrib.data.latents import iter_cached
    from carv_attrib.pipeline.plan import PlanConfig, run_plan

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
    featurizer.features([(eval_ids[0], *encoder(eval_ids[0]))])

    results: dict[str, Any] = {}
    feats: dict[str, torch.Tensor] = {}
    base_rule = DrawRule(seed=1, scheme="iid", k=args.draws, noise="per-clip")
    print(f"(a) baseline: fresh decode+encode per draw, iid, K=1 x {args.draws}")
    feats["baseline"], cost = estimates(
        featurizer, encoder, eval_ids, base_rule, args.replicates, fresh_per_draw=True
    )
    results["baseline"] = {
        "variance": total_variance(feats["baseline"]),
        "seconds_per_estimate": cost,
        "draws": args.draws,
    }
    for scheme, anti in METHODS:
        name = name_of(scheme, anti)
        rule = DrawRule(
            seed=1,
            scheme=scheme,
            k=args.draws,
            noise="per-clip",
            antithetic=anti,
            proposal=proposal if scheme == "stratified-is" else None,
        )
        print(f"cached encode, {name}, K={args.draws}")
        feats[name], cost = estimates(
            featurizer, encoder, eval_ids, rule, args.replicates, fresh_per_draw=False
        )
        results[name] = {
            "variance": total_variance(feats[name]),
            "seconds_per_estimate": cost,
            "draws": args.draws,
        }

    base = results["baseline"]
    for row in results.values():
        row["var_x_cost"] = row["variance"] * row["seconds_per_estimate"]
        row["ecm"] = base["var_x_cost"] / row["var_x_cost"]
        row["variance_ratio_vs_baseline"] = row["variance"] / base["variance"]
        row["cost_ratio_vs_baseline"] = row["seconds_per_estimate"] / base["seconds_per_estimate"]
    gen = torch.Generator().manual_seed(1234)
    dirs = torch.randn(featurizer.dim, 8, generator=gen, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    for name in results:
        if name == "baseline":
            continue
        z = bias_z(feats[name], feats["baseline"], dirs)
        results[name]["bias_max_abs_z"] = float(z.abs().max())
        results[name]["bias_share_abs_z_over_3"] = float((z.abs() > 3).double().mean())
    best = max((n for n in results if n != "baseline"), key=lambda n: results[n]["ecm"])
    is_strat_share = results["stratified-is"]["ecm"] / results["iid"]["ecm"]
    summary = {
        "best_method": best,
        "ecm_best": results[best]["ecm"],
        "ecm_stratified_is": results["stratified-is"]["ecm"],
        "ecm_plain_reuse_iid": results["iid"]["ecm"],
        "is_strat_share_over_reuse_at_equal_K": is_strat_share,
        "targets": {
            "ecm_overall>=4": results[best]["ecm"] >= 4,
            "is_strat_over_reuse>=1.3": is_strat_share >= 1.3,
            "bias_all_|z|<4": all(r.get("bias_max_abs_z", 0) < 4 for r in results.values()),
        },
    }
    out = {
        "config": {
            **vars(args),
            "work": str(args.work),
            "out": str(args.out),
            "model": "small (trained)",
            "plan_pilot_clips": args.pilot_clips,
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

    print(f"\n{'method':28s} {'var/base':>9s} {'cost/base':>9s} {'ECM':>7s} {'max|z|':>7s}")
    for name, r in results.items():
        print(
            f"{name:28s} {r['variance_ratio_vs_baseline']:9.3f} {r['cost_ratio_vs_baseline']:9.3f} {r['ecm']:7.2f} {r.get('bias_max_abs_z', float('nan')):7.2f}"
        )
    print(
        f"\nbest: {best}, ECM {results[best]['ecm']:.2f} (target >= 4: {'met' if summary['targets']['ecm_overall>=4'] else 'MISSED'})"
    )
    print(
        f"IS+stratification over plain reuse at K={args.draws}: {is_strat_share:.2f}x (target >= 1.3: {'met' if summary['targets']['is_strat_over_reuse>=1.3'] else 'MISSED'})"
    )
    print(f"bias: all max |z| < 4: {summary['targets']['bias_all_|z|<4']}; written {args.out}")


if __name__ == "__main__":
    main()
