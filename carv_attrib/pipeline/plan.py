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

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from carv_attrib import __version__
from carv_attrib.attrib.featurizer import (
    build_projector,
    load_featurizer,
)
from carv_attrib.attrib.pilot import (  # noqa: F401  (NOISE_SHARE, PILOT_SCHEMES, scheme_name: re-exported)
    NOISE_SHARE,
    PILOT_SCHEMES,
    PilotSettings,
    ecm_table,
    fit_proposal,
    k_ladder,
    ranking_draws,
    recommend,
    scheme_name,
    scheme_variances,
)
from carv_attrib.carv.accounting import Costs
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.timesteps import Proposal, density
from carv_attrib.config import DEFAULT_PRECONDITION, PlanConfig
from carv_attrib.config.resume import recorded_options
from carv_attrib.errors import UsageError
from carv_attrib.models.clip_encoder import ClipEncoder
from carv_attrib.models.identity import check_encoder_matches
from carv_attrib.models.lora import lora_identity
from carv_attrib.optional import require_matplotlib
from carv_attrib.pipeline._job import ProgressFn, noop, record
from carv_attrib.store.latents import CachedClip, iter_cached
from carv_attrib.store.records import LatentsRecord
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import now_iso, write_json_atomic
from carv_attrib.video.decode import ClipFailure
from carv_attrib.video.motion import check_objective_inputs, objective_spec

log = logging.getLogger(__name__)

PLAN_SCHEMA = "carv-attrib/plan-1"


def reencode_cost(
    run: RunDir, model: str, clip_ids: list[int], lat: LatentsRecord, device: str
) -> float | None:
    """Median seconds per clip of a timed re-encode of the pilot clips (decode + VAE + text; each clip
    twice), measured in this process like c_draw, so the two costs are comparable. None when the
    videos are gone."""
    rows = {r["clip_id"]: r for r in pq.read_table(run.manifest_table).to_pylist()}
    # the training clips' encoder: the flow (when recorded) and VAE tiling are encode's cost too
    encoder = ClipEncoder.load(model, lat.encode, device=device)
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
    timing = run.latents.seconds_per_clip()
    if timing is None:
        raise UsageError(f"{run}: the encode stats hold no timings; re-run encode to measure c_enc")
    return timing[0]


def pilot_draw_counts(cfg: PlanConfig, pilot: int, ranked: int) -> dict[str, int]:
    """Per-clip (σ, ε) draws the pilot differentiates, by step: the proposal's bins (pilot × bins ×
    draws_per_bin), the scheme variances (schemes × replicates × pilot × K) and the ranking (ranked
    clips × 2 seeds × Σ K over 1, 2, 4, … up to the first stable K: at least K = 1, at most --k-max)."""
    ks = k_ladder(cfg.k_max)
    d = {
        "proposal": pilot * cfg.bins * cfg.draws_per_bin,
        "variances": len(PILOT_SCHEMES) * cfg.replicates * pilot * cfg.draws,
        "ranking_min": ranked * 2 * ks[0],
        "ranking_max": ranked * 2 * sum(ks),
    }
    fixed = d["proposal"] + d["variances"]
    return d | {"total_min": fixed + d["ranking_min"], "total_max": fixed + d["ranking_max"]}


def pilot_estimate(
    featurizer: Any, clips: list[CachedClip], ranked: int, cfg: PlanConfig, c_enc: float | None
) -> dict[str, Any]:
    """The pilot's size and time, from one timed featurize batch of up to --batch-clips pilot clips at
    K = --draws (seconds per clip-draw), times `pilot_draw_counts`, plus the timed re-encode of the
    pilot clips (twice each, at the encode stage's recorded seconds per clip when known). A range:
    the ranking stops at the first K at which two seeds agree, which is not known in advance."""
    batch = clips[: max(1, min(cfg.batch_clips, len(clips)))]
    t0 = time.monotonic()
    featurizer.features([(c.clip_id, c.latent, c.text_emb, c.motion) for c in batch])
    per_draw = (time.monotonic() - t0) / (len(batch) * cfg.draws)
    counts = pilot_draw_counts(cfg, len(clips), ranked)
    reencode = 2 * len(clips) * c_enc if c_enc is not None else 0.0
    return {
        "pilot_clips": len(clips),
        "rank_clips": ranked,
        "draws": counts,
        "seconds_per_draw": per_draw,
        "timed_clips": len(batch),
        "reencode_s": reencode,
        "seconds_min": reencode + per_draw * counts["total_min"],
        "seconds_max": reencode + per_draw * counts["total_max"],
    }


def _pilot_clips(run: RunDir, n: int) -> list[CachedClip]:
    clips = []
    for c in iter_cached(run):
        clips.append(c)
        if len(clips) == n:
            break
    if len(clips) < 2:
        raise UsageError(f"{run} has fewer than 2 encoded clips; a pilot needs at least 2")
    return clips


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
    lat = run.require_latents_record()
    try:
        p = density(cfg.density)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if cfg.plot is not None:
        require_matplotlib()  # before the pilot, not after it
    check_encoder_matches(cfg.model, lat.model)
    check_objective_inputs(cfg.objective, lat.config, run)
    clips = _pilot_clips(run, cfg.pilot_clips)
    rank_clips = _pilot_clips(run, cfg.rank_clips)
    base_rule = DrawRule(seed=cfg.seed, scheme="iid", k=cfg.draws, density=p.spec, noise="per-clip")
    featurizer = load_featurizer(
        cfg.model,
        [None],
        base_rule,
        cfg.output_fn,
        cfg.device,
        cfg.dtype,
        new_projector=lambda t: build_projector(
            "kron", t, cfg.layers, cfg.seed, cfg.proj_dim, "gaussian", lora=cfg.lora is not None
        ),
        objective=objective_spec(cfg.objective),
        lora=None if cfg.lora is None else str(cfg.lora),
    )
    timing = run.latents.seconds_per_clip()  # (s/clip, clips) of the encode stage, None if untimed
    estimate = pilot_estimate(featurizer, clips, len(rank_clips), cfg, timing[0] if timing else None)
    progress("cost", estimate)  # before the pilot: the user can stop it and trim its size
    if cfg.dry_run:
        return {"schema": PLAN_SCHEMA, "dry_run": True, "run": str(run), "estimate": estimate}
    progress("start", {"todo": 2 + len(PILOT_SCHEMES) + 4})  # + the ranking pilot's K = 1, 2, 4, 8 (usually)
    c_enc = reencode_cost(run, cfg.model, [c.clip_id for c in clips], lat, cfg.device)
    progress("clip", {"status": "ok", "step": "c_enc"})
    c_enc_source = "timed re-encode of the pilot clips"
    if c_enc is None:
        c_enc, c_enc_source = encode_cost(run), "encode stage stats"
    t0 = time.monotonic()
    settings = PilotSettings.from_config(cfg)
    proposal, bins = fit_proposal(featurizer, clips, settings, p)
    progress("clip", {"status": "ok", "step": "proposal"})

    def step(name: str) -> None:  # each pilot step is one "clip" event of the progress bar
        progress("clip", {"status": "ok", "step": name})

    variances, c_draw = scheme_variances(featurizer, clips, settings, p, proposal, step)
    costs = Costs(c_enc=c_enc, c_draw=c_draw)
    best = min(variances, key=lambda n: (variances[n]["stored"], "antithetic" in n))
    scheme, anti = best.split("+")[0], "antithetic" in best
    rank_rule = DrawRule(
        seed=cfg.seed, scheme=scheme, k=cfg.draws, density=p.spec, noise="shared", antithetic=anti,
        proposal=proposal if scheme == "stratified-is" else None,
    )  # fmt: skip
    ranking = ranking_draws(
        featurizer, rank_clips, rank_rule, DEFAULT_PRECONDITION, cfg.k_max,
        cfg.batch_clips, step,
    )  # fmt: skip
    plan = {
        "schema": PLAN_SCHEMA,
        "tool_version": __version__,
        "created_at": now_iso(),
        "run": str(run),
        "model": {"source": cfg.model, "latents_fingerprint": lat.fingerprint},
        "projector": featurizer.projectors[0].spec(),
        "density": p.spec,
        "output_fn": cfg.output_fn,
        "objective": cfg.objective,
        "lora": None if cfg.lora is None else lora_identity(cfg.lora),
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
        "schemes": ecm_table(variances, costs, cfg.k_max),
        "recommended": recommend(variances, costs, cfg.k_max, ranking),
    }
    plan["recommended"]["featurize_options"] = featurize_options(plan, cfg.out)
    write_json_atomic(Path(cfg.out), plan)
    if cfg.plot is not None:
        plot_plan(plan, Path(cfg.plot))
    record(
        cfg.run,
        "plan",
        device=cfg.device,
        started=started,
        out=str(cfg.out),
        recommended=plan["recommended"],
        options=recorded_options(cfg),
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
