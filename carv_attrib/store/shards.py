"""Sharded Parquet storage with atomic writes, done markers and config fingerprints.

Layout of one stage (latents/, features/):

    STAGE/config.json              resolved stage config + its fingerprint (written first)
    STAGE/part-00000.parquet       one row per clip; schema metadata key b"carv_attrib" = provenance
    STAGE/_done/part-00000.json    shard stats, written LAST: a shard without it is not done

Every file is written to a temporary name in the same directory and renamed, so a crash never
leaves a file that reads as complete. Stages append shards (`next_shard`); which rows are current is
decided by `carv_attrib.store.live`. A rerun keeps done shards and redoes an interrupted one; a rerun
with a different config is refused (ConfigMismatchError, exit 2) unless overwrite=True, and `check`
says so before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from carv_attrib import __version__
from carv_attrib.atomic import _HOST, atomic_path  # noqa: F401  (atomic_path: re-exported for the stages)
from carv_attrib.errors import ConfigMismatchError, DamagedFileError, UsageError

METADATA_KEY = b"carv_attrib"


class _Record(Protocol):
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any: ...


R = TypeVar("R", bound=_Record)


# Keys that record where something came from, not what it is: kept in config.json, left out of the
# fingerprint, so naming a model directory by another path (or moving it) does not invalidate a run;
# the weight hashes next to them are what identify the model.
PROVENANCE_KEYS = frozenset({"source"})


# Top-level keys of a stage config that set a policy for rows still to be written and change no row
# already written: encode's pad_short only turns what would be a too_short failure into a padded clip
# (`carv_attrib.video.shortness`). Left out of the fingerprint, so a rerun that changes one resumes the
# stage; `prepare` stores the new value and records the change under "policy_changes".
POLICY_KEYS = frozenset({"pad_short"})


def _identity(config: dict[str, Any]) -> Any:
    """The part of a config that identifies its numbers: provenance and policy keys left out."""
    return _without_provenance({k: v for k, v in config.items() if k not in POLICY_KEYS})


def _without_provenance(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _without_provenance(v) for k, v in x.items() if k not in PROVENANCE_KEYS}
    if isinstance(x, list):
        return [_without_provenance(v) for v in x]
    if isinstance(x, float) and x.is_integer():
        # 8 and 8.0 are one value: `--fps 8` (a float from the CLI) and fps=8 (an int from the
        # library) must not be two configurations (the comparison shown to the user says "equal")
        return int(x)
    return x


def fingerprint(config: dict[str, Any]) -> str:
    """sha256 (16 hex) of the canonical JSON of a config, provenance and policy keys left out: what
    changes the numbers."""
    canonical = json.dumps(_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _is_stale_tmp(path: Path) -> bool:
    """A temporary file of a writer that is gone: written on this host by a pid that no longer runs.
    Another host's (a part on a shared file system) or a live writer's is left alone."""
    parts = path.name.rsplit(".", 3)  # .NAME.HOST.PID.tmp
    if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False  # the writer still runs


def write_json_atomic(path: Path, data: Any, sort_keys: bool = True) -> None:
    """Write JSON atomically; sort_keys=False keeps a document's own field order (user-facing output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n"
    with atomic_path(path, need=len(text.encode())) as tmp:
        tmp.write_text(text)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _short(v: Any, width: int = 60) -> str:
    """A config value for a one-line message: long lists and dicts by their size (a projector's
    per-layer list would be kilobytes), other long values cut."""
    text = repr(v)
    if len(text) <= width:
        return text
    if isinstance(v, list):
        return f"[{len(v)} items]"
    if isinstance(v, dict):
        return f"{{{len(v)} keys}}"
    return text[: width - 1] + "…"


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like configs (long values abridged: `_short`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{name}: (absent) -> {_short(new[key])}")
            elif key not in new:
                out.append(f"{name}: {_short(old[key])} -> (absent)")
            else:
                out.extend(_diff(old[key], new[key], name))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) != len(new) and old != new:
        return [f"{prefix}: {len(old)} items -> {len(new)} items"]
    return [] if old == new else [f"{prefix}: {_short(old)} -> {_short(new)}"]


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two configs as stored (JSON types), provenance and policy keys left out."""

    def as_json(c: dict[str, Any]) -> Any:  # tuples -> lists, Paths -> str: compare what is stored
        return _identity(json.loads(json.dumps(c, default=str)))

    return _diff(as_json(old), as_json(new))


# How each stage's damaged shard is repaired: its done marker removed, the stage's command redoes
# that shard's clips and keeps the others.
_REPAIR = {
    "latents": "`carv-attrib encode -r {run}` (the manifest and options RUN/run.json recorded)",
    "features": "`carv-attrib featurize {run}` (the options RUN/run.json recorded)",
}


def read_parquet(
    path: Path | str,
    columns: list[str] | None = None,
    filters: Any = None,
    repair: str = "",
    filesystem: Any = None,
) -> Any:
    """pq.read_table with each page's CRC verified (shards are written with page checksums; files
    written before have none and read as before); `filesystem`: a `pyarrow.fs.FileSystem` that
    `path` is on (`carv_attrib.store.uri`), default the local one. A missing, truncated or changed file is
    DamagedFileError (exit 2) naming it and `repair`, never a table of wrong numbers."""
    try:
        return pq.read_table(
            path, columns=columns, filters=filters, page_checksum_verification=True, filesystem=filesystem
        )
    except FileNotFoundError as exc:
        raise DamagedFileError(f"{path} is missing; {repair}".rstrip("; ")) from exc
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid: no footer; OSError: a page's CRC
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DamagedFileError(f"{path} is damaged ({why}); {repair}".rstrip("; ")) from exc


def read_parquet_schema(path: Path, repair: str = "") -> Any:
    """pq.read_schema, a damaged footer being DamagedFileError as in `read_parquet`."""
    try:
        return pq.read_schema(path)
    except FileNotFoundError as exc:
        raise DamagedFileError(f"{path} is missing; {repair}".rstrip("; ")) from exc
    except (pa.ArrowException, OSError) as exc:
        raise DamagedFileError(
            f"{path} is damaged ({str(exc).splitlines()[0]}); {repair}".rstrip("; ")
        ) from exc


class ShardStore:
    """One stage directory of a run: config check, shard writes, done markers, reads."""

    def __init__(self, root: Path, stage: str):
        self.root = Path(root)
        self.stage = stage
        self.dir = self.root / stage
        self.done_dir = self.dir / "_done"

    # -- config ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    def read_config(self) -> dict[str, Any] | None:
        """config.json as stored (a dict), None when the stage was never started."""
        return read_json(self.config_path) if self.config_path.exists() else None

    def read_record(self, record: type[R]) -> R | None:
        """config.json as a typed record (`carv_attrib.store.records`: StageRecord, LatentsRecord,
        FeaturesRecord), None when the stage was never started. The record type is passed in because
        records.py builds on this module's JSON helpers."""
        d = self.read_config()
        return None if d is None else record.from_dict(d)

    def check(self, config: dict[str, Any], overwrite: bool = False, what: str = "") -> bool:
        """Whether the stage exists with this config (True: it resumes) or will be created (False);
        writes nothing. Raises ConfigMismatchError when it exists with another config, unless
        overwrite (then it will be discarded)."""
        existing = self.read_config()
        if existing is None or overwrite:
            return False
        # Recompute the stored config's fingerprint under today's rule (provenance keys left out), so a
        # stage created with another model path, or before that rule, still resumes.
        if fingerprint(existing.get("config", {})) != fingerprint(config):
            diffs = config_differences(existing.get("config", {}), config)
            shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise ConfigMismatchError(
                f"{self.dir} was made with another {what or self.stage} configuration "
                f"({shown or 'fingerprint differs'}); rerun with the same options to use it, "
                "or pass --overwrite to discard it"
            )
        return True

    def prepare(self, config: dict[str, Any], overwrite: bool = False, what: str = "") -> str:
        """Create the stage or check that it was made with the same config; returns the fingerprint.

        With overwrite=True the existing stage is deleted first. Call `check` before any other write
        so that a refused invocation changes nothing.
        """
        if not self.check(config, overwrite, what) and self.dir.exists():
            shutil.rmtree(self.dir)
        for stale in list(self.dir.glob(".*.tmp")) + list(self.done_dir.glob(".*.tmp")):
            if _is_stale_tmp(stale):  # left by a killed writer; never read as data
                stale.unlink(missing_ok=True)
        existing = self.read_config()
        if existing is None:
            fp = fingerprint(config)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                self.config_path,
                {"fingerprint": fp, "config": config, "tool_version": __version__, "created_at": now_iso()},
            )
            return fp
        # The same configuration: the stage keeps the fingerprint (and provenance) it was created with,
        # which its shards and any later stage already refer to; a changed policy key is recorded.
        self._record_policy(existing, config)
        return existing["fingerprint"]

    def _record_policy(self, existing: dict[str, Any], config: dict[str, Any]) -> None:
        """Store the new value of each `POLICY_KEYS` key that `config` changes, and append the change
        to config.json's "policy_changes": {key, from, to, first_shard (the shards from there on are
        written under it), at, tool_version}."""
        old = existing.get("config", {})
        changed = [k for k in sorted(POLICY_KEYS) if k in config and old.get(k) != config[k]]
        if not changed:
            return
        first = self.next_shard()
        changes = list(existing.get("policy_changes", []))
        for k in changed:
            changes.append(
                {"key": k, "from": old.get(k), "to": config[k], "first_shard": first}
                | {"at": now_iso(), "tool_version": __version__}
            )
        doc = existing | {"config": old | {k: config[k] for k in changed}, "policy_changes": changes}
        write_json_atomic(self.config_path, doc)

    # -- shards ---------------------------------------------------------------------------------
    def shard_path(self, index: int) -> Path:
        return self.dir / f"part-{index:05d}.parquet"

    def done_path(self, index: int) -> Path:
        return self.done_dir / f"part-{index:05d}.json"

    def repair(self, index: int) -> str:
        """What repairs shard `index` when it is damaged: remove it with its marker, rerun the stage."""
        how = _REPAIR.get(self.stage, f"the {self.stage} stage").format(run=self.root)
        return (
            f"remove it and {self.done_path(index)}, then rerun {how}: it redoes that shard's clips "
            "and keeps the others"
        )

    def read_shard(self, index: int, columns: list[str] | None = None, filters: Any = None) -> Any:
        """Shard `index` as an Arrow table, its page CRCs checked (DamagedFileError with the repair)."""
        return read_parquet(self.shard_path(index), columns, filters, self.repair(index))

    def read_shard_schema(self, index: int) -> Any:
        return read_parquet_schema(self.shard_path(index), self.repair(index))

    def is_done(self, index: int) -> bool:
        return self.done_path(index).exists() and self.shard_path(index).exists()

    def next_shard(self) -> int:
        """The index a new shard gets: after every done one (a shard file without its done marker, left
        by a kill, is overwritten)."""
        done = self.done_shards()
        return done[-1] + 1 if done else 0

    def part_shards(self, count: int, part: tuple[int, int] | None = None) -> list[int]:
        """`count` new shard indices for part (I, N) of a run (`--shard`, `--executor ray`): after every
        done shard and equal to I mod N, so parts writing at the same time never pick the same name.
        part None: consecutive, as (0, 1)."""
        i, n = part or (0, 1)
        start = self.next_shard()
        first = start + (i - start) % n
        return [first + k * n for k in range(count)]

    def done_shards(self) -> list[int]:
        if not self.done_dir.exists():
            return []
        return sorted(
            int(p.stem.split("-")[1])
            for p in self.done_dir.glob("part-*.json")
            if self.is_done(int(p.stem.split("-")[1]))
        )

    def write_shard(self, index: int, table: Any, stats: dict[str, Any], provenance: dict[str, Any]) -> None:
        """Write the Parquet shard (atomically), then its done marker (atomically), in that order."""

        meta = dict(table.schema.metadata or {})
        meta[METADATA_KEY] = json.dumps(provenance, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(meta)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.shard_path(index), need=table.nbytes) as tmp:  # nbytes: before compression
            pq.write_table(table, tmp, write_page_checksum=True)  # CRC32 per page, checked on read
        write_json_atomic(self.done_path(index), stats)

    def read_stats(self) -> list[dict[str, Any]]:
        return [read_json(self.done_path(i)) for i in self.done_shards()]

    def seconds_per_clip(self) -> tuple[float, int] | None:
        """(wall seconds per clip, clips timed) over the finished shards' stats; None without timings."""
        stats = self.read_stats()
        clips = sum(int(s.get("clips", 0)) for s in stats)
        wall = sum(float(s.get("wall_s", 0.0)) for s in stats)
        return (wall / clips, clips) if clips and wall > 0 else None

    def read_table(self, columns: list[str] | None = None, filters: Any = None) -> Any:
        """All done shards as one Arrow table (shards without a done marker are ignored)."""

        tables = [self.read_shard(i, columns, filters) for i in self.done_shards()]
        if not tables:
            raise UsageError(f"{self.dir} holds no finished shards; run the {self.stage} stage first")
        return pa.concat_tables(tables, promote_options="default")  # shards from before a new column

    def iter_tables(
        self, columns: list[str] | None = None, filters: Any = None, shards: list[int] | None = None
    ) -> Iterator[Any]:
        """Done shards as tables (or the given ones: a snapshot for several passes over a live stage)."""

        for i in self.done_shards() if shards is None else shards:
            yield self.read_shard(i, columns, filters)

    def read_provenance(self) -> dict[str, Any] | None:
        done = self.done_shards()
        if not done:
            return None
        meta = self.read_shard_schema(done[0]).metadata or {}
        return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record_invocation(run: Path, entry: dict[str, Any]) -> None:
    """Append one invocation (argv, versions, device, times) to RUN/run.json.

    A read-modify-write: readers (score, plan) record beside a writer, so it runs under its own short
    flock on RUN/.run.json.lock (not the writer lock RUN/.lock, which a writer holds for its whole
    command); without it two appends at once keep only one of the two entries."""
    import fcntl

    path = Path(run) / "run.json"
    fd = os.open(Path(run) / ".run.json.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = read_json(path) if path.exists() else {"invocations": []}
        data["invocations"].append(entry)
        write_json_atomic(path, data)
    finally:
        os.close(fd)
