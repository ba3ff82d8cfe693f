"""`plan`: compute-aware variance accounting on a pilot, and the fitted proposal q(σ).

On a pilot of cached clips it measures
- c_enc, the upstream cost per clip (decode + VAE + text), from the encode stage's shard stats;
- c_draw, the cost of one (σ, ε) draw through featurize (forward + backward + projection);
- the per-σ-bin second moment m2_b = E‖φ(σ, ε)‖² of per-draw projected gradients;
and fits q ∝ p(σ)·sqrt(m2(σ)) (the variance-optimal importance density for a mean of vectors),
mixed with p (q = (1−α)q* + αp, so w = p/q ≤ 1/α). It then measures the within-encode variance
per draw σ_w² of each scheme by replicates (different seeds, per-clip noise), and reports the
effective compute multiplier against the baseline "fresh encode per draw, iid, K = 1":

    ECM(K) = σ_w,iid²·(c_enc + c_draw) / ((σ_w,s²/K)·(c_enc + K·c_draw))       (σ_b² = 0: mode latents)

The recommended K is the fewest draws at which two estimator seeds give the same ranking of
`rank_clips` cached clips against each other (top-10 overlap ≥ 0.9 and Spearman ≥ 0.95,
`ranking_draws`): what a user needs is an answer that another seed would not change, and on the
LDS worlds of bench/factors.py that is where LDS stops growing with K (README, Benchmarks).

The resulting plan.json is consumed by `featurize --plan`.

    from carv_attrib.pipeline.plan import PlanConfig, run_plan
    plan = run_plan(PlanConfig(run="runs/demo", model="models/tiny-wan", out="plan.json"))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from carv_attrib import __version__
from carv_attrib.attrib.featurizer import (
    Featurizer,
    build_projector,
    load_featurizer,
    token_weights,
)
from carv_attrib.attrib.gradients import per_draw_features
from carv_attrib.carv.accounting import Costs, VarianceComponents, ecm, ecm_limit
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.rng import clip_stream, noise, uniforms
from carv_attrib.carv.timesteps import Density, Proposal, density
from carv_attrib.config import DEFAULT_PRECONDITION, PlanConfig
from carv_attrib.data.latents import CachedClip, iter_cached
from carv_attrib.data.motion import check_objective_inputs, objective_spec
from carv_attrib.data.run import EncodeFacts, RunDir
from carv_attrib.data.store import now_iso, write_json_atomic
from carv_attrib.data.video import ClipFailure
from carv_attrib.errors import UsageError
from carv_attrib.models.clip_encoder import ClipEncoder
from carv_attrib.models.identity import check_encoder_matches
from carv_attrib.models.wan import pad_context
from carv_attrib.optional import require_matplotlib
from carv_attrib.pipeline._job import ProgressFn, noop, record

log = logging.getLogger(__name__)

PLAN_SCHEMA = "carv-attrib/plan-1"
SCHEMES = (
    ("iid", False),
    ("stratified", False),
    ("stratified-is", False),
    ("iid", True),
    ("stratified-is", True),
)
PILOT_SEED_OFFSET = 7_919  # pilot draws never coincide with featurize's (seed, stream, k) draws


def scheme_name(scheme: str, antithetic: bool) -> str:
    return scheme + ("+antithetic" if antithetic else "")


def reencode_cost(
    run: RunDir, model: str, clip_ids: list[int], lat_config: dict[str, Any], device: str
) -> float | None:
    """Median seconds per clip of a timed re-encode of the pilot clips (decode + VAE + text; each clip
    twice), measured in this process like c_draw, so the two costs are comparable. None when the
    videos are gone."""
    rows = {r["clip_id"]: r for r in pq.read_table(run.manifest_table).to_pylist()}
    # the training clips' encoder: the flow (when recorded) and VAE tiling are encode's cost too
    encoder = ClipEncoder.load(model, EncodeFacts.from_latents_config(lat_config["config"]), device=device)
    seconds = []
    try:
        for _ in range(2):  # the median of per-clip times: one slow call on a loaded machine does not count
            for i in clip_ids:
                t0 = time.monotonic()
                encoder.encode(encoder.decode(rows[i]["path"]), rows[i]["caption"])
                seconds.append(time.monotonic() - t0)
    except (ClipFailure, KeyError):
        return None
    return statistics.median(seconds)


def encode_cost(run: RunDir) -> float:
    """Seconds per clip of the encode stage (decode wait + VAE + text), from its shard stats."""
    stats = run.latents.read_stats()
    clips = sum(s["clips"] for s in stats)
    wall = sum(s.get("wall_s", 0.0) for s in stats)
    if not clips or not wall:
        raise UsageError(f"{run}: the encode stats hold no timings; re-run encode to measure c_enc")
    return wall / clips


def bin_second_moments(
    featurizer: Featurizer, clips: list[CachedClip], cfg: PlanConfig
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(edges (bins+1,), m2 (bins,), seconds per draw): E‖φ‖² of per-draw features in each σ bin.

    In bin b the σ of draw j is F_p⁻¹ at a stratified point of [F_p(e_b), F_p(e_b+1)], so every
    bin is covered whatever p is; ε comes from the counter-based rule under a pilot seed.
    """
    p = density(cfg.density)
    edges = torch.linspace(0, 1, cfg.bins + 1, dtype=torch.float64)
    fe = p.cdf(edges)  # (bins+1,)
    J = cfg.draws_per_bin
    n = cfg.bins * J
    seed = cfg.seed + PILOT_SEED_OFFSET
    sq = torch.zeros(cfg.bins, dtype=torch.float64)
    t0 = time.monotonic()
    for c in clips:
        stream = clip_stream(c.clip_id)
        u = uniforms(seed, stream, range(n)).view(cfg.bins, J)  # (bins, J)
        strata = (torch.arange(J, dtype=torch.float64) + u) / J  # (bins, J) in each bin's [0, 1)
        sigma = p.icdf(fe[:-1, None] + strata * (fe[1:] - fe[:-1])[:, None]).reshape(-1)  # (n,)
        eps = noise(seed, stream, range(n), tuple(c.latent.shape))  # (n, C, T, h, w)
        phi, _ = per_draw_features(
            featurizer.transformers[0],
            featurizer.projectors[0],
            c.latent,
            pad_context(c.text_emb),
            sigma,
            eps,
            cfg.output_fn,
            token_weights(featurizer.objective, c.clip_id, c.motion),
        )  # (n, D)
        sq += phi.double().pow(2).sum(1).view(cfg.bins, J).sum(1)
    seconds = (time.monotonic() - t0) / (len(clips) * n)
    return edges, sq / (len(clips) * J), seconds


def replicate_variance(
    featurizer: Featurizer, clips: list[CachedClip], rule: DrawRule, replicates: int, batch_clips: int = 4
) -> tuple[dict[str, float], list[float]]:
    """Within-encode variance per draw σ_w² = K·mean_clips tr Cov_r of each clip's feature, of the
    raw feature ("raw") and of the stored one ("stored": unit norm, what the default cosine index
    holds and ranks by); "signal" = mean_clips ‖ū_i − ū‖², how far apart the clips' stored features
    are (what a ranking must resolve). Also the seconds per draw of each replicate.

    Replicates r use seeds seed+r with per-clip noise, so they are independent estimates of each
    clip's feature; tr Cov is summed over feature coordinates.
    """
    feats, seconds = [], []  # (R, N, D)
    for r in range(replicates):
        featurizer.use_rule(dataclasses.replace(rule, seed=rule.seed + 1 + r))
        t0 = time.monotonic()
        f = torch.cat(
            [
                featurizer.features(
                    [(c.clip_id, c.latent, c.text_emb, c.motion) for c in clips[i : i + batch_clips]]
                )[0]
                for i in range(0, len(clips), batch_clips)
            ]
        )  # (N, D): B clips x K draws per backward, as featurize does
        seconds.append((time.monotonic() - t0) / (len(clips) * rule.k))
        feats.append(f.double())
    stack = torch.stack(feats)  # (R, N, D)
    unit = stack / stack.norm(dim=2, keepdim=True).clamp_min(1e-300)
    mean_unit = unit.mean(0)  # (N, D)
    return {
        "raw": float(stack.var(dim=0, unbiased=True).sum(dim=1).mean()) * rule.k,
        "stored": float(unit.var(dim=0, unbiased=True).sum(dim=1).mean()) * rule.k,
        "signal": float((mean_unit - mean_unit.mean(0)).pow(2).sum(1).mean()),
    }, seconds


def _pilot_clips(run: RunDir, n: int) -> list[CachedClip]:
    clips = []
    for c in iter_cached(run):
        clips.append(c)
        if len(clips) == n:
            break
    if len(clips) < 2:
        raise UsageError(f"{run} has fewer than 2 encoded clips; a pilot needs at least 2")
    return clips


def _fit_proposal(
    featurizer: Featurizer, clips: list[CachedClip], cfg: PlanConfig, p: Density
) -> tuple[Proposal, dict[str, Any]]:
    """q ∝ p̄_bin · sqrt(m2_bin) mixed with p (p-scaled form), and the per-bin measurements."""
    edges, m2, _ = bin_second_moments(featurizer, clips, cfg)
    fe = p.cdf(edges)
    p_bar = (fe[1:] - fe[:-1]) / (edges[1:] - edges[:-1])  # (bins,) mean density of p per bin
    proposal = Proposal.from_bins(edges, p_bar * m2.sqrt(), density=p.spec, mix=cfg.mix, form="p-scaled")
    bins = {
        "edges": edges.tolist(),
        "second_moment": m2.tolist(),
        "rms_grad_norm": m2.sqrt().tolist(),
        "p_mean_density": p_bar.tolist(),
    }
    return proposal, bins


def _scheme_variances(
    featurizer: Featurizer,
    clips: list[CachedClip],
    cfg: PlanConfig,
    p: Density,
    proposal: Proposal,
    progress: ProgressFn = noop,
) -> tuple[dict[str, dict[str, float]], float]:
    """Within-encode variances per draw of each scheme (`replicate_variance`), and c_draw: the median
    seconds per draw over every replicate run (stable under a loaded machine)."""
    variances: dict[str, dict[str, float]] = {}
    draw_seconds: list[float] = []
    for scheme, anti in SCHEMES:
        rule = DrawRule(
            seed=cfg.seed,
            scheme=scheme,
            k=cfg.draws,
            density=p.spec,
            noise="per-clip",
            antithetic=anti,
            proposal=proposal if scheme == "stratified-is" else None,
        )
        var, sec = replicate_variance(featurizer, clips, rule, cfg.replicates, cfg.batch_clips)
        variances[scheme_name(scheme, anti)] = var
        draw_seconds += sec
        progress("clip", {"status": "ok", "step": scheme_name(scheme, anti)})
    return variances, statistics.median(draw_seconds)


def _ecm_table(variances: dict[str, dict[str, float]], costs: Costs, k_max: int) -> dict[str, Any]:
    """Per scheme: variances per draw and the ECM at each K, both of the stored (attribution) feature."""
    base = VarianceComponents(between=0.0, within=variances["iid"]["stored"])
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= k_max]
    table = {}
    for name, v in variances.items():
        var = v["stored"]
        comps = VarianceComponents(between=0.0, within=var)
        table[name] = {
            "within_variance_per_draw": var,
            "raw_within_variance_per_draw": v["raw"],
            "variance_ratio_vs_iid": var / variances["iid"]["stored"],
            "raw_variance_ratio_vs_iid": v["raw"] / variances["iid"]["raw"],
            "ecm": {str(k): ecm(k, costs, comps, base) for k in ks},
            "ecm_limit": ecm_limit(costs, comps, base),
        }
    return table


NOISE_SHARE = 0.1  # the noise rule's K: estimator noise of the stored features ≤ this share of their spread
RANK_SEED_OFFSET = 104_729  # the ranking pilot's two seeds never coincide with featurize's or the pilot's


def ranking_draws(
    featurizer: Featurizer,
    clips: list[CachedClip],
    rule: DrawRule,
    precondition: str,
    k_max: int,
    batch_clips: int = 4,
    progress: ProgressFn = noop,
) -> dict[str, Any]:
    """The fewest K in 1, 2, 4, … ≤ k_max at which two estimator seeds rank the clips alike.

    Each clip is a query against the others (its own score left out): features under seeds s and s'
    (`rule` otherwise unchanged: scheme, proposal, shared noise as featurize uses them), the index's
    preconditioner, then `attrib.stability.ranking_agreement` (top-k overlap, k = min(10, (n−1)//3),
    and Spearman over the whole ranking). K is stable when `stability.is_stable` holds; the curve up
    to that K is returned, and `stable` False when even k_max is not."""
    from carv_attrib.attrib.precondition import fit_preconditioner
    from carv_attrib.attrib.stability import STABLE, is_stable, ranking_agreement

    n = len(clips)
    top_k = max(1, min(STABLE["top_k"], (n - 1) // 3))
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= k_max] or [k_max]
    curve = []
    for k in ks:
        scores = []
        for r in (0, 1):
            featurizer.use_rule(dataclasses.replace(rule, k=k, seed=rule.seed + RANK_SEED_OFFSET + r))
            feats = torch.cat(
                [
                    featurizer.features(
                        [(c.clip_id, c.latent, c.text_emb, c.motion) for c in clips[i : i + batch_clips]]
                    )[0]
                    for i in range(0, n, batch_clips)
                ]
            ).double()  # (n, D)
            pre = fit_preconditioner(precondition, feats.numpy(), dim=feats.shape[1])
            s = pre.prepare_train(feats.numpy()).astype("float64") @ pre.prepare_query(feats.numpy()).T
            s[range(n), range(n)] = float("nan")  # a clip is not its own training clip
            scores.append(s)
        overlap, rho = ranking_agreement(scores[0], scores[1], top_k=top_k)
        curve.append({"draws": k, "top_k_overlap": overlap, "spearman": rho})
        progress("clip", {"status": "ok", "step": f"ranking K={k}"})
        if is_stable(overlap, rho):
            return {"draws": k, "stable": True, "top_k": top_k, "clips": n, "curve": curve, **STABLE_RULE}
    return {"draws": ks[-1], "stable": False, "top_k": top_k, "clips": n, "curve": curve, **STABLE_RULE}


STABLE_RULE = {"rule": "top-k overlap >= 0.9 and Spearman >= 0.95 between two estimator seeds"}


def _recommend(
    variances: dict[str, dict[str, float]], costs: Costs, k_max: int, ranking: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The scheme with the lowest stored-feature variance per draw, and K: with `ranking`
    (`ranking_draws` of that scheme), the fewest draws at which two seeds rank alike; without, the
    smallest K at which the noise σ_w²/K is at most NOISE_SHARE of the signal (how far apart the
    clips' stored features are). When k_max is what limits K, `capped` says so."""
    best = min(variances, key=lambda n: (variances[n]["stored"], "antithetic" in n))
    v = variances[best]
    k_noise = max(1, math.ceil(v["stored"] / max(NOISE_SHARE * v["signal"], 1e-300)))
    k_rec = min(k_noise, k_max) if ranking is None else int(ranking["draws"])
    # ECM(K)/ECM_∞ = K·c_draw/(c_enc + K·c_draw): K ≥ 9·c_enc/c_draw reaches 90% of the amortisation limit
    k_amortised = max(1, math.ceil(9 * costs.c_enc / max(costs.c_draw, 1e-12)))
    base = VarianceComponents(between=0.0, within=variances["iid"]["stored"])
    why = "lowest variance per draw of the stored feature; " + (
        f"the fewest draws that bring its noise to {NOISE_SHARE:.0%} of the spread between clips' features"
        if ranking is None
        else f"the fewest draws at which two estimator seeds give the same ranking ({STABLE_RULE['rule']}, "
        f"top-{ranking['top_k']} of {ranking['clips']} clips)"
    )
    return {
        "scheme": best.split("+")[0],
        "antithetic": "antithetic" in best,
        "draws": k_rec,
        "capped": (k_noise > k_max) if ranking is None else not ranking["stable"],
        "draws_noise_share": min(k_noise, k_max),
        "noise_share_at_draws": v["stored"] / k_rec / max(v["signal"], 1e-300),
        "draws_for_90pct_amortisation": k_amortised,
        "ecm": ecm(k_rec, costs, VarianceComponents(0.0, v["stored"]), base),
        "ranking": ranking,
        "why": why,
    }


def run_plan(cfg: PlanConfig, progress: ProgressFn = noop) -> dict[str, Any]:
    """Run the pilot and write plan.json (and the PNG with cfg.plot); returns the plan document.
    `progress("start", {"todo"})`, then one "clip" event per pilot step (re-encode timing, proposal
    fit, each scheme's replicates). The document's `recommended.featurize_options` are the featurize
    options that apply the recommendation ({"timesteps", "draws", then "antithetic", "output_fn",
    "plan" or "density" where they differ from featurize's defaults}). The invocation is recorded
    in RUN/run.json."""
    started = time.monotonic()
    cfg.validate()
    run = RunDir(cfg.run)
    lat = run.require_latents()
    try:
        p = density(cfg.density)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if cfg.plot is not None:
        require_matplotlib()  # before the pilot, not after it
    check_encoder_matches(
        cfg.model, lat["config"]["model"]["components"], lat["config"]["model"].get("source")
    )
    check_objective_inputs(cfg.objective, lat["config"], run)
    clips = _pilot_clips(run, cfg.pilot_clips)
    progress("start", {"todo": 2 + len(SCHEMES) + 4})  # + the ranking pilot's K = 1, 2, 4, 8 (usually)
    c_enc = reencode_cost(run, cfg.model, [c.clip_id for c in clips], lat, cfg.device)
    progress("clip", {"status": "ok", "step": "c_enc"})
    c_enc_source = "timed re-encode of the pilot clips"
    if c_enc is None:
        c_enc, c_enc_source = encode_cost(run), "encode stage stats"
    base_rule = DrawRule(seed=cfg.seed, scheme="iid", k=cfg.draws, density=p.spec, noise="per-clip")
    featurizer = load_featurizer(
        cfg.model,
        [None],
        base_rule,
        cfg.output_fn,
        cfg.device,
        cfg.dtype,
        new_projector=lambda t: build_projector("kron", t, cfg.layers, cfg.seed, cfg.proj_dim, "gaussian"),
        objective=objective_spec(cfg.objective),
    )
    t0 = time.monotonic()
    proposal, bins = _fit_proposal(featurizer, clips, cfg, p)
    progress("clip", {"status": "ok", "step": "proposal"})
    variances, c_draw = _scheme_variances(featurizer, clips, cfg, p, proposal, progress)
    costs = Costs(c_enc=c_enc, c_draw=c_draw)
    best = min(variances, key=lambda n: (variances[n]["stored"], "antithetic" in n))
    scheme, anti = best.split("+")[0], "antithetic" in best
    rank_rule = DrawRule(
        seed=cfg.seed, scheme=scheme, k=cfg.draws, density=p.spec, noise="shared", antithetic=anti,
        proposal=proposal if scheme == "stratified-is" else None,
    )  # fmt: skip
    ranking = ranking_draws(
        featurizer, _pilot_clips(run, cfg.rank_clips), rank_rule, DEFAULT_PRECONDITION, cfg.k_max,
        cfg.batch_clips, progress,
    )  # fmt: skip
    plan = {
        "schema": PLAN_SCHEMA,
        "tool_version": __version__,
        "created_at": now_iso(),
        "run": str(run),
        "model": {"source": cfg.model, "latents_fingerprint": lat["fingerprint"]},
        "projector": featurizer.projectors[0].spec(),
        "density": p.spec,
        "output_fn": cfg.output_fn,
        "objective": cfg.objective,
        "pilot": {
            "clips": len(clips),
            "bins": cfg.bins,
            "draws_per_bin": cfg.draws_per_bin,
            "draws": cfg.draws,
            "replicates": cfg.replicates,
            "rank_clips": ranking["clips"],
            "seed": cfg.seed,
            "seconds": round(time.monotonic() - t0, 2),
        },
        "bins": bins,
        "proposal": proposal.to_dict(),
        "costs": {
            "c_enc": c_enc,
            "c_enc_source": c_enc_source,
            "c_draw": c_draw,
            "c_draw_source": "median seconds per draw of the replicate featurize runs (forward+backward+kron)",
            "c_enc_over_c_draw": c_enc / c_draw if c_draw else None,
        },
        "variance_between_encodes": 0.0,
        "schemes": _ecm_table(variances, costs, cfg.k_max),
        "recommended": _recommend(variances, costs, cfg.k_max, ranking),
    }
    plan["recommended"]["featurize_options"] = featurize_options(plan, cfg.out)
    write_json_atomic(Path(cfg.out), plan)
    if cfg.plot is not None:
        plot_plan(plan, Path(cfg.plot))
    record(
        cfg.run, "plan", device=cfg.device, started=started, out=str(cfg.out), recommended=plan["recommended"]
    )
    return plan


def featurize_options(plan: dict[str, Any], out: Path | str) -> dict[str, Any]:
    """The `featurize` options that apply a plan's recommendation, in flag order: the scheme and K,
    then only what differs from featurize's defaults (antithetic pairs, a non-loss output function,
    and p(σ): `plan` (the plan.json at `out`, which carries q and its density) for stratified-is,
    else a non-uniform `density`)."""
    r = plan["recommended"]
    opts: dict[str, Any] = {"timesteps": r["scheme"], "draws": r["draws"]}
    if r["antithetic"]:
        opts["antithetic"] = True
    if plan["output_fn"] != "loss":
        opts["output_fn"] = plan["output_fn"]
    if r["scheme"] == "stratified-is":
        opts["plan"] = str(out)
    elif plan["density"] != "uniform":
        opts["density"] = plan["density"]
    return opts


def plot_plan(plan: dict[str, Any], path: Path) -> None:
    """Left: p(σ), q(σ) and the per-bin RMS gradient norm. Right: variance×cost against K."""
    require_matplotlib()
    import matplotlib  # optional dependency ([plot] extra): imported where it is needed

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = Proposal.from_json(plan["proposal"])
    p = density(plan["density"])
    s = torch.linspace(0.0005, 0.9995, 500, dtype=torch.float64)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(s, p.pdf(s), label="p(σ) training density")
    ax1.plot(s, q.pdf(s), label="q(σ) fitted proposal")
    ax1.set_xlabel("σ")
    ax1.set_ylabel("density")
    ax1b = ax1.twinx()
    e = plan["bins"]["edges"]
    ax1b.stairs(plan["bins"]["rms_grad_norm"], e, color="grey", alpha=0.6, label="RMS ‖φ‖ per bin")
    ax1b.set_ylabel("RMS projected gradient norm")
    ax1.legend(loc="upper left", fontsize=8)
    ax1b.legend(loc="upper right", fontsize=8)
    c_enc, c_draw = plan["costs"]["c_enc"], plan["costs"]["c_draw"]
    ks = [int(k) for k in next(iter(plan["schemes"].values()))["ecm"]]
    for name, row in plan["schemes"].items():
        var = row["within_variance_per_draw"]
        ax2.plot(ks, [var / k * (c_enc + k * c_draw) for k in ks], marker="o", label=name)
    base = plan["schemes"]["iid"]["within_variance_per_draw"] * (c_enc + c_draw)
    ax2.axhline(base, color="black", ls="--", lw=1, label="baseline (fresh encode, iid, K=1)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("K draws per encode")
    ax2.set_ylabel("variance × cost per clip")
    ax2.legend(fontsize=7)
    fig.suptitle(f"carv-attrib plan — c_enc {c_enc:.3g} s, c_draw {c_draw:.3g} s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
