"""Stage 3, `score`: which training clips shaped these generated videos?

Each query is decoded and encoded with the settings recorded in the index (`EncodeFacts`: frames,
size, fps, VAE, text encoder), featurized with exactly the index's transformer(s), draw rule
(common random numbers: under shared noise the query sees the same (σ, ε) draws as the training
clips), output function and projector, preconditioned as the index requires and searched in FAISS.

    from carv_attrib.pipeline.score import ScoreConfig, run_score
    doc = run_score(ScoreConfig(run="runs/demo", queries=["gen.mp4"], prompt="a red square ..."))
    doc["queries"][0]["results"][0]   # {"rank": 1, "clip_id": ..., "vid": ..., "score": ...}

With `null_prompt=True` (`--null-prompt`) each query is also featurized under the empty text, the
context of the unconditional branch of classifier-free guidance, and ranked like the captioned one:
the query's `null_prompt` block holds that ranking and its top-k overlap with the captioned one (a clip
in both does not owe its rank to the caption alone; read the overlap against chance, k/N, and against
the other queries' null lists: on the demo run the null ranking hardly depends on the query, README).
Without a prompt the queries are scored under the empty text alone (`conditioning: "null"`); an empty or
blank `--prompt` (or `--prompts` entry) is refused, as `encode` refuses an empty caption, naming
`--null-prompt`. A prompt past 512 UMT5 tokens is embedded from its first 512, as WanPipeline embeds it;
the query's `prompt_truncated` ({tokens, limit}) and a warning say so.

The returned document follows `carv_attrib/schemas/attribution.schema.json`.
"""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carv_attrib import __version__
from carv_attrib.attrib.featurizer import Featurizer, load_featurizer
from carv_attrib.attrib.projection import KronProjector
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.nested import check_extendable, level_draws
from carv_attrib.choices import EXECUTORS, OBJECTIVES
from carv_attrib.config import ScoreConfig
from carv_attrib.config.checks import check_choice
from carv_attrib.config.resume import recorded_options
from carv_attrib.errors import ConfigMismatchError, DamagedFileError, ModelLoadError, UsageError
from carv_attrib.models.clip_encoder import ClipEncoder, EncodeFailure
from carv_attrib.models.identity import ENCODER_COMPONENTS, check_encoder_matches, check_transformers_match
from carv_attrib.models.wan import MAX_SEQUENCE_LENGTH, WanModel, load_wan
from carv_attrib.pipeline._job import ProgressFn, noop, record
from carv_attrib.pipeline.index_parts import SHARDS_DIR, shard_name
from carv_attrib.search import uncertainty as unc
from carv_attrib.search.explain import explain_result, layer_slices, layer_split, stratum_split
from carv_attrib.search.index import RayShardedIndex, index_ids, load_index, load_sharded, search
from carv_attrib.search.precondition import load_preconditioner
from carv_attrib.search.refine import QUERY, check_refinable, refine
from carv_attrib.search.rerank import VectorStore, rerank
from carv_attrib.search.scale import RunScale, run_scales, sample_ids
from carv_attrib.search.sketch import SketchedPreconditioner, index_preconditioner, unsketched
from carv_attrib.store.features import stored_features
from carv_attrib.store.latents import read_latents
from carv_attrib.store.live import selection
from carv_attrib.store.manifest import clip_id_for, read_text_file
from carv_attrib.store.records import IndexInfo
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import now_iso, write_json_atomic
from carv_attrib.video.failures import ClipFailure, failure_message
from carv_attrib.video.motion import check_rule
from carv_attrib.video.pool import DecodePool
from carv_attrib.video.probe import refuse_still_images

__all__ = [
    "SCHEMA_VERSION",
    "NULL_PROMPT",
    "CONDITIONINGS",
    "ScoreConfig",
    "Query",
    "run_score",
    "read_prompts",
    "provenance",
    "aggregate",
    "null_embedding",
    "null_prompt_block",
]

SCHEMA_VERSION = "1.1"  # 1.1: clip_id_str beside every clip_id
ClipMeta = dict[int, dict[str, str]]
# The unconditional branch's text: diffusers' WanPipeline.encode_prompt embeds negative_prompt "" when
# none is given (`negative_prompt or ""`), through the same _get_t5_prompt_embeds as a caption.
NULL_PROMPT = ""
CONDITIONINGS = ("prompt", "null")  # a query's "conditioning": its prompt, or the empty text alone


@dataclass
class Query:
    """One query video through the stage: its inputs, its encode, its search, its result rows."""

    path: str
    prompt: str
    status: str = "ok"  # "ok" or "error"
    error: str | None = None
    latent: torch.Tensor | None = None  # (C, T, h, w), rounded through the cache dtype
    text_emb: torch.Tensor | None = None  # (L, D) trimmed
    motion: torch.Tensor | None = None  # (T, h, w) motion map, when the index's objective is motion
    scores: np.ndarray | None = None  # (n,) every score FAISS returned, best first
    ids: np.ndarray | None = None  # (n,) int64 clip ids beside them
    results: list[dict[str, Any]] = field(default_factory=list)
    # (k,) cos(ψ_q, ψ_i) of the top-k: what the untrained check reads, since a score's scale follows the
    # preconditioner (normalize keeps ‖φ_i‖^0.5, whose spread says nothing about training)
    cosines: np.ndarray | None = None
    scale: RunScale | None = None  # the query's scores over the run (`search.scale`), None if unreadable
    # (K, D) float32 y_k/K per draw (`Featurizer.draw_parts`): the standard errors' query side; None
    # where the projector has no per-layer hooks (dense)
    parts: np.ndarray | None = None
    uncertainty: dict[str, Any] | None = None  # how se / p_top_k were obtained (`uncertainty.describe`)
    conditioning: str = "prompt"  # "prompt": ranked under its caption; "null": under the empty text
    null: Query | None = None  # --null-prompt: this query again under the empty text (`_null_copies`)
    prompt_tokens: int | None = None  # the prompt's UMT5 tokens before truncation (> 512: truncated)

    @property
    def truncated(self) -> bool:
        return self.prompt_tokens is not None and self.prompt_tokens > MAX_SEQUENCE_LENGTH

    def fail(self, error: str) -> None:
        self.status, self.error = "error", error

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "prompt": self.prompt, "status": self.status}
        if self.status != "ok":
            out["error"] = self.error
        out["results"] = self.results if self.status == "ok" else []
        if self.status == "ok" and self.scale is not None:
            out["scale"] = self.scale.to_json()
        if self.status == "ok" and self.uncertainty is not None:
            out["uncertainty"] = self.uncertainty
        out["conditioning"] = self.conditioning
        if self.truncated:  # embedded from its first 512 tokens, as WanPipeline would generate from it
            out["prompt_truncated"] = {"tokens": self.prompt_tokens, "limit": MAX_SEQUENCE_LENGTH}
        if self.status == "ok" and self.null is not None:
            out["null_prompt"] = null_prompt_block(self, self.null)
        return out


def read_prompts(queries: list[Path | str], prompt: str | None, prompts_file: Path | str | None) -> list[str]:
    """One prompt per query: --prompt for a single query, or a JSON/CSV mapping path → prompt."""
    return resolve_queries(queries, prompt, prompts_file)[1]


def resolve_queries(
    queries: list[Path | str], prompt: str | None, prompts_file: Path | str | None
) -> tuple[list[Path], list[str]]:
    """(query videos, their prompts). With --prompts FILE and no QUERY arguments, the file lists the
    queries. Paths in the file are relative to the file's folder and are matched to QUERY arguments
    after resolution (`./a.mp4`, `a.mp4` and its absolute path are one video); a bare file name or
    stem in the file matches a query of that name when it is unique."""
    if prompt is not None and prompts_file is not None:
        raise UsageError("give either --prompt or --prompts, not both")
    if prompt is not None:
        if len(queries) != 1:
            raise UsageError(
                f"--prompt names one query's prompt but {len(queries)} queries were given; use --prompts FILE"
            )
        return [Path(queries[0])], [prompt]
    if prompts_file is None:
        raise UsageError(
            "each query needs its prompt: pass --prompt TEXT (one query) or --prompts FILE "
            "(or --null-prompt alone to score under the empty text)"
        )
    path = Path(prompts_file)
    if not path.exists():
        raise UsageError(f"--prompts {path}: no such file")
    mapping = _read_prompt_mapping(path)
    blank = [k for k, v in mapping.items() if isinstance(v, str) and not v.strip()]
    if blank:  # as --prompt "" (ScoreConfig.validate) and as encode refuses an empty caption
        shown = ", ".join(blank[:5]) + (f" and {len(blank) - 5} more" if len(blank) > 5 else "")
        raise UsageError(
            f"--prompts {path}: empty prompt for {shown}; to attribute under the empty text (the "
            "unconditional branch), pass --null-prompt without --prompts"
        )
    by_path = {(path.parent / k).resolve(): v for k, v in mapping.items()}  # relative to the file
    if not queries:  # the file lists the queries
        if not mapping:
            raise UsageError(f"--prompts {path} lists no query")
        return list(by_path), list(by_path.values())
    names: dict[str, list[str]] = {}
    for k, v in mapping.items():
        for key in {Path(k).name, Path(k).stem}:
            names.setdefault(key, []).append(v)
    out, missing = [], []
    for q in queries:
        qp = Path(q)
        hit = by_path.get(qp.resolve())
        if hit is None:
            hits = names.get(qp.name) or names.get(qp.stem) or []
            hit = hits[0] if len(hits) == 1 else None
        if hit is None:
            missing.append(str(q))
        else:
            out.append(hit)
    if missing:
        raise UsageError(f"--prompts {path} has no prompt for: {', '.join(missing)}")
    return [Path(q) for q in queries], out


def _read_prompt_mapping(path: Path) -> dict[str, str]:
    mapping: dict[str, str] = {}
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
                for row in csv.DictReader(f):
                    key = row.get("path") or row.get("query")
                    if key is None or "prompt" not in row:
                        raise UsageError(
                            f"--prompts {path}: CSV needs columns 'path' (or 'query') and 'prompt'"
                        )
                    mapping[key] = row["prompt"]
        else:
            data = json.loads(read_text_file(path, "--prompts file"))
            if isinstance(data, list):
                data = {d["path"]: d["prompt"] for d in data}
            mapping = {str(k): str(v) for k, v in data.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(
            f"--prompts {path}: expected a JSON object {{path: prompt}} or a CSV with path,prompt ({exc})"
        ) from exc
    return mapping


def _check_index_use(cfg: ScoreConfig, run: RunDir, info: IndexInfo) -> None:
    """UsageError (exit 2), before any query is encoded, for options the index cannot serve: another
    --objective, motion maps of another flow rule, --explain on dense features."""
    kind = info.objective.get("kind", "uniform")
    if kind not in OBJECTIVES:
        raise UsageError(
            f"{run}'s index records an unknown objective {kind!r}; expected one of {', '.join(OBJECTIVES)}"
        )
    if kind == "motion":  # queries get their maps from this version's flow rule: the index's must match
        check_rule(info.objective.get("rule"), f"{run}'s index")
    if cfg.explain:  # refused before any query is encoded
        try:
            layer_slices(info.projector, info.blocks)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if cfg.refine and info.sketch:  # refine recovers raw features from the indexed vectors: S loses them
        raise UsageError(
            f"--refine with an index built with --index-dim {info.sketch['out_dim']}: not supported; "
            f"rebuild without it (`carv-attrib index {run} --index-dim 0`) to refine"
        )
    if cfg.refine:  # refused before any query is encoded
        try:
            check_refinable(str(info.preconditioner.get("kind")))
            check_extendable(DrawRule.from_dict(info.draws))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if cfg.objective is not None and cfg.objective != kind:
        raise UsageError(
            f"--objective {cfg.objective}: {run}'s index was built with --objective {kind}, and queries "
            f"are featurized like its training clips; featurize the run with --objective {cfg.objective} "
            "(in another run) to score that way"
        )


def _resolve_model(cfg: ScoreConfig, run: RunDir, info: IndexInfo) -> str:
    """The model to score with, refused unless it is the index's: --model, else the model the last
    featurize recorded in RUN/run.json (a fine-tuned pipeline that shares the encoder of the one that
    encoded RUN), else the encoder's own."""
    if cfg.model is not None:
        candidates = [cfg.model]
    else:
        from carv_attrib.config.resume import stored_options

        featurized = stored_options(run.root, "featurize").get("model")
        candidates = list(dict.fromkeys(m for m in (featurized, info.model_source) if m is not None))
    if not candidates:
        raise UsageError(f"{run} does not record its model; pass --model")
    first: Exception | None = None
    for model in candidates:
        try:
            check_encoder_matches(model, info.encode.components, info.model_source)
            check_transformers_match(model, info.checkpoint_paths, info.transformers)
            return model
        except (ConfigMismatchError, ModelLoadError, UsageError) as exc:
            first = first or exc  # the most likely model's reason is the one to show
    assert first is not None
    raise first


def resolve_lora(cfg: ScoreConfig, run: RunDir, info: IndexInfo) -> str | None:
    """The LoRA adapter to featurize the queries through: --lora, else the one the index records
    (None when the index was featurized without one). Refused (exit 2, before any query is encoded)
    when --lora is given to an index without an adapter, when the recorded adapter is gone, or when
    its weights are not the index's (sha256 of pytorch_lora_weights.safetensors)."""
    from carv_attrib.models.lora import LORA_WEIGHTS, file_sha256, is_lora_dir

    if info.lora is None:
        if cfg.lora is not None:
            raise ConfigMismatchError(
                f"--lora {cfg.lora}: {run}'s index was featurized without a LoRA adapter; score without "
                "--lora, or featurize with it (in another run)"
            )
        return None
    want = str(info.lora.get("weights_sha256", ""))
    path = Path(cfg.lora) if cfg.lora is not None else Path(str(info.lora.get("path")))
    if not is_lora_dir(path):
        if cfg.lora is not None:
            raise UsageError(f"--lora {cfg.lora}: not a LoRA directory (expected {LORA_WEIGHTS})")
        raise ModelLoadError(
            f"LoRA adapter {path}, recorded when the index was built, no longer exists; restore it there "
            f"or pass --lora DIR (the adapter with weights sha256 {want[:12]}...)"
        )
    got = file_sha256(path / LORA_WEIGHTS)
    if got != want:
        raise ConfigMismatchError(
            f"--lora {path} is not the adapter {run}'s index was built with (weights sha256 {got[:12]}... "
            f"not {want[:12]}...); score with that adapter, or featurize again with --lora {path}"
        )
    return str(path.resolve())


def query_encoder(wan: WanModel, info: IndexInfo) -> ClipEncoder:
    """The index's training-clip encoder (`info.encode`), with motion maps only when the index's
    objective weights by them."""
    return ClipEncoder(wan, info.encode, motion=info.objective.get("kind") == "motion")


def _encode_queries(
    cfg: ScoreConfig, encoder: ClipEncoder, queries: list[Query], progress: ProgressFn = noop
) -> None:
    """Decode and encode each query like a training clip (`encoder`, `query_encoder`): latents in a VAE
    batch of one, then the ok queries' prompts in one call; failures become status "error"."""
    policy, decode_fn = encoder.policy, encoder.decode_fn  # decode_fn: with the flow when maps are used
    with DecodePool(policy, workers=cfg.workers, timeout=cfg.decode_timeout, decode_fn=decode_fn) as pool:
        for i, result in pool.imap([(i, str(Path(q.path).resolve())) for i, q in enumerate(queries)]):
            q = queries[i]
            if isinstance(result, ClipFailure):
                q.fail(f"{result.kind}: {failure_message(result, 'score')}")
            else:
                out = encoder.encode_clip(result)
                if isinstance(out, EncodeFailure):
                    q.fail(f"{out.kind}: {out.message}")
                else:  # float32, with the training clips' storage rounding
                    q.latent, q.motion = out.latent_tensor(), out.motion_tensor()  # (C, T, h, w), (T, h, w)
            progress("clip", {"status": q.status})
    ok = [q for q in queries if q.status == "ok"]
    for q, emb in zip(ok, encoder.embed([q.prompt for q in ok])):
        q.text_emb = torch.from_numpy(emb.astype(np.float32))  # (L, D) trimmed
    for q, n in zip(ok, encoder.token_lengths([q.prompt for q in ok])):
        q.prompt_tokens = n


def _featurize_queries(
    cfg: ScoreConfig,
    info: IndexInfo,
    model: str,
    queries: list[Query],
    progress: ProgressFn = noop,
    lora: str | None = None,
) -> tuple[np.ndarray, Featurizer]:
    """(m, D) float32 features of the ok queries, with the index's transformers, draws and projector,
    and the featurizer (`--explain` reuses it for the top clips' per-stratum parts)."""
    featurizer = load_featurizer(
        model,
        info.checkpoint_paths,
        DrawRule.from_dict(info.draws),
        info.output_fn,
        cfg.device,
        cfg.dtype or info.feature_dtype,
        projector_specs=[info.projector] * len(info.checkpoint_paths),
        objective=info.objective,
        lora=lora,
    )
    phis = []
    per_layer = all(isinstance(p, KronProjector) for p in featurizer.projectors)
    for start in range(0, len(queries), cfg.batch_clips):
        chunk = queries[start : start + cfg.batch_clips]
        # A query's stream: the shared one (common random numbers), or under per-clip noise a stream
        # of its own derived from its file name.
        f, _, _ = featurizer.features([(query_stream_id(q), q.latent, q.text_emb, q.motion) for q in chunk])
        phis.append(f)
        for q in chunk:
            if per_layer:  # the standard errors' query side: one more K-draw backward per query
                parts, _ = featurizer.draw_parts(query_stream_id(q), q.latent, q.text_emb, q.motion)
                q.parts = parts.numpy()  # (K, D)
            progress("clip", {"status": "ok"})
    return torch.cat(phis).numpy().astype(np.float32), featurizer


def query_stream_id(q: Query) -> int:
    """The id a query's draws are made for: its stream under per-clip noise (shared noise ignores it)."""
    return clip_id_for("query:" + Path(q.path).name)


@dataclass
class LoadedIndex:
    """What score reads from RUN/index besides index_info.json, loaded with it as one snapshot
    (`RunDir.index_snapshot`): a `featurize --overwrite` meanwhile cannot mix two indexes."""

    pre: Any
    index: Any
    store: VectorStore | None  # the exact vectors of an approximate index (re-ranking)


def _recorded_shards(directory: Path) -> list[Path]:
    """The shard files index_info.json records (`shards`), in order; [] for a one-file index.
    DamagedFileError (exit 2) when shards/ holds other .faiss files than those (a stray or missing
    shard would be searched, or lost, silently)."""
    found = sorted((directory / SHARDS_DIR).glob("*.faiss")) if (directory / SHARDS_DIR).is_dir() else []
    info_path = directory / "index_info.json"
    info = IndexInfo.read(info_path) if info_path.exists() else None
    n = info.shards if info is not None else len(found)
    want = [directory / SHARDS_DIR / shard_name(i) for i in range(n)] if n > 1 else []
    if [p.name for p in found] != [p.name for p in want]:
        extra = sorted({p.name for p in found} - {p.name for p in want})
        missing = sorted({p.name for p in want} - {p.name for p in found})
        how = info.rebuild_command(directory.parent) if info is not None else "carv-attrib index RUN"
        raise DamagedFileError(
            f"{directory / SHARDS_DIR}: index_info.json records {n} shard(s) but the folder differs "
            f"(extra: {', '.join(extra) or 'none'}; missing: {', '.join(missing) or 'none'}); rebuild the "
            f"index: `{how}`"
        )
    return want


def load_index_dir(directory: Path, ray: Any = None) -> LoadedIndex:
    """Preconditioner, FAISS index and (where kept) the exact vectors of an index directory. An
    index kept as shards (`index --index-shards`) loads as a `ShardedIndex` (searched by threads),
    or with `ray` (a connected Ray) as a `RayShardedIndex` (one actor per shard); with `ray` an
    index of one file is UsageError (exit 2)."""
    shards = _recorded_shards(directory)
    if ray is not None and not shards:
        raise UsageError(
            "score --executor ray searches an index kept as shards by Ray actors, but this one is a single "
            "file; rebuild it with `carv-attrib index RUN --index-shards S` or score without --executor ray"
        )
    if ray is not None:
        index: Any = RayShardedIndex(shards, ray)
    elif shards:
        index = load_sharded(shards)
    else:
        index = load_index(directory / "index.faiss")
    return LoadedIndex(
        pre=load_preconditioner(directory / "preconditioner"),
        index=index,
        store=VectorStore(directory) if (directory / "vectors.meta").exists() else None,
    )


def _search(
    cfg: ScoreConfig,
    run: RunDir,
    info: IndexInfo,
    loaded: LoadedIndex,
    queries: list[Query],
    phi: np.ndarray,
    clips: ClipMeta,
    featurizer: Featurizer,
    progress: ProgressFn = noop,
) -> None:
    """Precondition the finite query features, search the index, fill each query's scores and rows."""
    finite = np.isfinite(phi).all(axis=1)
    for q, good in zip(queries, finite):
        if not good:
            q.fail("nonfinite: the query's gradient feature has NaN/Inf")
    searched = [q for q, good in zip(queries, finite) if good]
    if not searched:
        return
    pre, index = loaded.pre, loaded.index
    store = loaded.store if info.rerank_vectors else None
    want_all = cfg.top_k is None or cfg.aggregate == "mean"
    nprobe = cfg.nprobe or info.nprobe
    psi = pre.prepare_query(phi[finite])  # (m, D)
    # past the k-th: the candidates whose chance of entering the top-k `p_top_k` weighs
    n_cand = None if want_all else min(int(index.ntotal), candidates_for(cfg.top_k))
    if info.rerank_vectors and cfg.rerank > 0 and not want_all:
        # Approximate index: R·k candidates re-scored exactly from the stored vectors (`attrib.rerank`)
        _, cand = search(index, psi, max(cfg.top_k * cfg.rerank, n_cand), nprobe)
        scores, ids = rerank(store, psi, cand, n_cand)
    else:
        scores, ids = search(index, psi, n_cand, nprobe)
    for q, s, i in zip(searched, scores, ids):
        q.scores, q.ids = s, i
        k = len(s) if cfg.top_k is None else cfg.top_k
        q.results = _results(s[:k], i[:k], clips)
    if cfg.refine:
        _refine(cfg, run, info, index, store, searched, featurizer, pre, clips, progress)
    _result_cosines(run, info, index, store, searched, psi)
    # displayed scores that are exact inner products of the indexed vectors (Flat) or re-ranked from the
    # stored ones are recomputed by the scale from the same vectors: a result is placed by its own
    reranked = bool(info.rerank_vectors and cfg.rerank > 0 and not want_all)
    _place_results(
        run, info, index, store, searched, psi, same_source=info.rerank_vectors is None or reranked
    )
    exact: ClipTerms = {}
    if cfg.explain:
        # a sketched index: explained from the stored per-layer features, uncompressed (exact splits)
        psi_x = psi if unsketched(pre) is pre else unsketched(pre).prepare_query(phi[finite])
        _explain(run, info, index, store, searched, psi_x, pre)
        exact = _explain_strata(run, featurizer, pre, searched, psi, progress, psi_x)
    _uncertainty(run, info, index, store, searched, psi, featurizer.rule, pre, cfg.top_k, exact)


def candidates_for(top_k: int) -> int:
    """How many clips score searches for a top-k: 2k + 10, so that p_top_k sees the clips just below."""
    return 2 * int(top_k) + 10


# (query position, clip id) → the clip side's per-draw terms (K,) (`uncertainty.clip_terms`)
ClipTerms = dict[tuple[int, int], np.ndarray]


def _uncertainty(
    run: RunDir,
    info: IndexInfo,
    index: Any,
    store: VectorStore | None,
    queries: list[Query],
    psi: np.ndarray,
    rule: DrawRule,
    pre: Any,
    top_k: int | None,
    exact: ClipTerms,
) -> None:
    """Each result's "se" and "p_top_k" (`search.uncertainty`), and the query's "uncertainty" block:
    the query side from its per-draw parts and the candidates' indexed vectors, the clip side
    recomputed where `exact` holds it (--explain), mirrored from the query's draws otherwise. None
    where the query has no parts (dense projector) or the vectors cannot be read back (IVF without
    stored vectors)."""
    for j, (q, psi_q) in enumerate(zip(queries, psi)):
        if q.uncertainty is not None:  # --refine filled them
            continue
        for r in q.results:
            r["se"], r["se_gap"], r["p_top_k"] = None, None, None
        if q.parts is None or q.scores is None or q.ids is None:
            continue
        keep = q.ids >= 0
        n = int(keep.sum()) if top_k is None else min(int(keep.sum()), candidates_for(top_k))
        n = min(n, MAX_SE)
        ids, scores = q.ids[keep][:n], q.scores[keep][:n]
        try:
            psi_c = np.asarray(_indexed_vectors(store, index, ids), dtype=np.float64)  # (n, D)
        except RuntimeError:
            continue
        dq, phi_q = unc.centred_draws(q.parts)  # (K, D), (D,)
        xq = unc.query_terms(pre.linearize(dq, phi_q, "query"), psi_c)  # (n, K)
        # a sketched index cannot invert ψ: the clips' raw features come from RUN/features
        pre_c = pre.with_raw(stored_features(run, ids)) if isinstance(pre, SketchedPreconditioner) else pre
        xi = unc.mirrored_clip_terms(pre_c, dq, phi_q, psi_c, psi_q)  # (n, K)
        recomputed = 0
        for c, cid in enumerate(ids.tolist()):
            terms = exact.get((j, int(cid)))
            if terms is not None:
                xi[c], recomputed = terms, recomputed + 1
        if rule.noise == "shared":  # the same draws on both sides: their terms add draw by draw
            shared, own = unc.variance_basis(xq + xi, rule), None
        else:  # the clip's own stream: its side is independent of the query's and of other clips'
            shared, own = unc.variance_basis(xq, rule), unc.variance_basis(xi, rule)
        p = unc.p_top_k(scores, shared, own, top_k) if top_k is not None else None
        _fill_errors(q.results[:n], shared, own, p)
        method = "exact" if recomputed >= min(len(q.results), n) > 0 else "cheap"
        q.uncertainty = unc.describe(method, rule) | {"candidates": n, "recomputed": recomputed}


def _fill_errors(
    results: list[dict[str, Any]], shared: np.ndarray, own: np.ndarray | None, p: np.ndarray | None
) -> None:
    """Each result's se, se_gap (to the next candidate) and p_top_k from the candidates' variance
    basis (n, U) (`uncertainty.variance_basis`), results in candidate order."""
    se = unc.standard_error(shared, own)  # (n,), NaN for K = 1
    # the gap to the next candidate: shared draws cancel in it, so it is far surer than either score
    gap = unc.standard_error(shared[:-1] - shared[1:], None if own is None else np.hypot(own[:-1], own[1:]))
    for c, r in enumerate(results):
        r["se"] = float(se[c]) if np.isfinite(se[c]) else None
        r["se_gap"] = float(gap[c]) if c < len(gap) and np.isfinite(gap[c]) else None
        r["p_top_k"] = None if p is None or r["se"] is None else float(p[c])


def default_refine_budget(top_k: int, k: int) -> int:
    """--refine's default: two levels of nested strata (K → 4K draws) for the query and its 2k + 10
    candidates, 3K draws each."""
    return 3 * (candidates_for(top_k) + 1) * int(k)


def _refine(
    cfg: ScoreConfig,
    run: RunDir,
    info: IndexInfo,
    index: Any,
    store: VectorStore | None,
    queries: list[Query],
    featurizer: Featurizer,
    pre: Any,
    clips: ClipMeta,
    progress: ProgressFn,
) -> None:
    """--refine (`search.refine`): per query, the next strata of the draws for the query and all its
    candidates while some are unsettled, then the candidates re-sorted by their refined scores, the top-k rows rebuilt with their se,
    se_gap and p_top_k, and the query's uncertainty block (method "refined", draws spent). A query
    without per-draw parts (dense) or readable vectors keeps its K-draw result."""
    assert cfg.top_k is not None  # ScoreConfig.validate
    rule = featurizer.rule
    budget = cfg.refine_budget if cfg.refine_budget is not None else default_refine_budget(cfg.top_k, rule.k)
    where = {cid: row.where for cid, _, row in run.live_latents().ok()}
    cached: dict[int, Any] = {}

    def clip_input(cid: int) -> Any:
        if cid not in cached:
            cached[cid] = next(iter(read_latents(run, selection([where[cid]]))))
        return cached[cid]

    for q in queries:
        if q.parts is None or q.scores is None or q.ids is None:
            continue
        keep = q.ids >= 0
        ids = q.ids[keep]
        try:
            psi_c = np.asarray(_indexed_vectors(store, index, ids), dtype=np.float64)  # (n, D)
        except RuntimeError:
            continue

        def parts_of(
            c: int, level: int, q: Query = q, ids: np.ndarray = ids
        ) -> tuple[np.ndarray, np.ndarray]:
            if c == QUERY:
                cid, z, emb, motion = query_stream_id(q), q.latent, q.text_emb, q.motion
            else:
                clip = clip_input(int(ids[c]))
                cid, z, emb, motion = clip.clip_id, clip.latent, clip.text_emb, clip.motion
            parts, u = featurizer.level_parts(cid, z, emb, motion, level)
            return parts.numpy(), u  # (m, D), (m,)

        u_of = lambda cid: level_draws(rule, rule.stream_for(cid), 0, (1,))[3]  # noqa: E731
        out = refine(
            pre, rule, cfg.top_k, psi_c, q.parts, parts_of, budget,
            query_u=u_of(query_stream_id(q)), clip_u=np.stack([u_of(int(c)) for c in ids]),
        )  # fmt: skip
        order = np.argsort(-out.scores, kind="stable")
        q.scores, q.ids = out.scores[order], ids[order]
        q.results = _results(q.scores[: cfg.top_k], q.ids[: cfg.top_k], clips)
        assert out.shared is not None
        own = None if out.own is None else out.own[order]
        _fill_errors(q.results, out.shared[order], own, out.p_top_k[order])
        refined = len(ids) if out.rounds else 0
        side = "mirrored" if out.rounds == 0 else ("recomputed" if pre.kind == "cosine" else "mixed")
        q.uncertainty = unc.describe("refined", rule) | {
            "clip_side": side,
            "candidates": len(ids),
            "recomputed": refined,
            "refine": out.to_json(budget),
        }
        progress("refine", {"draws": out.draws})


MAX_SE = 10_000  # results given an se (top-k all on a large run): the candidates' vectors are read whole


def _indexed_vectors(store: VectorStore | None, index: Any, ids: np.ndarray) -> np.ndarray:
    """(len(ids), D) the clips' indexed ψ: the exact ones kept for re-ranking, else the index's own
    (exact for Flat); faiss raises RuntimeError where the index cannot reconstruct (IVF, no store)."""
    if store is not None:
        return store.rows(ids)
    if hasattr(index, "reconstruct_batch"):  # index shards: one request per shard, not per vector
        return index.reconstruct_batch(np.asarray(ids, dtype=np.int64))
    return np.stack([index.reconstruct(int(i)) for i in ids])


def _result_cosines(
    run: RunDir, info: IndexInfo, index: Any, store: VectorStore | None, queries: list[Query], psi: np.ndarray
) -> None:
    """q.cosines (k,) = ⟨ψ_q, ψ_i⟩ / (‖ψ_q‖ ‖ψ_i‖) of the top results; left None where the index cannot
    give the vectors back (an IVF index without stored vectors)."""
    for q, psi_q in zip(queries, psi):
        ids = np.array([r["clip_id"] for r in q.results[:UNTRAINED_TOP]], dtype=np.int64)
        if len(ids) == 0:
            continue
        try:
            rows = np.asarray(_indexed_vectors(store, index, ids), dtype=np.float64)  # (k, D)
        except RuntimeError:
            continue
        norms = np.linalg.norm(rows, axis=1) * float(np.linalg.norm(psi_q))
        dots = rows @ np.asarray(psi_q, dtype=np.float64)  # (k,)
        q.cosines = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def _index_ids(store: VectorStore | None, index: Any) -> np.ndarray | None:
    """(N,) int64 ids of every indexed clip: the vector store's, else the IndexIDMap2's; None if neither."""
    if store is not None:
        return np.asarray(store.ids, dtype=np.int64)
    return index_ids(index)


def _place_results(
    run: RunDir,
    info: IndexInfo,
    index: Any,
    store: VectorStore | None,
    queries: list[Query],
    psi: np.ndarray,
    same_source: bool = True,
) -> None:
    """q.scale (`search.scale.RunScale`) and each result's percentile and z within the query's scores
    over the whole run: from the search itself when it returned every clip (no padding id −1, which
    HNSW leaves), else from the indexed vectors (the stored exact ones where kept) of all clips
    (≤ EXACT_MAX) or a seeded sample; left None where the vectors cannot be read. `same_source`: the
    displayed scores come from those vectors, so a result is placed by its own recomputed score."""
    n_run = int(index.ntotal)
    scales: list[RunScale | None] = [None] * len(queries)
    for j, q in enumerate(queries):
        if q.scores is not None and q.ids is not None and len(q.scores) == n_run and bool((q.ids >= 0).all()):
            scales[j] = RunScale.from_scores(q.scores, "exact", n_run)  # the displayed scores are the scale
    rest = [j for j in range(len(queries)) if scales[j] is None]
    ids = _index_ids(store, index) if rest and n_run > 0 else None
    if rest and ids is not None:
        picked = ids[sample_ids(len(ids))]
        try:
            vectors = lambda c: _indexed_vectors(store, index, c)  # noqa: E731
            for j, s in zip(rest, run_scales(psi[rest], picked, vectors, n_run, keep_own=same_source)):
                scales[j] = s
        except RuntimeError:  # faiss: this index cannot reconstruct (IVF without stored vectors)
            pass
    for q, scale in zip(queries, scales):
        q.scale = scale
        if scale is None or not q.results:
            for r in q.results:
                r["percentile"], r["z"] = None, None
            continue
        pct, z = scale.place_many(
            np.array([r["score"] for r in q.results]),
            np.array([r["clip_id"] for r in q.results], dtype=np.int64),
        )
        for j, r in enumerate(q.results):
            r["percentile"], r["z"] = float(pct[j]), (None if z is None else float(z[j]))


def _explain(
    run: RunDir,
    info: IndexInfo,
    index: Any,
    store: VectorStore | None,
    queries: list[Query],
    psi: np.ndarray,
    pre: Any = None,
) -> None:
    """Each result's score split over layers and blocks (`carv_attrib.search.explain`), from the
    clip's indexed vector (`_indexed_vectors`). A dense projector was refused by `_check_index_use`.
    A sketched index (--index-dim) mixes the layers: the split is then of the uncompressed score
    ⟨ψ_q, ψ_i⟩, from the clip's stored feature (RUN/features) preconditioned as the index was and
    `psi` the unsketched queries; "uncompressed_score" is its total and "sketch_error" = score − it."""
    slices = layer_slices(info.projector, info.blocks)
    base = unsketched(pre)
    full = base is not pre and pre is not None
    ids = sorted({int(r["clip_id"]) for q in queries for r in q.results})
    rows = dict(zip(ids, base.prepare_train(stored_features(run, ids)))) if full and ids else {}
    for q, psi_q in zip(queries, psi):
        for r in q.results:
            if full:
                psi_i = rows[int(r["clip_id"])]
            else:
                psi_i = _indexed_vectors(store, index, np.array([r["clip_id"]], dtype=np.int64))[0]
            r["explain"] = explain_result(layer_split(psi_q, psi_i, slices))
            if full:
                total = r["explain"]["total"]
                r["explain"] |= {"uncompressed_score": total, "sketch_error": r["score"] - total}


def _explain_strata(
    run: RunDir,
    featurizer: Featurizer,
    pre: Any,
    queries: list[Query],
    psi: np.ndarray,
    progress: ProgressFn,
    psi_x: np.ndarray | None = None,
) -> ClipTerms:
    """Each result's score split over timestep strata (`explain.stratum_split`): the result clips'
    per-draw parts recomputed from their cached latents with the index's draws (one K-draw backward
    per distinct clip, streamed: one clip's (K, D) parts in memory at a time), preconditioned as the
    index was; returns each (query, clip)'s exact per-draw standard-error terms. `by_stratum_total` is their sum, the score recomputed; `by_stratum_residual` = score −
    total is the rounding between the two computations (float32: ~1e-7 relative; bf16 features
    ~1e-4; an approximate index adds its own). A sketched index: the strata split the uncompressed
    score (`psi_x` the unsketched queries, the parts preconditioned unsketched), the residual is to
    "uncompressed_score", and the standard-error terms stay those of the sketched score."""
    base = unsketched(pre)
    psi_x = psi if psi_x is None else psi_x
    hits: dict[int, list[tuple[int, np.ndarray, np.ndarray, dict[str, Any]]]] = defaultdict(list)
    for j, (q, psi_q, psi_xq) in enumerate(zip(queries, psi, psi_x)):
        for r in q.results:
            hits[r["clip_id"]].append((j, psi_q, psi_xq, r))
    terms: ClipTerms = {}
    live = {cid: row.where for cid, _, row in run.live_latents().ok() if cid in hits}
    progress("explain", {"todo": len(live)})
    for clip in read_latents(run, selection(list(live.values()))):
        raw, sigma = featurizer.draw_parts(
            clip.clip_id, clip.latent, clip.text_emb, clip.motion
        )  # (K, D), (K,)
        raw64 = raw.numpy().astype(np.float64)
        psi_parts = base.prepare_train_parts(raw64, raw64.sum(axis=0))  # (K, D)
        di, phi_i = unc.centred_draws(raw64)
        dpsi_i = pre.linearize(di, phi_i, "train")  # (K, D): the exact standard error's clip side
        for j, psi_q, psi_xq, r in hits[clip.clip_id]:
            terms[(j, clip.clip_id)] = unc.clip_terms(dpsi_i, psi_q)
            strata = stratum_split(psi_xq, psi_parts, sigma.numpy(), featurizer.rule)
            total = sum(x["score"] for x in strata)
            score = r.get("explain", {}).get("uncompressed_score", r["score"])
            r.setdefault("explain", {}).update(
                by_stratum=strata, by_stratum_total=total, by_stratum_residual=score - total
            )
        progress("clip", {"status": "ok"})
    return terms


def clip_ids(clip_id: int) -> dict[str, Any]:
    """A clip id as an integer and as a decimal string: ids are 63-bit, and jq or JavaScript round
    integers above 2^53, so readers in those need the string."""
    return {"clip_id": int(clip_id), "clip_id_str": str(int(clip_id))}


def _results(scores: np.ndarray, ids: np.ndarray, clips: ClipMeta) -> list[dict[str, Any]]:
    out = []
    for rank, (s, i) in enumerate(zip(scores.tolist(), ids.tolist()), start=1):
        if i < 0:  # an approximate index can return fewer hits than asked
            continue
        meta = clips.get(i, {"vid": None, "caption": None, "path": None})
        out.append({"rank": rank, **clip_ids(i), **meta, "score": float(s)})
    return out


def provenance(info: IndexInfo) -> dict[str, Any]:
    """The attribution document's "index" block: what the queries were scored against."""
    order = ("rule", "seed", "scheme", "draws", "density", "proposal", "noise", "antithetic")  # DrawRule's
    draws = {k: info.draws[k] for k in order if k in info.draws}
    draws |= {k: v for k, v in info.draws.items() if k not in draws and k != "proposal_data"}
    enc = info.encode
    return {
        "fingerprint": info.fingerprint,
        "latents_fingerprint": info.latents_fingerprint,
        "model": {
            "source": info.model_source,
            "encode": enc.model_fingerprint,
            "transformers": info.transformers,
        },
        "encode": {
            "frames": enc.frames,
            "height": enc.height,
            "width": enc.width,
            "fps": enc.fps,
            "pad_short": enc.pad_short,
            "dtype": enc.dtype,
        },
        "estimator": {
            **draws,
            "output_fn": info.output_fn,
            "objective": info.objective,
            "timestep": info.timestep,
        },
        "projector": {k: info.projector.get(k) for k in ("kind", "seed", "matrix", "dim", "patterns")},
        "lora": info.lora,
        "preconditioner": info.preconditioner,
        "factory": info.factory,
        "nprobe": info.nprobe,
        "count": info.count,
        "dim": info.dim,
        "index_dim": info.sketch["out_dim"] if info.sketch else info.dim,
        "sketch": info.sketch,
    }


def null_embedding(encoder: ClipEncoder) -> torch.Tensor:
    """(L, D) float32 embedding of the empty text (NULL_PROMPT), exactly as a caption's
    (`ClipEncoder.embed`, i.e. WanPipeline._get_t5_prompt_embeds: the tokenizer gives "" its lone
    end-of-sequence token, so L = 1; the transformer sees it zero-padded to 512 rows, as WanPipeline's
    negative_prompt_embeds), rounded through the cache dtype like every query's text."""
    (emb,) = encoder.embed([NULL_PROMPT])
    return torch.from_numpy(emb.astype(np.float32))


def _null_copies(queries: list[Query], emb: torch.Tensor) -> list[Query]:
    """Each encoded query again under the empty text `emb` (L, D): the same latent and motion map, and
    the same draws (a query's noise stream is named by its file, `_featurize_queries`), so the two
    rankings differ only by the text the transformer attends to."""
    return [
        Query(
            path=q.path,
            prompt=NULL_PROMPT,
            conditioning="null",
            latent=q.latent,
            text_emb=emb,
            motion=q.motion,
        )
        for q in queries
    ]


def null_prompt_block(q: Query, null: Query) -> dict[str, Any]:
    """A query's "null_prompt" block: the ranking under the empty text (`null.results`, rows as in
    `results`), `top_k_overlap` = |top-k ∩ null top-k| / k with k the longer of the two lists (top-k,
    or fewer where the index holds fewer clips; None when both are empty), and the clip ids in both
    (`shared`, in the captioned ranking's order; `shared_str` in decimal, as `clip_ids`). A null pass
    that failed (non-finite feature) has status "error", its error, no results and overlap None."""
    if null.status != "ok":
        return {
            "status": "error",
            "error": null.error,
            "results": [],
            "top_k_overlap": None,
            "shared": [],
            "shared_str": [],
        }
    theirs = {r["clip_id"] for r in null.results}
    shared = [r["clip_id"] for r in q.results if r["clip_id"] in theirs]
    k = max(len(q.results), len(null.results))
    return {
        "status": "ok",
        "results": null.results,
        "top_k_overlap": len(shared) / k if k else None,
        "shared": shared,
        "shared_str": [str(c) for c in shared],
    }


def run_score(cfg: ScoreConfig, progress: ProgressFn = noop, out: Path | None = None) -> dict[str, Any]:
    """Score `cfg.queries` against RUN's index; returns the attribution document (also written to
    `out` when given, atomically) and records the invocation in RUN/run.json. Raises UsageError /
    ConfigMismatchError (exit 2) for a stale index, another model, or missing prompts; an undecodable
    query becomes status "error" while the others are scored. `progress("start", {"todo"})` then one
    "clip" event per query encoded and per query featurized (twice: captioned and empty text, under
    `null_prompt` with prompts). An index kept as shards is searched shard by shard and merged
    (threads; `cfg.executor == "ray"`: one Ray actor per shard, UsageError when Ray is missing)."""
    check_choice("--executor", cfg.executor, EXECUTORS)  # before a Ray session starts
    if cfg.executor != "ray":
        return _run_score(cfg, progress, out, load_index_dir)
    from carv_attrib.pipeline.ray_exec import ray_session

    with ray_session(cfg.ray_address) as ray:
        loaded: list[LoadedIndex] = []

        def load(directory: Path) -> LoadedIndex:
            loaded.append(load_index_dir(directory, ray=ray))
            return loaded[-1]

        try:
            return _run_score(cfg, progress, out, load)
        finally:
            for li in loaded:
                li.index.close()


def _run_score(
    cfg: ScoreConfig, progress: ProgressFn, out: Path | None, loader: Callable[[Path], LoadedIndex]
) -> dict[str, Any]:
    t0 = time.monotonic()
    if cfg.null_prompt and cfg.prompt is None and cfg.prompts_file is None:  # no caption: the empty text only
        paths, conditioning = [Path(q) for q in cfg.queries], "null"
        prompts = [NULL_PROMPT] * len(paths)
    else:
        paths, prompts = resolve_queries(list(cfg.queries), cfg.prompt, cfg.prompts_file)
        conditioning = "prompt"
    cfg.queries = paths
    cfg.validate()
    refuse_still_images(cfg.queries)
    run = RunDir(cfg.run)
    # one snapshot, read before anything else: the queries are encoded under this info's settings
    info, loaded = run.index_snapshot(loader)
    _check_index_use(cfg, run, info)
    try:  # --index-dim: queries go through the index's own sketch, re-created from its record
        loaded.pre = index_preconditioner(info.sketch, loaded.pre, int(loaded.index.d))
    except ValueError as exc:
        raise ConfigMismatchError(f"{run}/index: {exc}; rebuild it: `{info.rebuild_command(run)}`") from None
    model = _resolve_model(cfg, run, info)
    lora = resolve_lora(cfg, run, info)
    queries = [Query(path=str(p), prompt=t, conditioning=conditioning) for p, t in zip(cfg.queries, prompts)]
    both = cfg.null_prompt and conditioning == "prompt"  # a second ranking per query, under the empty text

    wan = load_wan(model, ENCODER_COMPONENTS, device=cfg.device, dtype=info.encode.dtype)
    progress("start", {"todo": (3 if both else 2) * len(queries)})
    encoder = query_encoder(wan, info)
    _encode_queries(cfg, encoder, queries, progress)  # as the training clips were
    null_emb = null_embedding(encoder) if both else None
    del wan, encoder
    clips = run.clips()
    ok = [q for q in queries if q.status == "ok"]
    for q in queries:
        if q.status != "ok":
            for _ in range(2 if both else 1):  # its failure was counted; no featurize step(s)
                progress("clip", {"status": "ok", "skipped": True})
    if ok:
        # The null copies go through the same featurize and search as their parents (one featurizer
        # load, one index search), then hang off them: q.null.
        nulls = _null_copies(ok, null_emb) if null_emb is not None else []
        phi, featurizer = _featurize_queries(cfg, info, model, ok + nulls, progress, lora)
        _search(cfg, run, info, loaded, ok + nulls, phi, clips, featurizer, progress)
        for q, n in zip(ok, nulls):
            q.null = n

    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "carv-attrib", "version": __version__},
        "created_at": now_iso(),
        "run": str(run),
        "index": provenance(info),
        "top_k": cfg.top_k,
        "queries": [q.to_json() for q in queries],
        "seconds": round(time.monotonic() - t0, 3),
    }
    scored = [q for q in queries if q.scores is not None]
    if cfg.aggregate != "none" and scored:
        doc["aggregate"] = aggregate(cfg.aggregate, scored, cfg.top_k, clips)
    doc["warnings"] = untrained_warnings(queries) + truncation_warnings(queries)
    if cfg.top_k is not None and cfg.top_k > info.count:  # said, not silently shortened
        doc["warnings"].append(
            f"top-k {cfg.top_k} asks for more clips than the index holds ({info.count}): every clip is returned"
        )
    if out is not None:
        write_json_atomic(out, doc, sort_keys=False)
    record(
        cfg.run,
        "score",
        device=cfg.device,
        started=t0,
        queries=len(cfg.queries),
        json=str(out) if out else None,
        options=recorded_options(cfg),
    )
    return doc


UNTRAINED_RATIO = 0.2  # sd of the clips' scores / a score's standard error; measured: random tiny, small,
# medium demos 0.032, 0.063, 0.029; the trained demo 0.8 (README, "Reading a score")
UNTRAINED_SPREAD = 1e-3  # without standard errors (dense projector): relative cosine spread of the top
UNTRAINED_TOP = 10  # the top results the checks read


def flatness(q: Query) -> float | None:
    """sd of the query's scores over the run (its `scale`, else its top results') divided by the
    median standard error of its top results: how much the score depends on the clip relative to
    how much it moves with the draws. None without standard errors."""
    se = [r["se"] for r in q.results[:UNTRAINED_TOP] if r.get("se") is not None]
    if len(se) < 3:
        return None
    if q.scale is not None and q.scale.sorted_scores.size >= 3:
        sd = q.scale.sd
    else:
        sd = float(np.std([r["score"] for r in q.results], ddof=1))
    median = float(np.median(se))
    return sd / median if median > 0 else None


def truncation_warnings(queries: list[Query]) -> list[str]:
    """A warning per query whose prompt is longer than 512 UMT5 tokens: it was embedded from its first
    512 (as WanPipeline embeds it, so as the video was generated from it), the rest ignored."""
    return [
        f"{q.path}: the prompt has {q.prompt_tokens} UMT5 tokens, past the text encoder's "
        f"{MAX_SEQUENCE_LENGTH}; it was truncated as WanPipeline truncates it (the words after token "
        f"{MAX_SEQUENCE_LENGTH} play no part in the scores)"
        for q in queries
        if q.truncated
    ]


def untrained_warnings(queries: list[Query]) -> list[str]:
    """A warning per query whose scores barely depend on the clip, as with a transformer that was
    never trained (random weights from `make-model`), so the ranking says little.

    With standard errors (`_uncertainty`): the clips' scores spread less than UNTRAINED_RATIO of one
    score's Monte Carlo standard error (`flatness`): the gradient moves more with the draw (σ, ε) than
    between clips. Under common random numbers such a ranking can still be *stable* (every clip sees
    the same draws, p_top_k near 1); it is the size of the clip's share that gives the model away.
    Without (dense projector, IVF without stored vectors): the ≥ 3 top cosines (ψ_q, ψ_i) within
    UNTRAINED_SPREAD of each other, relative to the largest (scores stand in where the vectors cannot
    be read)."""
    out = []
    advice = (
        "the transformer looks untrained (random weights?), so this ranking says little. "
        "Attribute with a trained model (e.g. the demo's: `make demo`, then -m demo-run/model)"
    )
    for q in queries:
        ratio = flatness(q)
        if ratio is not None:
            if ratio < UNTRAINED_RATIO:
                out.append(
                    f"{q.path}: the clips' scores spread only {ratio:.2f}× one score's Monte Carlo "
                    f"standard error (sd over the run / median se; trained models: ≥ {UNTRAINED_RATIO}): "
                    f"the gradients barely depend on the clip; {advice}"
                )
            continue
        s = list(q.cosines) if q.cosines is not None else [r["score"] for r in q.results[:UNTRAINED_TOP]]
        scale = max((abs(x) for x in s), default=0.0) or 1.0
        if len(s) >= 3 and (max(s) - min(s)) / scale < UNTRAINED_SPREAD:
            out.append(
                f"{q.path}: its top {len(s)} results all lie within {(max(s) - min(s)) / scale:.1e} "
                f"(relative cosine spread) of each other; {advice}"
            )
    return out


def aggregate(method: str, scored: list[Query], top_k: int | None, clips: ClipMeta) -> dict[str, Any]:
    """Combine many queries: mean score per clip, or a Motive-style majority vote over top-k."""
    if method == "mean":
        total: dict[int, float] = defaultdict(float)
        for q in scored:
            for s, i in zip(q.scores.tolist(), q.ids.tolist()):
                total[i] += s
        ranked = sorted(total.items(), key=lambda kv: -kv[1])
        k = len(ranked) if top_k is None else top_k
        ids = np.array([i for i, _ in ranked[:k]])
        means = np.array([v / len(scored) for _, v in ranked[:k]])
        return {"method": "mean", "queries": len(scored), "results": _results(means, ids, clips)}
    votes: dict[int, int] = defaultdict(int)
    score_sum: dict[int, float] = defaultdict(float)
    k_vote = top_k or 10  # ScoreConfig refuses vote with --top-k all; library callers get 10
    for q in scored:
        for s, i in zip(q.scores[:k_vote].tolist(), q.ids[:k_vote].tolist()):
            if i < 0:  # a short approximate result: no clip in this slot
                continue
            votes[i] += 1
            score_sum[i] += s
    ranked_ids = sorted(votes, key=lambda i: (-votes[i], -score_sum[i]))
    results = []
    for rank, i in enumerate(ranked_ids[: top_k or len(ranked_ids)], start=1):
        results.append(
            {"rank": rank, **clip_ids(i), **clips.get(i, {}), "score": float(votes[i]), "votes": votes[i]}
        )
    return {"method": "vote", "queries": len(scored), "top_k_per_query": k_vote, "results": results}
