"""Read a training manifest in any supported format into one normalised clip table.

Formats (chosen by extension, or `fmt=`):
- VidGen-1M JSON: a JSON list of {"vid", "caption"}; the video is VIDEOS/<vid>.mp4.
- JSONL (.jsonl, .ndjson), CSV (.csv), Parquet (.parquet): one row per clip with an id column,
  a caption column and optionally a path column (relative to VIDEOS, or absolute when allowed).
  Without a path column the video is VIDEOS/<id>.mp4.

Text is UTF-8; a leading byte-order mark (U+FEFF, which spreadsheet programs and Windows editors
write) is dropped from JSON, JSONL and CSV files and from column names, as Python's "utf-8-sig"
codec does. Ids are compared, hashed and matched to file names in Unicode normal form NFC (macOS
file systems and some tools store names decomposed, NFD): an id written in NFD and one in NFC are
the same clip, and VIDEOS/<id>.mp4 is found whichever form the file name on disk uses. Paths are
made absolute lexically, not resolved: a folder of symbolic links (the Hugging Face cache layout,
snapshots/<rev>/x.mp4 -> ../../blobs/<sha256>) keeps the link names and may point outside VIDEOS;
`..` components that leave VIDEOS are still refused.

The result has columns clip_id (int64, stable: a hash of the id, so reordering or extending a
manifest keeps every clip's id), vid, caption and path (absolute). Problems are reported all at
once, naming the offending rows, as a UsageError (exit 2).

    table = read_manifest("train.json", videos="videos/")
    write_clip_table(table, run / "manifest" / "clips.parquet")
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carv_attrib.errors import UsageError

FORMATS = ("vidgen", "jsonl", "csv", "parquet")
_MAX_LISTED = 10


@dataclass(frozen=True)
class ManifestOptions:
    id_column: str = "vid"
    caption_column: str = "caption"
    path_column: str | None = None  # None: use "path" when present, else VIDEOS/<id>.mp4
    fmt: str | None = None  # None: from the extension
    allow_absolute_paths: bool = False
    video_ext: str = ".mp4"


@dataclass
class ClipTable:
    clip_id: list[int]
    vid: list[str]
    caption: list[str]
    path: list[str]

    def __len__(self) -> int:
        return len(self.clip_id)

    def to_arrow(self) -> Any:
        import pyarrow as pa

        return pa.table(
            {
                "clip_id": pa.array(self.clip_id, pa.int64()),
                "vid": pa.array(self.vid, pa.string()),
                "caption": pa.array(self.caption, pa.string()),
                "path": pa.array(self.path, pa.string()),
            }
        )

    @classmethod
    def from_arrow(cls, table: Any) -> ClipTable:
        d = table.to_pydict()
        return cls(d["clip_id"], d["vid"], d["caption"], d["path"])

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for row in zip(self.clip_id, self.vid, self.caption, self.path):
            h.update(json.dumps(row).encode())
        return h.hexdigest()[:16]


BOM = "\ufeff"


def nfc(text: str) -> str:
    """Unicode normal form C, the one form ids and file names are compared in."""
    return unicodedata.normalize("NFC", text)


def clip_id_for(vid: str) -> int:
    """Stable non-negative int64 id of a clip: the first 63 bits of sha256(NFC(vid)) (unchanged for
    ids already in NFC, which includes every ASCII id)."""
    return int.from_bytes(hashlib.sha256(nfc(vid).encode()).digest()[:8], "big") >> 1


def read_text_file(path: str | Path, what: str = "file") -> str:
    """The text of a UTF-8 file with a leading byte-order mark dropped (e.g. a --prompts file saved by
    a spreadsheet or Notepad). Raises UsageError naming `what` and the path when the file is missing
    or not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise UsageError(f"{what} {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text: {exc}") from exc


def _strip_bom_keys(rows: list[Any]) -> list[Any]:
    """Drop a BOM glued to the first column name (a BOM'd CSV converted to Parquet/JSON keeps it)."""
    out = []
    for r in rows:
        if isinstance(r, dict) and any(isinstance(k, str) and k.startswith(BOM) for k in r):
            r = {(k.lstrip(BOM) if isinstance(k, str) else k): v for k, v in r.items()}
        out.append(r)
    return out


class _NameIndex:
    """Finds a file whose name equals the wanted one in NFC, per directory (listed once)."""

    def __init__(self) -> None:
        self._dirs: dict[str, dict[str, str]] = {}

    def find(self, full: str) -> str:
        if os.path.lexists(full):
            return full
        parent, name = os.path.split(full)
        if parent not in self._dirs:
            try:
                names = os.listdir(parent)
            except OSError:
                names = []
            self._dirs[parent] = {nfc(n): n for n in names}
        actual = self._dirs[parent].get(nfc(name))
        return os.path.join(parent, actual) if actual is not None else full


def detect_format(path: Path) -> str:
    ext = path.suffix.lower()
    if ext == ".json":
        return "vidgen"
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext in (".csv", ".tsv"):
        return "csv"
    if ext in (".parquet", ".pq"):
        return "parquet"
    raise UsageError(
        f"cannot tell the format of manifest {path} from its extension; "
        f"pass --manifest-format one of {', '.join(FORMATS)}"
    )


def _read_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    return _strip_bom_keys(_read_rows_raw(path, fmt))


def read_rows(path: str | Path, fmt: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """A manifest's raw rows (every column, as written) and its format; UsageError when unreadable."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    return _read_rows(path, fmt), fmt


def write_rows(path: str | Path, rows: list[dict[str, Any]], fmt: str) -> None:
    """Write raw rows as a manifest in `fmt` (the input's own format: `curate`'s subsets), atomically;
    CSV keeps the column order of the first row."""
    from carv_attrib.store.shards import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if fmt == "vidgen":
            tmp.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        elif fmt == "jsonl":
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        elif fmt == "csv":
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
                w = csv.DictWriter(
                    f, fieldnames=list(rows[0]) if rows else ["vid", "caption"], dialect=dialect
                )
                w.writeheader()
                w.writerows(rows)
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            raise UsageError(f"unknown manifest format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _read_rows_raw(path: Path, fmt: str) -> list[dict[str, Any]]:
    try:
        if fmt == "vidgen":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict):  # some dumps wrap the list, e.g. {"data": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else data
            if not isinstance(data, list):
                raise UsageError(f"manifest {path}: expected a JSON list of objects (VidGen-1M format)")
            return data
        if fmt == "jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise UsageError(f"manifest {path}: line {n} is not valid JSON ({exc.msg})") from exc
            return rows
        if fmt == "csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
                return list(csv.DictReader(f, dialect=dialect))
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except FileNotFoundError as exc:
        raise UsageError(f"manifest {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"manifest {path} is not valid {fmt}: {exc}") from exc
    except UsageError:
        raise
    except Exception as exc:  # pyarrow errors on a broken parquet file
        raise UsageError(f"manifest {path} could not be read as {fmt}: {exc}") from exc
    raise UsageError(f"unknown manifest format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _rows_listing(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:_MAX_LISTED])
    more = f" and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def read_manifest(
    path: str | Path, videos: str | Path | None, opts: ManifestOptions | None = None
) -> ClipTable:
    """Parse, validate and normalise a manifest. Row numbers in messages are 1-based data rows."""
    opts = opts or ManifestOptions()
    path = Path(path)
    fmt = opts.fmt or detect_format(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown manifest format {fmt!r}; choose one of {', '.join(FORMATS)}")
    rows = _read_rows(path, fmt)
    if not rows:
        raise UsageError(f"manifest {path} has no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"manifest {path}: every row must be an object with named columns")

    columns = set().union(*(r.keys() for r in rows))
    path_col = opts.path_column
    if path_col is None and fmt != "vidgen" and "path" in columns:
        path_col = "path"
    wanted = [opts.id_column, opts.caption_column] + ([path_col] if path_col else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        flags = {
            opts.id_column: "--id-column",
            opts.caption_column: "--caption-column",
            path_col: "--path-column",
        }
        raise UsageError(
            f"manifest {path} lacks column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(c) for c in missing)} (columns present: {', '.join(sorted(map(str, columns)))}); "
            f"name the right one with {', '.join(flags[c] for c in missing)}"
        )
    if videos is None and (path_col is None or fmt == "vidgen"):
        raise UsageError(f"manifest {path} gives no video paths; pass --videos DIR (videos are DIR/<id>.mp4)")
    # The root is resolved (it is a real folder); files under it are not (see the module docstring).
    root = Path(videos).resolve() if videos is not None else path.parent.resolve()

    problems: list[str] = []
    missing_id = [i for i, r in enumerate(rows, 1) if r.get(opts.id_column) in (None, "")]
    if missing_id:
        problems.append(f"empty {opts.id_column!r} in {_rows_listing(missing_id)}")
    empty_caption = [
        i
        for i, r in enumerate(rows, 1)
        if not isinstance(r.get(opts.caption_column), str) or not r[opts.caption_column].strip()
    ]
    if empty_caption:
        problems.append(f"empty caption in {_rows_listing(empty_caption)}")

    vids = [nfc(str(r.get(opts.id_column, ""))) for r in rows]
    dups: list[str] = []
    if len(set(vids)) != len(vids):  # only then the row numbers (a dict of 10^6 ids is ~100 MB)
        seen: dict[str, int] = {}
        for i, vid in enumerate(vids, 1):
            if vid and vid in seen:
                dups.append(f"{vid!r} (rows {seen[vid]} and {i})")
            seen.setdefault(vid, i)
    if dups:
        more = f" and {len(dups) - _MAX_LISTED} more" if len(dups) > _MAX_LISTED else ""
        problems.append(f"duplicate ids: {', '.join(dups[:_MAX_LISTED])}{more}")

    paths: list[str] = []
    escaping: list[int] = []
    names = _NameIndex()
    # os.path on strings, not pathlib: the same lexical rules at a tenth of the cost per row (10^6 rows)
    root_s = str(root)
    inside = root_s if root_s.endswith(os.sep) else root_s + os.sep
    for i, (r, vid) in enumerate(zip(rows, vids), 1):
        rel = str(r[path_col]) if path_col and r.get(path_col) not in (None, "") else vid + opts.video_ext
        # lexical: symlink names are kept
        full = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(root_s, rel))
        if not opts.allow_absolute_paths and full != root_s and not full.startswith(inside):
            escaping.append(i)
        paths.append(names.find(full))
    if escaping:
        problems.append(
            f"paths outside the videos root {root} in {_rows_listing(escaping)} "
            "(pass --allow-absolute-paths to accept them)"
        )
    if problems:
        raise UsageError(f"manifest {path}: " + "; ".join(problems))

    captions = [str(r[opts.caption_column]).strip() for r in rows]
    del rows  # the parsed rows (a dict each) are the largest thing held: gone before the ids are made
    ids = [clip_id_for(v) for v in vids]
    if len(set(ids)) != len(ids):  # 63-bit hash collision: astronomically unlikely, but never silent
        raise UsageError(f"manifest {path}: two distinct ids hash to the same clip_id; rename one of them")
    return ClipTable(ids, vids, captions, paths)


def write_clip_table(table: ClipTable, path: Path) -> None:
    import pyarrow.parquet as pq

    from carv_attrib.store.shards import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table.to_arrow(), tmp)


def read_clip_table(path: Path) -> ClipTable:
    import pyarrow.parquet as pq

    return ClipTable.from_arrow(pq.read_table(path))
