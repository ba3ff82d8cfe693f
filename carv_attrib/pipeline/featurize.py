"""Stage 2, `featurize`: per-clip projected gradients from the latent cache, then the index.

For each ok clip of RUN/latents, K (σ, ε) draws reuse its cached latent (the CARV amortisation):
σ from the draw rule (iid | stratified | stratified-is over p(σ) or a fitted proposal q), ε from the
counter-based common random numbers; one forward+backward over B clips x K draws gives each clip's
weighted K-draw average gradient, projected per layer (kron) or densely. One feature block per
checkpoint, concatenated.

    from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
    summary = run_featurize(FeaturizeConfig(run="runs/demo", model="models/tiny-wan", draws=8))

Output: RUN/features/part-NNNNN.parquet (one per latent shard, same resume rules as encode) and,
at the end, RUN/index/ (see `carv_attrib.pipeline.index`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carv_attrib import __version__
from carv_attrib.data.store import ShardStore, now_iso, read_json
from carv_attrib.errors import UsageError

log = logging.getLogger(__name__)

PROJECTORS = ("kron", "dense")
DEFAULT_PROJ_DIM = 1280  # tiny model: 20 block layers x 8 x 8


@dataclass
class FeaturizeConfig:
    run: Path | str
    model: str
    checkpoints: list[str] = field(default_factory=list)  # empty: MODEL's own transformer
    draws: int = 8
    timesteps: str = "stratified-is"
    density: str = "uniform"
    plan: Path | str | None = None  # plan.json from `carv-attrib plan` (its fitted proposal q)
    output_fn: str = "loss"
    projector: str = "kron"
    proj_dim: int | None = None  # total dimension per checkpoint; None: kron_dims per layer (kron)
    kron_dims: tuple[int, int] | None = None  # (k_out, k_in) per Linear layer; None: (8, 8)
    layers: tuple[str, ...] = ("blocks.*",)
    matrix: str = "gaussian"
    precondition: str = "cosine"
    lambda_rel: float = 1e-2
    index_factory: str | None = None
    seed: int = 0
    noise: str = "shared"
    antithetic: bool = False
    batch_clips: int = 4
    device: str = "auto"
    dtype: str = "float32"
    overwrite: bool = False


@dataclass
class FeaturizeSummary:
    run: str
    clips: int
    ok: int
    nonfinite: int
    dim: int
    shards_written: int
    shards_skipped: int
    seconds: float
    clips_per_s: float
    fingerprint: str
    index: dict[str, Any] | None = None


ProgressFn = Callable[[str, dict[str, Any]], None]


def _noop(event: str, info: dict[str, Any]) -> None:
    pass


def draw_rule(cfg: FeaturizeConfig) -> Any:
    """The DrawRule of this config (with the plan's proposal when one is given)."""
    from carv_attrib.carv.draws import DrawRule
    from carv_attrib.carv.timesteps import Proposal

    proposal = None
    if cfg.plan is not None:
        plan_path = Path(cfg.plan)
        if not plan_path.exists():
            raise UsageError(f"--plan {plan_path}: no such file")
        plan = read_json(plan_path)
        if "proposal" not in plan:
            raise UsageError(f"--plan {plan_path}: not a plan.json from `carv-attrib plan` (no 'proposal')")
        if cfg.timesteps != "stratified-is":
            raise UsageError(f"--plan gives a proposal for --timesteps stratified-is, not {cfg.timesteps}")
        plan_fn = plan.get("output_fn", "loss")
        if plan_fn != cfg.output_fn:
            # q is fitted to one output function's gradient norms; another one's would be unbiased
            # under it but could lose the variance reduction the plan promised.
            raise UsageError(
                f"--plan {plan_path} was fitted for --output-fn {plan_fn}, not {cfg.output_fn}; featurize "
                f"with --output-fn {plan_fn}, or run `carv-attrib plan ... --output-fn {cfg.output_fn}`"
            )
        proposal = Proposal.from_json(plan["proposal"])
    try:
        return DrawRule(
            seed=cfg.seed,
            scheme=cfg.timesteps,
            k=cfg.draws,
            density=proposal.density if proposal is not None and cfg.density == "uniform" else cfg.density,
            proposal=proposal,
            noise=cfg.noise,
            antithetic=cfg.antithetic,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def build_projector(
    cfg_projector: str,
    transformer: Any,
    layers: tuple[str, ...],
    seed: int,
    proj_dim: int | None,
    matrix: str,
    kron_dims: tuple[int, int] | None = None,
) -> Any:
    from carv_attrib.attrib.projection import (
        DEFAULT_K_IN,
        DEFAULT_K_OUT,
        DenseProjector,
        KronProjector,
        select_linear_layers,
        shapes_for_total_dim,
    )

    try:
        selected = select_linear_layers(transformer, layers)
        if cfg_projector == "kron":
            if proj_dim and kron_dims:
                raise ValueError("give --proj-dim (a total) or --kron-dims (per layer), not both")
            shapes = shapes_for_total_dim(selected, proj_dim) if proj_dim else None
            k_out, k_in = kron_dims or (DEFAULT_K_OUT, DEFAULT_K_IN)
            return KronProjector(
                transformer, selected, seed=seed, kind=matrix, shapes=shapes, patterns=list(layers),
                k_in=k_in, k_out=k_out,
            )  # fmt: skip
        if kron_dims:
            raise ValueError("--kron-dims applies to --projector kron only; give --proj-dim for dense")
        if cfg_projector == "dense":
            return DenseProjector(selected, seed=seed, dim=proj_dim or DEFAULT_PROJ_DIM, kind=matrix)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    raise UsageError(f"--projector {cfg_projector}: choose one of {', '.join(PROJECTORS)}")


def projector_from_spec(transformer: Any, spec: dict[str, Any]) -> Any:
    from carv_attrib.attrib.projection import DenseProjector, KronProjector

    return (KronProjector if spec["kind"] == "kron" else DenseProjector).from_spec(transformer, spec)


@dataclass
class Featurizer:
    """Loaded transformers (one per checkpoint), their projectors, and the draw rule: the part of
    featurize that `score` reuses so that queries get exactly the training clips' treatment."""

    transformers: list[Any]
    projectors: list[Any]
    rule: Any
    output_fn: str
    device: str
    _eps_cache: dict[tuple[int, tuple[int, ...]], Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.projectors)

    @property
    def blocks(self) -> list[int]:
        return [p.dim for p in self.projectors]

    def use_rule(self, rule: Any) -> None:
        """Switch to another draw rule (replicates, other schemes) and forget cached draws."""
        self.rule = rule
        self._eps_cache = {}

    def draws(self, clip_id: int, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        """(σ, w, ε) of a clip; the shared stream is computed once per latent shape."""
        stream = self.rule.stream_for(clip_id)
        key = (stream, shape)
        if key not in self._eps_cache:
            if self.rule.noise != "shared":
                return self.rule.draws_for(stream, shape, device=self.device)
            self._eps_cache = {key: self.rule.draws_for(stream, shape, device=self.device)}
        return self._eps_cache[key]

    def features(self, clips: list[tuple[int, Any, Any]]) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        """clips: [(clip_id, latent (C,T,h,w), trimmed text (L,D))] → (feats (B, D), losses (B, n_ckpt·K),
        [(σ, w)] per clip)."""
        import torch

        from carv_attrib.attrib.gradients import ClipDraws, dense_features, kron_features
        from carv_attrib.attrib.projection import KronProjector
        from carv_attrib.models.wan import pad_context

        batch, draws = [], []
        for clip_id, z, emb in clips:
            sigma, w, eps = self.draws(clip_id, tuple(z.shape))
            draws.append((sigma, w))
            batch.append(ClipDraws(z.to(self.device), pad_context(emb).to(self.device), sigma, w, eps))
        feats, losses = [], []
        for transformer, proj in zip(self.transformers, self.projectors):
            if isinstance(proj, KronProjector):
                f, ell = kron_features(transformer, proj, batch, self.output_fn)
            else:
                f, ell = dense_features(
                    transformer, proj_layers(transformer, proj), proj, batch, self.output_fn
                )
            feats.append(f)
            losses.append(ell)
        return torch.cat(feats, dim=1), torch.cat(losses, dim=1), draws


def proj_layers(transformer: Any, proj: Any) -> list[tuple[str, Any]]:
    modules = dict(transformer.named_modules())
    return [(name, modules[name]) for name, _, _ in proj.layer_shapes]


def load_featurizer(
    model: str,
    checkpoints: list[str | None],
    projector_specs: list[dict[str, Any]] | None,
    rule: Any,
    output_fn: str,
    device: str,
    dtype: str,
    new_projector: Callable[[Any], Any] | None = None,
) -> Featurizer:
    from carv_attrib.models.wan import load_transformer, resolve_device

    device = resolve_device(device)
    transformers = [load_transformer(model, ck, device=device, dtype=dtype) for ck in checkpoints]
    if projector_specs is not None:
        projectors = [projector_from_spec(t, s) for t, s in zip(transformers, projector_specs)]
    else:
        assert new_projector is not None
        projectors = [new_projector(t) for t in transformers]
    return Featurizer(transformers, projectors, rule, output_fn, device)


def feature_schema(dim: int, n_draw_losses: int) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("clip_id", pa.int64()),
            ("vid", pa.string()),
            ("status", pa.string()),  # "ok" or "nonfinite" (kept out of the index)
            ("feature", pa.list_(pa.float32(), dim)),
            ("feature_norm", pa.float32()),
            ("loss", pa.float32()),  # weighted K-draw objective, mean over checkpoints
            ("draw_losses", pa.list_(pa.float32(), n_draw_losses)),  # per checkpoint, per draw
            ("sigmas", pa.list_(pa.float64())),
            ("weights", pa.list_(pa.float64())),
        ]
    )


def features_identity(
    cfg: FeaturizeConfig,
    latents_fp: str,
    ckpt_ids: list[dict[str, Any]],
    rule: Any,
    proj_spec: dict[str, Any],
) -> dict[str, Any]:
    from carv_attrib.carv.objective import TIMESTEP_CONVENTION

    return {
        "latents": latents_fp,
        "transformers": [c["fingerprint"] for c in ckpt_ids],
        "draws": rule.to_dict(),
        "output_fn": cfg.output_fn,
        "timestep": TIMESTEP_CONVENTION,
        "projector": {k: v for k, v in proj_spec.items() if k != "rng"},
        "dtype": cfg.dtype,
        "context": "UMT5 embedding zero-padded to 512 tokens, batch 1 broadcast over draws",
    }


def run_featurize(cfg: FeaturizeConfig, progress: ProgressFn = _noop) -> FeaturizeSummary:
    import numpy as np
    import pyarrow as pa
    import torch

    from carv_attrib.carv.objective import OUTPUT_FNS
    from carv_attrib.data.latents import iter_cached
    from carv_attrib.models.wan import checkpoint_identity

    t0 = time.monotonic()
    run = Path(cfg.run)
    latents = ShardStore(run, "latents")
    lat_cfg = latents.read_config()
    if lat_cfg is None or not latents.done_shards():
        raise UsageError(f"{run} has no latent cache; run `carv-attrib encode ... --out {run}` first")
    if cfg.output_fn not in OUTPUT_FNS:
        raise UsageError(f"--output-fn {cfg.output_fn}: choose one of {', '.join(OUTPUT_FNS)}")
    if cfg.draws < 1 or cfg.batch_clips < 1:
        raise UsageError("--draws and --batch-clips must be >= 1")
    check_model_matches_latents(cfg.model, lat_cfg)
    rule = draw_rule(cfg)
    # Absolute paths: index_info.json records them for `score`, which may run from anywhere.
    checkpoints: list[str | None] = [str(Path(c).resolve()) for c in cfg.checkpoints] or [None]
    ckpt_ids = [checkpoint_identity(cfg.model, ck) for ck in checkpoints]

    featurizer = load_featurizer(
        cfg.model,
        checkpoints,
        None,
        rule,
        cfg.output_fn,
        cfg.device,
        cfg.dtype,
        new_projector=lambda t: build_projector(
            cfg.projector, t, cfg.layers, cfg.seed, cfg.proj_dim, cfg.matrix, cfg.kron_dims
        ),
    )
    proj_spec = featurizer.projectors[0].spec()
    config = features_identity(cfg, lat_cfg["fingerprint"], ckpt_ids, rule, proj_spec)
    store = ShardStore(run, "features")
    fp = store.prepare(config, overwrite=cfg.overwrite, what="featurize")
    provenance = {
        "stage": "features",
        "fingerprint": fp,
        "tool_version": __version__,
        "config": config,
        "checkpoints": [c["checkpoint"] for c in ckpt_ids],
        "checkpoint_paths": checkpoints,
        "checkpoint_fingerprints": [c["fingerprint"] for c in ckpt_ids],
        "blocks": featurizer.blocks,
    }

    shards = latents.done_shards()
    todo = [i for i in shards if not store.is_done(i)]
    n_todo = sum(s["ok"] for s in latents.read_stats() if s["shard"] in todo)
    progress(
        "start", {"total": n_todo, "todo": n_todo, "shards": len(shards), "skipped": len(shards) - len(todo)}
    )
    dim = featurizer.dim
    n_losses = len(checkpoints) * cfg.draws
    processed = 0
    for si in todo:
        t_shard = time.monotonic()
        clips = list(iter_cached(run, si))
        rows: list[dict[str, Any]] = []
        for start in range(0, len(clips), cfg.batch_clips):
            chunk = clips[start : start + cfg.batch_clips]
            feats, losses, draws = featurizer.features([(c.clip_id, c.latent, c.text_emb) for c in chunk])
            for c, f, ell, (sigma, w) in zip(chunk, feats, losses, draws):
                finite = bool(torch.isfinite(f).all())
                rows.append(
                    {
                        "clip_id": c.clip_id,
                        "vid": c.vid,
                        "status": "ok" if finite else "nonfinite",
                        "feature": f.numpy().astype(np.float32),
                        "feature_norm": float(f.norm()) if finite else float("nan"),
                        "loss": float((ell.view(len(checkpoints), cfg.draws) * w.float()).mean(1).mean()),
                        "draw_losses": ell.numpy().astype(np.float32),
                        "sigmas": sigma.tolist(),
                        "weights": w.tolist(),
                    }
                )
                progress("clip", {"status": rows[-1]["status"], "vid": c.vid})
            processed += len(chunk)
        stats = {
            "shard": si,
            "clips": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows),
            "nonfinite": sum(r["status"] != "ok" for r in rows),
            "wall_s": round(time.monotonic() - t_shard, 4),
            "finished_at": now_iso(),
        }
        table = pa.Table.from_pylist(rows, schema=feature_schema(dim, n_losses))
        store.write_shard(si, table, stats, provenance)
        progress("shard", stats)

    totals = Counter()
    for s in store.read_stats():
        totals["clips"] += s["clips"]
        totals["ok"] += s["ok"]
        totals["nonfinite"] += s["nonfinite"]
    seconds = time.monotonic() - t0
    return FeaturizeSummary(
        run=str(run),
        clips=totals["clips"],
        ok=totals["ok"],
        nonfinite=totals["nonfinite"],
        dim=dim,
        shards_written=len(todo),
        shards_skipped=len(shards) - len(todo),
        seconds=round(seconds, 3),
        clips_per_s=round(processed / seconds, 3) if processed else 0.0,
        fingerprint=fp,
    )


def check_model_matches_latents(model: str, lat_cfg: dict[str, Any]) -> None:
    """The transformer must belong with the VAE and text encoder that made the latent cache."""
    from carv_attrib.models.wan import model_identity

    comps = lat_cfg["config"]["model"]["components"]
    now = model_identity(model, tuple(comps))
    diffs = [c for c in comps if now["components"][c] != comps[c]]
    if diffs:
        raise UsageError(
            f"--model {model} differs from the model that encoded this run "
            f"({lat_cfg['config']['model'].get('source')}) in: {', '.join(diffs)}; "
            "featurize with the same model, or re-encode"
        )


def iter_feature_blocks(
    run: Path, status: str = "ok", shards: list[int] | None = None
) -> Iterator[tuple[Any, Any]]:
    """(clip ids (n_s,) int64, features (n_s, D) float32) of each done feature shard (or of `shards`)
    with such rows."""
    import numpy as np
    import pyarrow.compute as pc

    store = ShardStore(Path(run), "features")
    for t in store.iter_tables(columns=["clip_id", "status", "feature"], shards=shards):
        t = t.filter(pc.equal(t.column("status"), status))
        if t.num_rows == 0:
            continue
        col = t.column("feature").combine_chunks()
        d = col.type.list_size
        feats = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)
        yield t.column("clip_id").to_numpy(), feats


def feature_ids(run: Path, status: str = "ok", shards: list[int] | None = None) -> Any:
    """(n,) int64 clip ids of the rows with `status`, in the order `iter_feature_blocks` yields them."""
    import numpy as np
    import pyarrow.compute as pc

    store = ShardStore(Path(run), "features")
    parts = [
        t.filter(pc.equal(t.column("status"), status)).column("clip_id").to_numpy()
        for t in store.iter_tables(columns=["clip_id", "status"], shards=shards)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def feature_matrix(run: Path, status: str = "ok") -> tuple[Any, Any]:
    """(clip ids (n,) int64, features (n, D) float32) of all done feature shards, in memory."""
    import numpy as np

    blocks = list(iter_feature_blocks(run, status))
    if not blocks:
        raise UsageError(f"{run} holds no ok features; run featurize first")
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
