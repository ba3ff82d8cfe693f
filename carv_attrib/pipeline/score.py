"""Stage 3, `score`: which training clips shaped these generated videos?

Each query is decoded and encoded with the settings recorded in RUN (frames, size, fps, VAE, text
encoder), featurized with exactly the index's transformer(s), draw rule (common random numbers:
the query sees the same (σ, ε) draws as the training clips under shared noise), output function
and projector, preconditioned as the index requires and searched in FAISS.

    from carv_attrib.pipeline.score import ScoreConfig, run_score
    doc = run_score(ScoreConfig(run="runs/demo", queries=["gen.mp4"], prompt="a red square ..."))
    doc["queries"][0]["results"][0]   # {"rank": 1, "clip_id": ..., "vid": ..., "score": ...}

The returned document follows `carv_attrib/schemas/attribution.schema.json`.
"""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carv_attrib import __version__
from carv_attrib.data.store import now_iso
from carv_attrib.errors import ConfigMismatchError, ModelLoadError, UsageError

SCHEMA_VERSION = "1.0"
AGGREGATES = ("none", "mean", "vote")


@dataclass
class ScoreConfig:
    run: Path | str
    queries: list[Path | str]
    prompt: str | None = None
    prompts_file: Path | str | None = None
    top_k: int | None = 10  # None: every training clip
    aggregate: str = "none"
    model: str | None = None  # None: the model recorded in RUN (checked either way)
    device: str = "auto"
    dtype: str | None = None  # None: the dtype featurize used
    workers: int = 0
    decode_timeout: float = 120.0
    batch_clips: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


def read_prompts(queries: list[Path | str], prompt: str | None, prompts_file: Path | str | None) -> list[str]:
    """One prompt per query: --prompt for a single query, or a JSON/CSV mapping path → prompt."""
    if prompt is not None and prompts_file is not None:
        raise UsageError("give either --prompt or --prompts, not both")
    if prompt is not None:
        if len(queries) != 1:
            raise UsageError(
                f"--prompt names one query's prompt but {len(queries)} queries were given; use --prompts FILE"
            )
        return [prompt]
    if prompts_file is None:
        raise UsageError("each query needs its prompt: pass --prompt TEXT (one query) or --prompts FILE")
    path = Path(prompts_file)
    if not path.exists():
        raise UsageError(f"--prompts {path}: no such file")
    mapping: dict[str, str] = {}
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    key = row.get("path") or row.get("query")
                    if key is None or "prompt" not in row:
                        raise UsageError(
                            f"--prompts {path}: CSV needs columns 'path' (or 'query') and 'prompt'"
                        )
                    mapping[key] = row["prompt"]
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, list):
                data = {d["path"]: d["prompt"] for d in data}
            mapping = {str(k): str(v) for k, v in data.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(
            f"--prompts {path}: expected a JSON object {{path: prompt}} or a CSV with path,prompt ({exc})"
        ) from exc
    out, missing = [], []
    for q in queries:
        qp = Path(q)
        for key in (str(q), str(qp.resolve()), qp.name, qp.stem):
            if key in mapping:
                out.append(mapping[key])
                break
        else:
            missing.append(str(q))
    if missing:
        raise UsageError(f"--prompts {path} has no prompt for: {', '.join(missing)}")
    return out


def check_model(model: str, info: dict[str, Any]) -> None:
    """Refuse a model whose VAE/text encoder/transformer differ from those that built the index."""
    from carv_attrib.models.wan import checkpoint_identity, model_identity

    enc = info["encode"]["model"]["components"]
    now = model_identity(model, tuple(enc))["components"]
    if not any(c.get("files") for c in now.values()):
        raise ModelLoadError(
            f"--model {model}: no such model directory (from {Path.cwd()}), and not a Hub id in the local "
            f"cache; this index was built with {info.get('model_source')}"
        )
    diffs = [c for c in enc if now[c] != enc[c]]
    paths = info.get("checkpoint_paths") or [None]
    if paths == [None]:
        if checkpoint_identity(model, None)["fingerprint"] != info["features"]["transformers"][0]:
            diffs.append("transformer")
    if diffs:
        raise ConfigMismatchError(
            f"--model {model} is not the model this index was built with "
            f"({info.get('model_source')}): {', '.join(diffs)} differ; score with the same model or rebuild the run"
        )
    for path, fp in zip(paths, info["features"]["transformers"]):
        if path is not None and not Path(path).exists():
            raise ModelLoadError(
                f"checkpoint {path}, recorded when the index was built, no longer exists; restore it "
                "there, or featurize again with its new location"
            )
        if path is not None and checkpoint_identity(model, path)["fingerprint"] != fp:
            raise ConfigMismatchError(f"checkpoint {path} changed since the index was built (weights differ)")


def _encode_queries(
    cfg: ScoreConfig, info: dict[str, Any], wan: Any, prompts: list[str]
) -> list[dict[str, Any]]:
    """Decode and encode each query like a training clip; failures become status "error"."""
    import torch

    from carv_attrib.data.decode_pool import DecodePool
    from carv_attrib.data.latents import as_stored
    from carv_attrib.data.video import ClipFailure, FramePolicy, frames_to_tensor
    from carv_attrib.models.wan import encode_prompts, encode_video

    enc = info["encode"]
    store_dtype = enc.get("latent_dtype", "float32")
    policy = FramePolicy(
        frames=enc["frames"],
        height=enc["height"],
        width=enc["width"],
        fps=enc["fps"],
        pad_short=enc["pad_short"],
    )
    items: list[dict[str, Any]] = []
    with DecodePool(policy, workers=cfg.workers, timeout=cfg.decode_timeout) as pool:
        for i, result in pool.imap([(i, str(Path(q).resolve())) for i, q in enumerate(cfg.queries)]):
            item: dict[str, Any] = {"path": str(cfg.queries[i]), "prompt": prompts[i], "status": "ok"}
            if isinstance(result, ClipFailure):
                item.update(status="error", error=f"{result.kind}: {result.message}")
            else:
                try:
                    z = encode_video(wan.vae, frames_to_tensor(result.frames)[None])[0]  # (C, T, h, w)
                    item["latent"] = as_stored(z, store_dtype)
                    if not torch.isfinite(item["latent"]).all():
                        raise ValueError("VAE produced non-finite latents")
                except Exception as exc:
                    item.update(status="error", error=f"encode_error: {exc}")
            items.append(item)
    ok = [it for it in items if it["status"] == "ok"]
    for it, emb in zip(ok, encode_prompts(wan, [it["prompt"] for it in ok])):
        it["text_emb"] = as_stored(emb, store_dtype)  # (L, D) trimmed
    return items


def _clip_table(run: Path) -> dict[int, dict[str, str]]:
    import pyarrow.parquet as pq

    t = pq.read_table(run / "manifest" / "clips.parquet").to_pylist()
    return {r["clip_id"]: {"vid": r["vid"], "caption": r["caption"], "path": r["path"]} for r in t}


def _results(scores: Any, ids: Any, clips: dict[int, dict[str, str]]) -> list[dict[str, Any]]:
    out = []
    for rank, (s, i) in enumerate(zip(scores.tolist(), ids.tolist()), start=1):
        if i < 0:  # an approximate index can return fewer hits than asked
            continue
        meta = clips.get(i, {"vid": None, "caption": None, "path": None})
        out.append({"rank": rank, "clip_id": int(i), **meta, "score": float(s)})
    return out


def provenance(info: dict[str, Any]) -> dict[str, Any]:
    feats = info["features"]
    order = ("rule", "seed", "scheme", "draws", "density", "proposal", "noise", "antithetic")  # DrawRule's
    draws = {k: feats["draws"][k] for k in order if k in feats["draws"]}
    draws |= {k: v for k, v in feats["draws"].items() if k not in draws and k != "proposal_data"}
    return {
        "fingerprint": info["fingerprint"],
        "latents_fingerprint": info.get("latents_fingerprint"),
        "model": {
            "source": info.get("model_source"),
            "encode": info["encode"]["model"].get("fingerprint"),
            "transformers": feats["transformers"],
        },
        "encode": {k: info["encode"][k] for k in ("frames", "height", "width", "fps", "pad_short", "dtype")},
        "estimator": {**draws, "output_fn": feats["output_fn"], "timestep": feats["timestep"]},
        "projector": {k: feats["projector"].get(k) for k in ("kind", "seed", "matrix", "dim", "patterns")},
        "preconditioner": info["preconditioner"],
        "count": info["count"],
        "dim": info["dim"],
    }


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    import numpy as np
    import torch

    from carv_attrib.attrib.index import load_index, search
    from carv_attrib.attrib.precondition import load_preconditioner
    from carv_attrib.carv.draws import DrawRule
    from carv_attrib.data.manifest import clip_id_for
    from carv_attrib.models.wan import load_wan
    from carv_attrib.pipeline.featurize import load_featurizer
    from carv_attrib.pipeline.index import read_index_info

    t0 = time.monotonic()
    run = Path(cfg.run)
    info = read_index_info(run)
    if not cfg.queries:
        raise UsageError("give at least one query video")
    if cfg.aggregate not in AGGREGATES:
        raise UsageError(f"--aggregate {cfg.aggregate}: choose one of {', '.join(AGGREGATES)}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UsageError("--top-k must be >= 1 or 'all'")
    prompts = read_prompts(cfg.queries, cfg.prompt, cfg.prompts_file)
    model = cfg.model or info.get("model_source")
    if model is None:
        raise UsageError(f"{run} does not record its model; pass --model")
    check_model(model, info)
    feats_cfg = info["features"]
    dtype = cfg.dtype or feats_cfg["dtype"]
    wan = load_wan(
        model, ("vae", "text_encoder", "tokenizer"), device=cfg.device, dtype=info["encode"]["dtype"]
    )
    items = _encode_queries(cfg, info, wan, prompts)
    del wan

    ok = [it for it in items if it["status"] == "ok"]
    if ok:
        rule = DrawRule.from_dict(feats_cfg["draws"])
        projector_specs = [feats_cfg["projector"]] * len(info.get("checkpoint_paths") or [None])
        featurizer = load_featurizer(
            model,
            info.get("checkpoint_paths") or [None],
            projector_specs,
            rule,
            feats_cfg["output_fn"],
            cfg.device,
            dtype,
        )
        phis = []
        for start in range(0, len(ok), cfg.batch_clips):
            chunk = ok[start : start + cfg.batch_clips]
            # A query's stream: the shared one (common random numbers), or under per-clip noise a
            # stream of its own derived from its file name.
            f, _, _ = featurizer.features(
                [
                    (clip_id_for("query:" + Path(it["path"]).name), it["latent"], it["text_emb"])
                    for it in chunk
                ]
            )
            phis.append(f)
        phi = torch.cat(phis).numpy().astype(np.float32)  # (m, D)
        finite = np.isfinite(phi).all(axis=1)
        for it, good in zip(ok, finite):
            if not good:
                it.update(status="error", error="nonfinite: the query's gradient feature has NaN/Inf")
        pre = load_preconditioner(run / "index" / "preconditioner")
        index = load_index(run / "index" / "index.faiss")
        clips = _clip_table(run)
        want_all = cfg.top_k is None or cfg.aggregate == "mean"
        q = pre.prepare_query(phi[finite])
        scores, ids = search(index, q, None if want_all else cfg.top_k)
        for it, s, i in zip([it for it, g in zip(ok, finite) if g], scores, ids):
            it["_scores"], it["_ids"] = s, i
            k = len(s) if cfg.top_k is None else cfg.top_k
            it["results"] = _results(s[:k], i[:k], clips)
    else:
        clips = _clip_table(run)

    queries = []
    for it in items:
        entry = {"path": it["path"], "prompt": it["prompt"], "status": it["status"]}
        if it["status"] == "ok":
            entry["results"] = it["results"]
        else:
            entry["error"] = it.get("error")
            entry["results"] = []
        queries.append(entry)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "carv-attrib", "version": __version__},
        "created_at": now_iso(),
        "run": str(run),
        "index": provenance(info),
        "top_k": cfg.top_k,
        "queries": queries,
        "seconds": round(time.monotonic() - t0, 3),
    }
    scored = [it for it in items if "_scores" in it]
    if cfg.aggregate != "none" and scored:
        doc["aggregate"] = aggregate(cfg.aggregate, scored, cfg.top_k, clips)
    return doc


def aggregate(
    method: str, scored: list[dict[str, Any]], top_k: int | None, clips: dict[int, dict[str, str]]
) -> dict[str, Any]:
    """Combine many queries: mean score per clip, or a Motive-style majority vote over top-k."""
    import numpy as np

    if method == "mean":
        total: dict[int, float] = defaultdict(float)
        for it in scored:
            for s, i in zip(it["_scores"].tolist(), it["_ids"].tolist()):
                total[i] += s
        ranked = sorted(total.items(), key=lambda kv: -kv[1])
        k = len(ranked) if top_k is None else top_k
        ids = np.array([i for i, _ in ranked[:k]])
        means = np.array([v / len(scored) for _, v in ranked[:k]])
        return {"method": "mean", "queries": len(scored), "results": _results(means, ids, clips)}
    votes: dict[int, int] = defaultdict(int)
    score_sum: dict[int, float] = defaultdict(float)
    k_vote = top_k or 10
    for it in scored:
        for s, i in zip(it["_scores"][:k_vote].tolist(), it["_ids"][:k_vote].tolist()):
            votes[i] += 1
            score_sum[i] += s
    ranked = sorted(votes, key=lambda i: (-votes[i], -score_sum[i]))
    results = []
    for rank, i in enumerate(ranked[: top_k or len(ranked)], start=1):
        results.append(
            {"rank": rank, "clip_id": int(i), **clips.get(i, {}), "score": float(votes[i]), "votes": votes[i]}
        )
    return {"method": "vote", "queries": len(scored), "top_k_per_query": k_vote, "results": results}
