"""A run directory: every path of a run, its stage stores, and the typed index record.

RUN/
  run.json                      every invocation (argv, versions, device, times)
  manifest/clips.parquet        the committed manifest with source keys (`carv_attrib.data.sources`)
  latents/                      encode's ShardStore (`carv_attrib.data.latents`)
  features/                     featurize's ShardStore (`carv_attrib.data.features`)
  index/index.faiss             FAISS index (`carv_attrib.attrib.index`)
  index/preconditioner/         preconditioner state (`carv_attrib.attrib.precondition`)
  index/index_info.json         `IndexInfo`: what `score` needs to treat a query like a training clip

run = RunDir("runs/demo")
run.live_latents(); run.index_info()      # the current clips (`data.live`); IndexInfo, refused when stale
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from carv_attrib.data.live import LiveFeatures, LiveLatents, live_features, live_latents
from carv_attrib.data.store import ShardStore, read_json, write_json_atomic
from carv_attrib.data.video import FramePolicy
from carv_attrib.errors import ConfigMismatchError, UsageError

INDEX_SCHEMA_VERSION = 3  # 3: live_digest replaces feature_shards (content-addressed runs)


class RunDir:
    """The paths and stage stores of one run directory. Creating it touches nothing on disk."""

    def __init__(self, root: Path | str | RunDir):
        self.root = Path(root.root if isinstance(root, RunDir) else root)
        self.latents = ShardStore(self.root, "latents")
        self.features = ShardStore(self.root, "features")

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __str__(self) -> str:
        return str(self.root)

    # -- paths ------------------------------------------------------------------------------------
    @property
    def manifest_table(self) -> Path:
        return self.root / "manifest" / "clips.parquet"

    @property
    def run_log(self) -> Path:
        return self.root / "run.json"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def faiss_path(self) -> Path:
        return self.index_dir / "index.faiss"

    @property
    def preconditioner_dir(self) -> Path:
        return self.index_dir / "preconditioner"

    @property
    def index_info_path(self) -> Path:
        return self.index_dir / "index_info.json"

    # -- checks -----------------------------------------------------------------------------------
    def require_latents(self) -> dict[str, Any]:
        """latents/config.json, or a UsageError saying to run encode first."""
        cfg = self.latents.read_config()
        if cfg is None or not self.latents.done_shards():
            raise UsageError(
                f"{self.root} has no latent cache; run `carv-attrib encode ... --run {self.root}` first"
            )
        if not self.manifest_table.exists():
            raise UsageError(
                f"{self.root} holds encoded parts but no committed manifest; run the same `carv-attrib "
                "encode` once without --shard to commit them (it encodes only what a part missed)"
            )
        return cfg

    def require_features(self) -> dict[str, Any]:
        cfg = self.features.read_config()
        if cfg is None:
            raise UsageError(
                f"{self.root} has no features; run `carv-attrib featurize {self.root} ...` first"
            )
        return cfg

    def live_latents(self) -> LiveLatents:
        """The current latent row of each committed manifest clip (`carv_attrib.data.live`)."""
        return live_latents(self.manifest_table, self.latents)

    def live_features(self, live: LiveLatents | None = None) -> LiveFeatures:
        """Which live ok latents have features, and where (`carv_attrib.data.live`)."""
        return live_features(live or self.live_latents(), self.features)

    def clips(self) -> dict[int, dict[str, str]]:
        """clip_id → {vid, caption, path} from the normalised manifest."""

        rows = pq.read_table(self.manifest_table).to_pylist()
        return {r["clip_id"]: {"vid": r["vid"], "caption": r["caption"], "path": r["path"]} for r in rows}

    # -- index ------------------------------------------------------------------------------------
    @contextmanager
    def index_swap(self) -> Iterator[Path]:
        """A fresh temporary index directory, swapped in for RUN/index when the block succeeds: a
        crash mid-build leaves the previous index intact."""
        self._recover_index()
        tmp = self.root / ".index.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        old = self.root / ".index.old"
        if self.index_dir.exists():
            self.index_dir.rename(old)
        tmp.rename(self.index_dir)
        if old.exists():
            shutil.rmtree(old)

    def _recover_index(self) -> None:
        """Finish a swap that a kill interrupted: RUN/index missing but .index.old present means the
        kill came between the two renames, so the previous index is restored; a .index.old beside a
        live RUN/index is the previous one's leftover."""
        old = self.root / ".index.old"
        if old.exists() and not self.index_dir.exists():
            old.rename(self.index_dir)
        elif old.exists():
            shutil.rmtree(old)

    def index_info(self, check_fresh: bool = True) -> IndexInfo:
        """RUN/index/index_info.json; with check_fresh, refused (exit 2) when the run's latents or
        features changed after the index was built."""
        self._recover_index()
        if not self.index_info_path.exists():
            raise UsageError(
                f"{self.root} has no index; run `carv-attrib featurize` (or `carv-attrib index`) first"
            )
        info = IndexInfo.read(self.index_info_path)
        if check_fresh:
            for stage, built_from in (("latents", info.latents_fingerprint), ("features", info.fingerprint)):
                now = (ShardStore(self.root, stage).read_config() or {}).get("fingerprint")
                if now != built_from:
                    raise ConfigMismatchError(
                        f"{self.root}/index is stale: it was built from {stage} {built_from}, but "
                        f"{self.root}/{stage} now holds {now}; rerun `carv-attrib featurize {self.root} ...` "
                        f"(or `carv-attrib index {self.root}`)"
                    )
            now_live = self.live_latents().digest()
            if info.live_digest != now_live:
                raise ConfigMismatchError(
                    f"{self.root}/index is stale: it was built from another set of clips (live set "
                    f"{info.live_digest}, now {now_live}: clips were added, removed, changed or "
                    f"re-encoded since); rerun `carv-attrib featurize {self.root} ...` (or "
                    f"`carv-attrib index {self.root}` when features are complete)"
                )
        return info


@dataclass
class EncodeFacts:
    """How the run's clips were turned into latents: a query must be encoded the same way."""

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
        return cls(
            frames=config["frames"],
            height=config["height"],
            width=config["width"],
            fps=config["fps"],
            pad_short=config["pad_short"],
            dtype=config["dtype"],
            latent_dtype=config.get("latent_dtype", "float32"),
            model_fingerprint=config["model"].get("fingerprint"),
            components=config["model"]["components"],
            vae_tiling=bool(config.get("vae_tiling", False)),
            motion_masks=config.get("motion_masks"),
        )


@dataclass
class IndexInfo:
    """Everything `score` needs to treat a query exactly like the training clips, recorded once when
    the index is built (RUN/index/index_info.json).

    draws: `DrawRule.to_dict()`; projector: the projector spec (`Projector.spec()`); preconditioner:
    `Preconditioner.to_dict()`; blocks: feature dims per checkpoint (sum = dim).
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
    objective: dict[str, Any] = field(default_factory=lambda: {"kind": "uniform"})  # `objective_spec`
    created_at: str = ""
    tool_version: str = ""
    schema_version: int = INDEX_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> IndexInfo:
        d = read_json(path)
        if d.get("schema_version") != INDEX_SCHEMA_VERSION:
            raise ConfigMismatchError(
                f"{path} was written by carv-attrib {d.get('tool_version', '?')} (index schema "
                f"{d.get('schema_version')}, this version reads {INDEX_SCHEMA_VERSION}); rebuild it with "
                f"`carv-attrib index {path.parent.parent}`"
            )
        d["encode"] = EncodeFacts(**d["encode"])
        return cls(**d)
