"""A run directory: every path of a run, its stage stores, and its documents as typed records
(`carv_attrib.store.records`).

RUN/
  run.json                      every invocation (argv, versions, device, times)
  manifest/clips.parquet        the committed manifest with source keys (`carv_attrib.store.sources`)
  latents/                      encode's ShardStore (`carv_attrib.store.latents`)
  features/                     featurize's ShardStore (`carv_attrib.store.features`)
  index/index.faiss             FAISS index (`carv_attrib.search.index`)
  index/preconditioner/         preconditioner state (`carv_attrib.search.precondition`)
  index/index_info.json         `IndexInfo`: what `score` needs to treat a query like a training clip

run = RunDir("runs/demo")
run.live_latents(); run.index_info()      # the current clips (`data.live`); IndexInfo, refused when stale
run.require_latents_record().encode       # LatentsRecord of latents/config.json: how clips were encoded
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.parquet as pq

from carv_attrib.errors import ConfigMismatchError, DamagedFileError, IndexChangedError, UsageError
from carv_attrib.store import lock as _locks
from carv_attrib.store.digests import verify_tree
from carv_attrib.store.live import LiveFeatures, LiveLatents, live_features, live_latents
from carv_attrib.store.records import (  # re-exported: the records lived here before store/records.py
    INDEX_SCHEMA_VERSION,
    EncodeFacts,
    FeaturesRecord,
    IndexInfo,
    LatentsRecord,
    StageRecord,
)
from carv_attrib.store.shards import ShardStore

__all__ = ["INDEX_SCHEMA_VERSION", "EncodeFacts", "IndexInfo", "RunDir"]

T = TypeVar("T")


def _between_renames() -> None:
    """A hook between the swap's two renames (a no-op): tests stop or kill a build exactly there."""


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

    # -- records ----------------------------------------------------------------------------------
    def latents_record(self) -> LatentsRecord | None:
        """latents/config.json as a record, None before the first encode."""
        return self.latents.read_record(LatentsRecord)

    def features_record(self) -> FeaturesRecord | None:
        """features/config.json as a record, None before the first featurize."""
        return self.features.read_record(FeaturesRecord)

    # -- checks -----------------------------------------------------------------------------------
    def require_latents(self) -> dict[str, Any]:
        """latents/config.json as stored (`require_latents_record` for the typed record), or a
        UsageError saying to run encode first."""
        self.require_latents_record()
        return self.latents.read_config()  # type: ignore[return-value]

    def require_latents_record(self) -> LatentsRecord:
        """latents/config.json as a LatentsRecord, or a UsageError saying to run encode first."""
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
        return LatentsRecord.from_dict(cfg)

    def require_features(self) -> dict[str, Any]:
        """features/config.json as stored (`require_features_record` for the typed record)."""
        self.require_features_record()
        return self.features.read_config()  # type: ignore[return-value]

    def require_features_record(self) -> FeaturesRecord:
        """features/config.json as a FeaturesRecord, or a UsageError saying to run featurize first."""
        rec = self.features_record()
        if rec is None:
            raise UsageError(
                f"{self.root} has no features; run `carv-attrib featurize {self.root} ...` first"
            )
        return rec

    def live_latents(self) -> LiveLatents:
        """The current latent row of each committed manifest clip (`carv_attrib.store.live`)."""
        return live_latents(self.manifest_table, self.latents)

    def require_manifest(self) -> None:
        """DamagedFileError (exit 2) when the run has latents but its committed manifest is gone: which
        latent rows are current cannot be known, so nothing is featurized or scored from them."""
        if not self.manifest_table.exists() and self.latents.done_shards():
            raise DamagedFileError(
                f"{self.manifest_table} is missing, so the run cannot tell which of its latents are "
                f"current; rerun `carv-attrib encode MANIFEST -r {self.root} ...` with the manifest and "
                "options it was encoded with: it writes the run's manifest again and encodes no clip "
                "that is already encoded"
            )

    def live_features(self, live: LiveLatents | None = None) -> LiveFeatures:
        """Which live ok latents have features, and where (`carv_attrib.store.live`)."""
        return live_features(live or self.live_latents(), self.features)

    def clips(self) -> dict[int, dict[str, str]]:
        """clip_id → {vid, caption, path} from the normalised manifest."""

        rows = pq.read_table(self.manifest_table).to_pylist()
        return {r["clip_id"]: {"vid": r["vid"], "caption": r["caption"], "path": r["path"]} for r in rows}

    # -- index ------------------------------------------------------------------------------------
    @property
    def index_old(self) -> Path:
        """Where the swap parks the previous index between its two renames."""
        return self.root / ".index.old"

    def index_tmps(self) -> list[Path]:
        """Temporary index directories of builds (`.index.tmp-PID-RANDOM`, and the fixed `.index.tmp`
        of older versions)."""
        return sorted(self.root.glob(".index.tmp*")) if self.root.is_dir() else []

    @contextmanager
    def index_swap(self) -> Iterator[Path]:
        """A fresh temporary index directory, swapped in for RUN/index when the block succeeds.

        The caller holds the run's writer lock (`store.lock.run_lock`), so the leftovers found here
        are a dead writer's: an interrupted swap is finished first (`recover_index`), every other
        build's temporary directory removed. The name is unique per build all the same
        (`.index.tmp-PID-RANDOM`): a writer that ignored the lock still never shares one. A block
        that raises removes its directory; a kill leaves it to the next writer. Every point of the
        swap is recoverable: before the first rename the old index is live; between the two, RUN/index
        is missing and `.index.old` is restored by the next reader or writer; after the second, the new
        index is live and `.index.old` a leftover.
        """
        self.recover_index()
        for stale in self.index_tmps():
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".index.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            if self.index_dir.exists():
                self.index_dir.rename(self.index_old)
            _between_renames()
            tmp.rename(self.index_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            self.recover_index()
            raise
        shutil.rmtree(self.index_old, ignore_errors=True)

    def recover_index(self) -> str | None:
        """Finish a swap that a kill interrupted, and say what was done (None: nothing to do).

        RUN/index missing with `.index.old` present means the kill came between the two renames: the
        previous index is restored. A `.index.old` beside a live RUN/index is the previous one's
        leftover, removed. Only while no other process holds the writer lock: a live writer's swap
        is not interrupted, and restoring its old index under it would break its second rename.
        The temporary directories of dead builds are left to the next writer (`index_swap`).
        """
        if not self.index_old.exists() or _locks.is_written(self.root):
            return None
        try:
            if not self.index_dir.exists():
                self.index_old.rename(self.index_dir)
                return "index swap interrupted: restored the previous index"
            shutil.rmtree(self.index_old)
        except OSError:  # a read-only run, or another reader repaired it first
            return None
        return None

    def index_swapping(self) -> bool:
        """Whether a live writer is between the two renames of its swap right now."""
        return self.index_old.exists() and not self.index_dir.exists() and _locks.is_written(self.root)

    def index_snapshot(
        self, load: Callable[[Path], T], check_fresh: bool = True, settle_s: float = 10.0
    ) -> tuple[IndexInfo, T]:
        """index_info.json and what `load(RUN/index)` reads from the index directory (preconditioner,
        FAISS index, vectors) as one consistent snapshot.

        A writer may swap in a new index while a reader is loading: index_info.json is read before
        and after `load`, and the snapshot is returned only when the two are the same bytes (the
        file names the features' fingerprint, the choices and the build time, so an equal file is
        the same build). A change is retried once; a second change raises IndexChangedError. A
        reader arriving between the swap's two renames waits (up to settle_s) for the new index.
        Raises UsageError / ConfigMismatchError as `index_info`, IndexChangedError (all exit 2).
        """
        for _ in range(2):
            deadline = time.monotonic() + settle_s
            while self.index_swapping() and time.monotonic() < deadline:
                time.sleep(0.01)  # the window is two renames: it closes at once
            before: bytes | None = None
            repair = ""
            try:
                before = self.index_info_path.read_bytes()
                info = self.index_info(check_fresh)
                repair = f"rebuild the index from the run's features (no gradients): `{info.rebuild_command(self.root)}`"
                verify_tree(self.index_dir, info.files, repair)  # before FAISS or numpy reads a byte
                loaded = load(self.index_dir)
                after = self.index_info_path.read_bytes()
            except FileNotFoundError as exc:  # swapped out under us: the next try reads the new one
                if before is None and not _locks.is_written(self.root):
                    self.index_info(check_fresh)  # no index at all: its own message
                if repair and not _locks.is_written(self.root) and self._same_info(before):
                    # no writer and the same build: a file of the index is gone (an index built
                    # before checksums; a recorded one is found by verify_tree)
                    raise DamagedFileError(f"{exc.filename or self.index_dir} is missing; {repair}") from exc
                continue
            if before == after:
                return info, loaded
        raise IndexChangedError(
            f"{self.root}/index was rebuilt while this command was reading it (a `featurize` or "
            f"`index` is writing {self.root}: "
            f"{(_locks.holder(self.root) if _locks.is_written(self.root) else '') or 'another command'}); rerun "
            "it when that one is done"
        )

    def _same_info(self, before: bytes | None) -> bool:
        try:
            return before is not None and self.index_info_path.read_bytes() == before
        except FileNotFoundError:
            return False

    def index_info(self, check_fresh: bool = True) -> IndexInfo:
        """RUN/index/index_info.json; with check_fresh, refused (exit 2) when the run's latents or
        features changed after the index was built."""
        self.recover_index()
        if check_fresh:
            self.require_manifest()
        if not self.index_info_path.exists():
            raise UsageError(
                f"{self.root} has no index; run `carv-attrib featurize` (or `carv-attrib index`) first"
            )
        info = IndexInfo.read(self.index_info_path)
        if check_fresh:
            for stage, built_from in (("latents", info.latents_fingerprint), ("features", info.fingerprint)):
                rec = ShardStore(self.root, stage).read_record(StageRecord)
                now = rec.fingerprint if rec is not None else None
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
