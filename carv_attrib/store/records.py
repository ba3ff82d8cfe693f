"""Typed records of the documents a run keeps on disk, and the only code that reads them by key.

    RUN/latents/config.json        LatentsRecord   (encode: EncodeFacts, model: ModelRecord)
    RUN/features/config.json       FeaturesRecord
    RUN/index/index_info.json      IndexInfo       (encode: EncodeFacts)
    plan.json (`carv-attrib plan`) PlanDoc

Every record is a frozen dataclass with `from_dict` / `to_dict` and a `schema_version`. The readers are
tolerant of files written by earlier versions: a key missing from the file takes its default. What
happens to keys a record does not name is said per record: the stage configs and the plan keep them
(their bytes are fingerprinted or handed back whole), IndexInfo ignores them (it is rewritten whole
by every index build). `to_dict()` gives back the document as it is written today, key for key, so
old runs still load and new files are byte-identical to those of the code before these records.

The stage configs (STAGE/config.json) are written by `ShardStore.prepare` as
{"fingerprint", "config", "tool_version", "created_at"}; `config` is the dict the fingerprint is
computed over, so it is kept verbatim (`StageRecord.config`) next to the typed views parsed from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from carv_attrib.errors import ConfigMismatchError, DamagedFileError
from carv_attrib.store.digests import doc_digest
from carv_attrib.store.shards import read_json, write_json_atomic
from carv_attrib.video.decode import FramePolicy

INDEX_SCHEMA_VERSION = (
    4  # 3: live_digest replaces feature_shards (content-addressed runs); 4: sketch, trak forms
)
# Index schemas this version reads. Schema 4 marks the fields that change what `score` must do (the
# --index-dim sketch, a factored TRAK preconditioner, --index-shards): a tool that predates them would
# score wrongly, and tools that accept exactly 3 refuse a 4. A schema-3 file (including the last 3s,
# which already carried sketch and trak forms) reads here as it is: every field has its reader.
READABLE_INDEX_SCHEMAS = (3, 4)
# The stage configs carried no version before these records: version 1 is implicit,
# and `to_dict` writes the key only for a later version, so today's bytes stay as they are.
STAGE_SCHEMA_VERSION = 1
PLAN_SCHEMA = "carv-attrib/plan-1"  # plan.json's own version key ("schema")

_UNIFORM: dict[str, Any] = {"kind": "uniform"}


def _versioned(d: dict[str, Any], version: int, current: int) -> dict[str, Any]:
    return d if version == current else d | {"schema_version": version}


# -- models and encode facts ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRecord:
    """The model that encoded a run (latents/config.json "config" → "model", written by
    `carv_attrib.models.identity.model_identity`).

    source: where it was loaded from (an absolute directory or a Hub id; provenance, not fingerprinted);
    fingerprint: 16-hex sha256 over `components`; components: per-component file hashes
    ({"vae": {"files": {...}}, "text_encoder": ..., "tokenizer": ...}).
    Unknown keys are ignored (the stage config keeps them, verbatim).
    """

    source: str | None
    fingerprint: str | None
    components: dict[str, Any]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecord:
        return cls(
            source=d.get("source"), fingerprint=d.get("fingerprint"), components=d.get("components", {})
        )

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "components": self.components, "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class EncodeFacts:
    """How the run's clips were turned into latents: a query must be encoded the same way. Parsed from
    latents/config.json's "config"; stored whole under "encode" in index/index_info.json.

    frames, height, width (px), fps (0: consecutive frames), pad_short: the frame policy; dtype: the
    VAE / text encoder compute dtype; latent_dtype: the cache's storage dtype.
    """

    frames: int
    height: int
    width: int
    fps: float
    pad_short: bool
    dtype: str
    latent_dtype: str
    model_fingerprint: str | None  # of the VAE + text encoder + tokenizer files
    components: dict[str, Any]  # per-component file hashes (`carv_attrib.models.identity`)
    vae_tiling: bool = False  # the VAE encoded in tiles (`encode --vae-tiling`): queries are too
    motion_masks: str | None = None  # the motion-map rule (`encode --motion-masks`), None: no maps

    @property
    def policy(self) -> FramePolicy:
        """The frame policy the clips were decoded with."""
        return FramePolicy(
            frames=self.frames, height=self.height, width=self.width, fps=self.fps, pad_short=self.pad_short
        )

    @classmethod
    def from_latents_config(cls, config: dict[str, Any]) -> EncodeFacts:
        """From latents/config.json's "config" (`latents_identity`); latent_dtype, vae_tiling and
        motion_masks are absent from runs made before they existed."""
        model = config.get("model", {})
        return cls(
            frames=config["frames"],
            height=config["height"],
            width=config["width"],
            fps=config["fps"],
            pad_short=config["pad_short"],
            dtype=config["dtype"],
            latent_dtype=config.get("latent_dtype", "float32"),
            model_fingerprint=model.get("fingerprint"),
            components=model.get("components", {}),
            vae_tiling=bool(config.get("vae_tiling", False)),
            motion_masks=config.get("motion_masks"),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncodeFacts:
        """From `to_dict`'s form (index_info.json "encode"); missing optional keys take their
        defaults, unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- stage configs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageRecord:
    """STAGE/config.json of any stage (`ShardStore.prepare`): the stage's fingerprint, the config it
    was computed over (kept verbatim, unknown keys included), and when / by which version it was made.
    Unknown top-level keys are kept in `extra` and written back."""

    fingerprint: str | None
    config: dict[str, Any]
    tool_version: str = ""
    created_at: str | None = None
    schema_version: int = STAGE_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN: ClassVar[frozenset[str]] = frozenset(
        {"fingerprint", "config", "tool_version", "created_at", "schema_version"}
    )

    @classmethod
    def _fields_from(cls, d: dict[str, Any]) -> dict[str, Any]:
        return {
            "fingerprint": d.get("fingerprint"),
            "config": d.get("config", {}),
            "tool_version": d.get("tool_version", ""),
            "created_at": d.get("created_at"),
            "schema_version": d.get("schema_version", STAGE_SCHEMA_VERSION),
            "extra": {k: v for k, v in d.items() if k not in cls._KNOWN},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        return cls(**cls._fields_from(d))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "fingerprint": self.fingerprint,
            "config": self.config,
            "tool_version": self.tool_version,
            "created_at": self.created_at,
        } | self.extra
        return _versioned(d, self.schema_version, STAGE_SCHEMA_VERSION)


@dataclass(frozen=True)
class LatentsRecord(StageRecord):
    """RUN/latents/config.json, written by `encode`: `encode` and `model` are typed views of `config`
    (see `EncodeFacts.from_latents_config` for the keys an older run may lack)."""

    encode: EncodeFacts | None = None
    model: ModelRecord | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentsRecord:
        base = cls._fields_from(d)
        config = base["config"]
        return cls(
            **base,
            encode=EncodeFacts.from_latents_config(config),
            model=ModelRecord.from_dict(config.get("model", {})),
        )

    def to_dict(self) -> dict[str, Any]:  # the views are not stored: `config` holds them
        return StageRecord.to_dict(self)


@dataclass(frozen=True)
class FeaturesRecord(StageRecord):
    """RUN/features/config.json, written by `featurize` (`_features_identity`): typed views of `config`.

    latents: fingerprint of the latents they were computed from; transformers: one weight fingerprint
    per checkpoint; draws: `DrawRule.to_dict()`; output_fn; timestep: the σ → t convention; projector:
    the projector spec without its rng (`Projector.spec()`), `dim` = the block dim per checkpoint;
    dtype: the feature compute dtype; objective: `objective_spec` (absent from the file when uniform,
    so runs from before --objective keep their fingerprint).
    """

    latents: str | None = None
    transformers: list[str] = field(default_factory=list)
    draws: dict[str, Any] = field(default_factory=dict)
    output_fn: str = "loss"
    timestep: str = ""
    projector: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    objective: dict[str, Any] = field(default_factory=lambda: dict(_UNIFORM))
    lora: dict[str, Any] | None = (
        None  # the adapter's identity (`pipeline.featurize.lora_record`), None: none
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeaturesRecord:
        base = cls._fields_from(d)
        c = base["config"]
        return cls(
            **base,
            latents=c.get("latents"),
            transformers=list(c.get("transformers", [])),
            draws=c.get("draws", {}),
            output_fn=c.get("output_fn", "loss"),
            timestep=c.get("timestep", ""),
            projector=c.get("projector", {}),
            dtype=c.get("dtype", "float32"),
            objective=c.get("objective", dict(_UNIFORM)),
            lora=c.get("lora"),
        )

    def to_dict(self) -> dict[str, Any]:
        return StageRecord.to_dict(self)

    def blocks(self, provenance: dict[str, Any]) -> list[int]:
        """Feature dims per checkpoint: the shards' recorded blocks, else the projector dim for each."""
        return provenance.get("blocks") or [int(self.projector["dim"])] * len(self.transformers)


# -- index ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexInfo:
    """Everything `score` needs to treat a query exactly like the training clips, recorded once when
    the index is built (RUN/index/index_info.json).

    draws: `DrawRule.to_dict()`; projector: the projector spec (`Projector.spec()`); preconditioner:
    `Preconditioner.to_dict()`; blocks: feature dims per checkpoint (sum = dim). Unknown keys of a
    file are ignored (the document is rewritten whole by each build); a file of another
    schema_version is refused.
    """

    fingerprint: str  # of the features the index was built from
    latents_fingerprint: str
    count: int
    dim: int
    blocks: list[int]
    factory: str
    preconditioner: dict[str, Any]
    lambda_rel: float
    draws: dict[str, Any]
    output_fn: str
    timestep: str
    projector: dict[str, Any]
    feature_dtype: str
    transformers: list[str]  # fingerprints, one per checkpoint
    checkpoints: list[str]  # labels
    checkpoint_paths: list[str | None]  # absolute; None = MODEL's own transformer
    model_source: str | None
    encode: EncodeFacts
    nprobe: int | None = None  # IVF lists probed per query (None: attrib.index.default_nprobe)
    live_digest: str = ""  # `LiveLatents.digest()` of the clips indexed: another live set makes it stale
    rerank_vectors: str | None = None  # dtype of index/vectors.bin (approximate indexes), None: none
    objective: dict[str, Any] = field(default_factory=lambda: dict(_UNIFORM))  # `objective_spec`
    # the LoRA adapter the features were taken through (`models.lora.lora_identity` with rank, alpha,
    # targets and its absolute path), None: the full transformer's layers
    lora: dict[str, Any] | None = None
    files: dict[str, Any] = field(default_factory=dict)  # `store.digests.digest_tree` of RUN/index
    # `search.sketch.Sketch.record()` of --index-dim (kind, dim, out_dim, seed, check); None: no sketch
    sketch: dict[str, Any] | None = None
    # --index-shards: the FAISS files the index is kept as (1: index.faiss; S: shards/NNNNN.faiss)
    shards: int = 1
    # how it was built: {"executor": "local" | "ray", "parts": the parts filled and merged (1: one pass)}
    build: dict[str, Any] = field(default_factory=lambda: {"executor": "local", "parts": 1})
    created_at: str = ""
    tool_version: str = ""
    schema_version: int = INDEX_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_records(
        cls,
        lat: LatentsRecord,
        feats: FeaturesRecord,
        provenance: dict[str, Any],
        choices: dict[str, Any],
        count: int,
        live_digest: str,
        created_at: str,
        tool_version: str,
    ) -> IndexInfo:
        """The record of an index built from `feats` (over `lat`): provenance is the feature shards'
        metadata (blocks, checkpoints, checkpoint_paths); choices the index's own fields (factory,
        preconditioner, lambda_rel, nprobe, rerank_vectors)."""
        blocks = feats.blocks(provenance)
        return cls(
            fingerprint=feats.fingerprint,  # type: ignore[arg-type]
            latents_fingerprint=lat.fingerprint,  # type: ignore[arg-type]
            count=count,
            dim=int(sum(blocks)),
            blocks=blocks,
            draws=feats.draws,
            output_fn=feats.output_fn,
            objective=feats.objective,
            timestep=feats.timestep,
            projector=feats.projector,
            feature_dtype=feats.dtype,
            transformers=feats.transformers,
            checkpoints=provenance.get("checkpoints") or [],
            checkpoint_paths=provenance.get("checkpoint_paths") or [None] * len(feats.transformers),
            lora=provenance.get("lora") if feats.lora is not None else None,
            model_source=lat.model.source if lat.model is not None else None,
            encode=lat.encode,  # type: ignore[arg-type]
            live_digest=live_digest,
            created_at=created_at,
            tool_version=tool_version,
            **choices,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        return cls(**(kept | {"encode": EncodeFacts.from_dict(d["encode"])}))

    def write(self, path: Path) -> None:
        """The document with its own checksum ("digest", `store.digests.doc_digest`)."""
        d = self.to_dict()
        write_json_atomic(path, d | {"digest": doc_digest(d)})

    def rebuild_command(self, run: Path | str) -> str:
        """The `carv-attrib index` line that rebuilds this index with its own choices."""
        args = [f"carv-attrib index {run}", f"--precondition {self.preconditioner.get('kind', 'identity')}"]
        if self.factory and self.factory != "Flat":
            args.append(f"--index-factory {self.factory}")
            args.append(f"--vector-dtype {self.rerank_vectors or 'none'}")
            if self.nprobe is not None:
                args.append(f"--nprobe {self.nprobe}")
        if self.preconditioner.get("kind") == "trak":
            args.append(f"--lambda {self.lambda_rel}")
        if self.sketch:
            args.append(f"--index-dim {self.sketch['out_dim']}")
            if self.sketch.get("kind", "srht") != "srht":
                args.append(f"--sketch {self.sketch['kind']}")
            if self.sketch.get("seed", 0):
                args.append(f"--sketch-seed {self.sketch['seed']}")
        if self.shards > 1:
            args.append(f"--index-shards {self.shards}")
        return " ".join(args)

    @classmethod
    def read(cls, path: Path) -> IndexInfo:
        """index_info.json; DamagedFileError (exit 2) when its content no longer matches its own
        digest (edited by hand), ConfigMismatchError for another schema version."""
        try:
            d = read_json(path)
        except ValueError as exc:  # json.JSONDecodeError: truncated or garbled
            raise DamagedFileError(
                f"{path} is damaged (not JSON: {exc}); rebuild the index: `carv-attrib index {path.parent.parent}` "
                "with the options it was built with"
            ) from exc
        if "digest" in d and d["digest"] != doc_digest(d):
            try:
                how = cls.from_dict(d).rebuild_command(path.parent.parent)
            except (KeyError, TypeError, AttributeError, ValueError):  # edited past reading
                how = f"carv-attrib index {path.parent.parent} ..."
            raise DamagedFileError(
                f"{path} was changed after the index was built (its content no longer matches its "
                f"digest: edited by hand?); rebuild the index: `{how}`"
            )
        if d.get("schema_version") not in READABLE_INDEX_SCHEMAS:
            raise ConfigMismatchError(
                f"{path} was written by carv-attrib {d.get('tool_version', '?')} (index schema "
                f"{d.get('schema_version')}, this version reads {' and '.join(map(str, READABLE_INDEX_SCHEMAS))}); rebuild it with "
                f"`carv-attrib index {path.parent.parent}`"
            )
        return cls.from_dict(d)


# -- plan ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanDoc:
    """plan.json, written by `carv-attrib plan` (`pipeline.plan.run_plan`) and read by `featurize
    --plan`. Only the fields read elsewhere are typed: proposal (`Proposal.to_dict()`; None when the
    file is not a plan), the output_fn and objective it was fitted for (absent from plans made before
    those options: "loss", "uniform"), density (p(σ) spec) and schema (the file's own version key,
    "carv-attrib/plan-1"). Every other key (pilot, bins, costs, schemes, recommended, ...) is kept in
    `rest` and written back as it was."""

    proposal: dict[str, Any] | None
    output_fn: str = "loss"
    objective: str = "uniform"
    density: str | None = None
    schema: str = PLAN_SCHEMA
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED: ClassVar[tuple[str, ...]] = ("proposal", "output_fn", "objective", "density", "schema")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanDoc:
        return cls(
            proposal=d.get("proposal"),
            output_fn=d.get("output_fn", "loss"),
            objective=d.get("objective", "uniform"),
            density=d.get("density"),
            schema=d.get("schema", PLAN_SCHEMA),
            rest={k: v for k, v in d.items() if k not in cls._TYPED},
        )

    def to_dict(self) -> dict[str, Any]:
        """The document as `run_plan` writes it (plan.json is written with sorted keys, so the order
        here does not reach the file); an absent proposal or density stays absent."""
        typed: dict[str, Any] = {
            "schema": self.schema,
            "output_fn": self.output_fn,
            "objective": self.objective,
        }
        typed |= {"proposal": self.proposal} if self.proposal is not None else {}
        typed |= {"density": self.density} if self.density is not None else {}
        return self.rest | typed

    @classmethod
    def read(cls, path: Path) -> PlanDoc:
        return cls.from_dict(read_json(path))


# -- what status shows ------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexSummary:
    """What `carv-attrib status` shows of RUN/index/index_info.json, read from a file of any schema
    version (an old index is shown, and marked stale, rather than refused): every key may be absent.
    `document` is the file as stored, which status hands back whole."""

    fingerprint: str | None
    count: int | None
    dim: int | None
    preconditioner_kind: str | None
    document: dict[str, Any]
    lora: dict[str, Any] | None = None  # IndexInfo.lora: the adapter the features went through

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexSummary:
        return cls(
            fingerprint=d.get("fingerprint"),
            count=d.get("count"),
            dim=d.get("dim"),
            preconditioner_kind=(d.get("preconditioner") or {}).get("kind"),
            document=d,
            lora=d.get("lora") if isinstance(d.get("lora"), dict) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.document

    @classmethod
    def read(cls, path: Path) -> IndexSummary:
        return cls.from_dict(read_json(path))


@dataclass(frozen=True)
class RunLog:
    """RUN/run.json: every invocation (argv, versions, device, times), appended by
    `carv_attrib.store.shards.record_invocation`. Each entry is kept as stored; `command` names the verb.
    Unknown top-level keys are ignored."""

    invocations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_command(self) -> str | None:
        return self.invocations[-1].get("command") if self.invocations else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunLog:
        return cls(invocations=list(d.get("invocations", [])))

    def to_dict(self) -> dict[str, Any]:
        return {"invocations": self.invocations}

    @classmethod
    def read(cls, path: Path) -> RunLog:
        return cls.from_dict(read_json(path))
