"""`cost`: size a whole job (N clips at K draws and feature dim D) from what a run measured.

A pilot run on the user's own clips, machine and settings is the only honest source of per-clip
costs, so every figure here is a measured per-clip quantity times N, and says where it came from:

- encode device-seconds per clip c_enc: the encode stage's shard stats (wall seconds of decode wait
  + VAE + text per clip), or a plan.json pilot's timed re-encode, or a timings JSON measured on the
  target device (`--timings`, e.g. from bench/gpu_check.sh);
- featurize seconds per draw c_draw: the featurize stage's wall seconds per clip divided by the
  run's K (it includes the per-clip forward overhead, so at another K the figure is a linear
  scaling), or the plan's median per-draw time, or the timings JSON;
- storage: the run's latent and feature shard bytes per clip (Parquet as written), features scaled
  by D / D_run (they are D float32 numbers plus K per-draw diagnostics);
- index memory: `search.index.index_bytes(N, D, factory)` for the chosen FAISS factory and two
  common alternatives (Flat, IVF4096,SQ8, IVF4096,PQ64x4fs).

    doc = run_cost(CostConfig(run="runs/pilot", clips=1_000_000))
    doc["compute"]["total_device_hours"], doc["storage"]["index_bytes"]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carv_attrib.config import CostConfig
from carv_attrib.errors import UsageError
from carv_attrib.store.run import RunDir

COMPARE_FACTORIES = ("Flat", "IVF4096,SQ8", "IVF4096,PQ64x4fs")


def _bytes_per_clip(run: RunDir, stage: str) -> float | None:
    store = run.latents if stage == "latents" else run.features
    files = sorted(store.dir.glob("part-*.parquet"))
    clips = sum(int(s.get("clips", 0)) for s in store.read_stats())
    return sum(f.stat().st_size for f in files) / clips if files and clips else None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(f"{what} {path}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"{what} {path}: not a JSON document ({exc})") from exc
    if not isinstance(doc, dict):
        raise UsageError(f"{what} {path}: expected a JSON object")
    return doc


def _gpu_check_timings(doc: dict[str, Any]) -> dict[str, Any]:
    """encode_s_per_clip and featurize_s_per_draw from bench/gpu_check.py's JSON: its bfloat16 cases
    when they ran, else float32 (featurize seconds per clip at its K, divided by K)."""
    cases, k = doc.get("cases", {}), doc.get("config", {}).get("draws_k")
    for dtype in ("bfloat16", "float32"):
        enc, feat = cases.get(f"encode:{dtype}", {}), cases.get(f"featurize:{dtype}", {})
        out = {
            "encode_s_per_clip": enc.get("seconds_per_clip"),
            "featurize_s_per_draw": feat["featurize_s_per_clip"] / k
            if feat.get("featurize_s_per_clip") and k
            else None,
        }
        if any(v is not None for v in out.values()):
            return out
    return {}


def _timings(cfg: CostConfig, run: RunDir, run_k: int | None) -> dict[str, Any]:
    """c_enc and c_draw with their sources, in the order --timings > --plan > the run's stage stats."""
    out: dict[str, Any] = {"c_enc_s": None, "c_draw_s": None, "c_enc_source": None, "c_draw_source": None}
    if cfg.timings is not None:
        doc = _read_json(cfg.timings, "--timings")
        summary = _gpu_check_timings(doc) if doc.get("benchmark") == "gpu_check" else doc.get("summary", doc)
        for key, src in (("encode_s_per_clip", "c_enc"), ("featurize_s_per_draw", "c_draw")):
            value = summary.get(key)
            if value is not None:
                if not isinstance(value, (int, float)) or value <= 0:
                    raise UsageError(f"--timings {cfg.timings}: {key} must be a positive number of seconds")
                out[f"{src}_s"], out[f"{src}_source"] = float(value), f"--timings {cfg.timings} ({key})"
        if out["c_enc_s"] is None and out["c_draw_s"] is None:
            raise UsageError(
                f"--timings {cfg.timings}: it has neither encode_s_per_clip nor featurize_s_per_draw "
                "(at the top level or under summary)"
            )
    if cfg.plan is not None:
        costs = _read_json(cfg.plan, "--plan").get("costs")
        if not isinstance(costs, dict) or "c_enc" not in costs or "c_draw" not in costs:
            raise UsageError(
                f"--plan {cfg.plan}: not a plan.json of `carv-attrib plan` (no costs.c_enc/c_draw)"
            )
        if out["c_enc_s"] is None:
            out["c_enc_s"], out["c_enc_source"] = (
                float(costs["c_enc"]),
                f"plan {cfg.plan}: {costs.get('c_enc_source')}",
            )
        if out["c_draw_s"] is None:
            out["c_draw_s"], out["c_draw_source"] = float(costs["c_draw"]), f"plan {cfg.plan}: median s/draw"
    if out["c_enc_s"] is None and (enc := run.latents.seconds_per_clip()) is not None:
        out["c_enc_s"], out["c_enc_source"] = enc[0], f"encode shard stats of {run} ({enc[1]} clips)"
    if out["c_draw_s"] is None and run_k and (feat := run.features.seconds_per_clip()) is not None:
        out["c_draw_s"] = feat[0] / run_k
        out["c_draw_source"] = f"featurize shard stats of {run} ({feat[1]} clips at K={run_k}) / K"
    return out


def _devices(run: RunDir) -> dict[str, str | None]:
    """The device each stage last ran on (run.json): the timings hold for that device only."""
    from carv_attrib.store.records import RunLog

    log = RunLog.read(run.run_log) if run.run_log.exists() else RunLog()
    last = {inv.get("command"): inv.get("device") for inv in log.invocations}
    return {"encode": last.get("encode"), "featurize": last.get("featurize")}


def run_cost(cfg: CostConfig) -> dict[str, Any]:
    """The sizing document: {clips, draws, dim, factory, timings, compute, storage, index_options,
    missing}. Seconds are device-seconds on the device the timings were measured on; `missing`
    names what could not be sized and the command that would measure it. UsageError (exit 2) for a
    run without a latent cache or unreadable --plan / --timings files."""
    cfg.validate()
    run = RunDir(cfg.run)
    run.require_latents_record()
    feats = run.features_record()
    run_k = (int(feats.draws.get("draws", 0)) or None) if feats is not None else None
    run_dim = (
        (int(feats.projector.get("dim", 0)) * max(1, len(feats.transformers)) or None) if feats else None
    )
    info = run.index_info(check_fresh=False) if run.index_info_path.exists() else None
    k = cfg.draws or run_k
    dim = cfg.dim or (info.dim if info is not None else run_dim)
    factory = cfg.index_factory or (info.factory if info is not None else "Flat")
    # an index built with --index-dim holds D' dims, whatever D the features have
    index_dim = info.sketch["out_dim"] if info is not None and info.sketch and dim else dim
    t = _timings(cfg, run, run_k)
    n = cfg.clips
    missing = []
    enc_s = n * t["c_enc_s"] if t["c_enc_s"] is not None else None
    feat_s = n * k * t["c_draw_s"] if t["c_draw_s"] is not None and k else None
    if enc_s is None:
        missing.append(f"encode timings: rerun `carv-attrib encode` on {run} (its shards record them)")
    if feat_s is None:
        missing.append(f"featurize timings: run `carv-attrib featurize {run} -m MODEL` (or pass --plan)")
    total = None if enc_s is None or feat_s is None else enc_s + feat_s
    lat_b = _bytes_per_clip(run, "latents")
    feat_b = _bytes_per_clip(run, "features") if feats is not None else None
    if feat_b is not None and run_dim and dim:
        feat_b *= dim / run_dim
    index_options = {}
    if dim:
        from carv_attrib.search.index import index_bytes

        for f in dict.fromkeys((factory, *COMPARE_FACTORIES)):
            index_options[f] = index_bytes(n, index_dim, f)
    else:
        missing.append("the feature dimension: featurize the run, or pass --dim")
    return {
        "schema": "carv-attrib/cost-1",
        "run": str(run),
        "measured_on": _devices(run),
        "clips": n,
        "draws": k,
        "dim": dim,
        "index_dim": index_dim,
        "factory": factory,
        "devices": cfg.devices,
        "timings": t,
        "compute": {
            "encode_device_hours": None if enc_s is None else enc_s / 3600,
            "featurize_device_hours": None if feat_s is None else feat_s / 3600,
            "total_device_hours": None if total is None else total / 3600,
            "wall_hours": None if total is None else total / 3600 / cfg.devices,
        },
        "storage": {
            "latents_bytes": None if lat_b is None else lat_b * n,
            "features_bytes": None if feat_b is None else feat_b * n,
            "index_bytes": index_options.get(factory),
        },
        "index_options": index_options,
        "missing": missing,
    }
