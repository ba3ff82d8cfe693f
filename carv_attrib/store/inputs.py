"""Training clips from what video datasets ship, as the same clip table a manifest gives.

`read_clips(SOURCE, videos, opts)` tells SOURCE's kind (`detect_input`) and reads it:

- a manifest file (VidGen JSON, JSONL, CSV, Parquet): `store.manifest.read_manifest`;
- WebDataset tar shards, as video2dataset writes them (`{key}.mp4` with `{key}.txt` and/or
  `{key}.json` holding a "caption"): one `.tar`, a folder of `.tar` files, a glob (`shards/*.tar`) or
  a brace pattern (`shards/{00000..00003}.tar`, `expand_braces`). The tars are never unpacked: a
  clip is the byte range of its member (`TarInfo.offset_data`, `size`; `video.member`), decoded and
  hashed in place. The id is the WebDataset `__key__` (the member name up to the first dot of its
  base name);
- a Hugging Face dataset saved with `Dataset.save_to_disk` (a folder with `state.json` /
  `dataset_info.json`), read with the optional `datasets` package: a video column holding a path,
  bytes or {"bytes", "path"} (bytes are addressed in place, as byte ranges of the Arrow file) and a
  caption column, found among common names (`VIDEO_COLUMNS`, `CAPTION_COLUMNS`) unless named
  (`--path-column`, `--caption-column`). The id is `--id-column` (or `__key__`) when the dataset
  has it, else the video file's stem;
- a folder of videos with `.txt` caption sidecars (`a.mp4` + `a.txt`): the id is the file stem.

Every kind gives the same rows for the same clips: ids from `clip_id_for(vid)`, absolute paths (or
member names), the caption stripped; so the same videos as loose files, tar members or dataset bytes
have the same clip ids, source keys and latents. Problems with the input as a whole (unreadable tar,
missing captions, duplicate ids, no video column) are one UsageError (exit 2) naming the offenders;
a member that is not a video, is cut short by a truncated tar or is absent becomes the clip's
recorded failure when it is decoded (`decode_error`, `still_image`, `truncated`, `missing`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carv_attrib.errors import UsageError
from carv_attrib.store.manifest import ClipTable, ManifestOptions, clip_id_for, nfc, read_manifest
from carv_attrib.video.member import member_path

log = logging.getLogger(__name__)

INPUT_KINDS = ("manifest", "webdataset", "hf-dataset", "folder")
# File extensions taken as videos (a WebDataset member's extension, a sidecar folder's files).
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v", "mpg", "mpeg", "ts", "gif")
# Members of a WebDataset sample that are metadata, never its video.
_META_EXTS = ("txt", "json", "cls", "caption", "npy", "vtt")
VIDEO_COLUMNS = ("video", "path", "file", "mp4", "video_path", "file_path", "filepath")
CAPTION_COLUMNS = ("caption", "text", "prompt", "txt", "captions", "json")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_MAX_LISTED = 10


# -- brace patterns --------------------------------------------------------------------------------

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_CHARS = re.compile(r"^([A-Za-z])\.\.([A-Za-z])$")


def _split_top(body: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    return [*parts, cur]


def _alternatives(body: str) -> list[str] | None:
    """What `{body}` expands to, or None when it is no expansion (kept literally, as bash does)."""
    parts = _split_top(body)
    if len(parts) > 1:
        return parts
    m = _RANGE.match(body)
    if m:
        a, b, step = int(m[1]), int(m[2]), abs(int(m[3] or 1)) or 1
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (m[1], m[2]))
        width = max(len(m[1]), len(m[2])) if padded else 0
        seq = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        return [str(n).zfill(width) if width else str(n) for n in seq]
    m = _CHARS.match(body)
    if m:
        a, b = ord(m[1]), ord(m[2])
        return [chr(c) for c in (range(a, b + 1) if a <= b else range(a, b - 1, -1))]
    return None


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as bash and WebDataset's `braceexpand` do it: `a{0..2}b` -> a0b a1b a2b, `{01..03}`
    keeps the zero padding, `{x,y}` alternatives, nesting and several groups (expanded left to right).
    A group that is no expansion (`{x}`) or an unmatched brace is kept literally."""
    start = 0
    while True:
        i = pattern.find("{", start)
        if i < 0:
            return [pattern]
        depth = 0
        for j in range(i, len(pattern)):
            depth += pattern[j] == "{"
            depth -= pattern[j] == "}"
            if depth == 0:
                break
        else:
            return [pattern]
        alts = _alternatives(pattern[i + 1 : j])
        if alts is None:
            start = i + 1
            continue
        pre, rest = pattern[:i], expand_braces(pattern[j + 1 :])
        return [pre + x + r for a in alts for x in expand_braces(a) for r in rest]


def is_pattern(text: str) -> bool:
    """Whether `text` is a brace pattern or a glob rather than one path."""
    return expand_braces(text) != [text] or any(c in text for c in "*?[")


# -- telling the kind ------------------------------------------------------------------------------


def _video_ext(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in VIDEO_EXTS if "." in name else False


def detect_input(source: str | Path, opts: ManifestOptions | None = None) -> str:
    """The kind of SOURCE (`INPUT_KINDS`): a manifest file unless it is a `.tar` file, a folder of them,
    a pattern of tars, a saved Hugging Face dataset or a folder of videos; `--manifest-format` forces
    a manifest."""
    opts = opts or ManifestOptions()
    text = str(source)
    if opts.fmt is not None:
        return "manifest"
    path = Path(text)
    if path.is_dir():
        names = os.listdir(path)
        if any(m in names for m in HF_MARKERS):
            return "hf-dataset"
        if any(n.lower().endswith(".tar") for n in names):
            return "webdataset"
        if any(_video_ext(n) for n in names):
            return "folder"
        raise UsageError(
            f"{path} is a folder holding no .tar shards, Hugging Face dataset (dataset_info.json) or videos "
            f"({', '.join('.' + e for e in VIDEO_EXTS[:5])}, ...): give a manifest file, or one of those"
        )
    if text.lower().endswith((".tar", ".tar.gz", ".tgz")) or (not path.exists() and is_pattern(text)):
        return "webdataset"
    return "manifest"


def read_clips(
    source: str | Path, videos: str | Path | None = None, opts: ManifestOptions | None = None
) -> ClipTable:
    """The clip table of SOURCE, whatever its kind (see the module docstring)."""
    opts = opts or ManifestOptions()
    kind = detect_input(source, opts)
    if kind == "manifest":
        return read_manifest(source, videos, opts)
    if kind == "webdataset":
        return read_webdataset(source, opts)
    if kind == "hf-dataset":
        return read_hf_dataset(source, videos, opts)
    return read_folder(source)


def build_table(
    vids: list[str],
    captions: list[Any],
    paths: list[str],
    where: str,
    labels: list[str],
    caption_hint: str = "",
) -> ClipTable:
    """A clip table from parallel lists, checked as a manifest is (empty ids and captions, duplicate
    ids, all named at once by `labels`, e.g. "key x in s.tar"; `caption_hint` says where a caption
    comes from); UsageError naming `where`."""

    def listing(bad: list[int]) -> str:
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        return ", ".join(labels[i] for i in bad[:_MAX_LISTED]) + more

    if not vids:
        raise UsageError(f"{where} holds no clips")
    vids = [nfc(v) for v in vids]
    problems = []
    empty_id = [i for i, v in enumerate(vids) if not v]
    if empty_id:
        problems.append(f"no id for {listing(empty_id)}")
    no_caption = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if no_caption:
        problems.append(f"no caption for {listing(no_caption)}{caption_hint}")
    if len(set(vids)) != len(vids):
        seen: dict[str, int] = {}
        dups = []
        for i, v in enumerate(vids):
            if v in seen:
                dups.append(f"{v!r} ({labels[seen[v]]} and {labels[i]})")
            seen.setdefault(v, i)
        more = f" and {len(dups) - _MAX_LISTED} more" if len(dups) > _MAX_LISTED else ""
        problems.append(f"duplicate ids: {', '.join(dups[:_MAX_LISTED])}{more}")
    if problems:
        raise UsageError(f"{where}: " + "; ".join(problems))
    ids = [clip_id_for(v) for v in vids]
    if len(set(ids)) != len(ids):
        raise UsageError(f"{where}: two distinct ids hash to the same clip_id; rename one of them")
    return ClipTable(ids, vids, [c.strip() for c in captions], paths)


# -- WebDataset tar shards -------------------------------------------------------------------------


def shard_paths(source: str | Path) -> list[Path]:
    """The tar files SOURCE names: itself, the `.tar` files of a folder (sorted), or a brace pattern's
    / glob's matches in order; UsageError naming the shards that do not exist."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.lower().endswith(".tar") and p.is_file())
        if not found:
            raise UsageError(f"{path} holds no .tar files")
        return found
    if path.exists():
        return [path]
    names = expand_braces(text)
    out: list[Path] = []
    absent = []
    for name in names:
        if any(c in name for c in "*?["):
            out.extend(Path(p) for p in sorted(glob.glob(name)))
        elif os.path.exists(name):
            out.append(Path(name))
        else:
            absent.append(name)
    if absent:
        more = f" and {len(absent) - _MAX_LISTED} more" if len(absent) > _MAX_LISTED else ""
        raise UsageError(
            f"{text}: {len(absent)} of {len(names)} shards do not exist: {', '.join(absent[:_MAX_LISTED])}{more}"
        )
    if not out:
        raise UsageError(
            f"{text}: no file matches (a .tar path, a folder of them, or a pattern such as shards/{{00000..00009}}.tar)"
        )
    return out


_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's base_plus_ext: key, extension


def tar_members(path: Path) -> tuple[list[tarfile.TarInfo], str | None]:
    """The regular-file members of an uncompressed tar, read from its headers only, and what cut the
    listing short (a truncated or corrupt tar: the members before it are kept, and a member its end
    cuts into reads as a truncated file). UsageError when it is no tar at all."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:4] == b"\xfd7zX":
        raise UsageError(
            f"{path} is a compressed tar: its members cannot be read in place; decompress it (e.g. gunzip)"
        )
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise UsageError(f"{path} is not a readable tar file ({exc})") from exc
    members: list[tarfile.TarInfo] = []
    problem = None
    with tf:
        try:
            for ti in tf:
                if ti.isreg():
                    members.append(ti)
        except (tarfile.TarError, OSError, EOFError) as exc:
            problem = f"{path} ends early or is corrupt after {len(members)} members ({exc})"
    size = os.path.getsize(path)
    cut = [ti.name for ti in members if ti.offset_data + ti.size > size]
    if cut and problem is None:
        problem = f"{path} ends inside member {cut[0]}"
    return members, problem


def group_samples(members: list[tarfile.TarInfo]) -> dict[str, list[tuple[str, tarfile.TarInfo]]]:
    """WebDataset samples of a tar's members: key -> [(extension lowercased, member), ...], keys and
    members in tar order. The key is the name up to the first dot of its base name (`./` stripped, as
    `tar -cf s.tar .` writes it); a member without an extension belongs to no sample."""
    groups: dict[str, list[tuple[str, tarfile.TarInfo]]] = {}
    for ti in members:
        m = _KEY.match(ti.name[2:] if ti.name.startswith("./") else ti.name)
        if m is not None:
            groups.setdefault(m[1], []).append((m[2].lower(), ti))
    return groups


def _read_member(f: Any, ti: tarfile.TarInfo) -> bytes:
    f.seek(ti.offset_data)
    return f.read(ti.size)


def _caption_of(f: Any, group: dict[str, tarfile.TarInfo], field: str) -> str | None:
    """The caption of one sample: its `.txt`, else the `field` (or a common caption name) of its `.json`."""
    if "txt" in group:
        return _read_member(f, group["txt"]).decode("utf-8-sig", "replace")
    if "json" in group:
        try:
            doc = json.loads(_read_member(f, group["json"]).decode("utf-8-sig"))
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(doc, dict):
            for name in (field, *CAPTION_COLUMNS):
                if isinstance(doc.get(name), str):
                    return doc[name]
    return None


def read_webdataset(source: str | Path, opts: ManifestOptions | None = None) -> ClipTable:
    """The clips of WebDataset tar shards (see the module docstring); never extracts a member to disk."""
    opts = opts or ManifestOptions()
    vids: list[str] = []
    captions: list[Any] = []
    paths: list[str] = []
    labels: list[str] = []
    for shard in shard_paths(source):
        shard_abs = os.path.abspath(shard)
        members, problem = tar_members(shard)
        if problem:
            log.warning("%s: a clip the end cuts into fails as truncated", problem)
        last = members[-1].name if members and problem else None
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for key, group in group_samples(members).items():
            for ext, ti in group:
                groups.setdefault(key, {}).setdefault(ext, ti)  # a repeated extension keeps its first
        with open(shard, "rb") as f:  # captions are read from the one open shard
            for key, group in groups.items():
                caption = _caption_of(f, group, opts.caption_column)
                if caption is None and any(ti.name == last for ti in group.values()):
                    log.warning(
                        "%s: its last sample %r lost its caption to the cut and is left out", problem, key
                    )
                    continue
                video = next((ext for ext in group if ext in VIDEO_EXTS), None)
                if video is None:  # e.g. a .jpg only: the decoder says what it is (still_image, decode_error)
                    video = next((ext for ext in group if ext not in _META_EXTS), None)
                if video is None:
                    paths.append(member_path("tar", shard_abs, None, None, f"{key}.mp4"))
                else:
                    ti = group[video]
                    paths.append(member_path("tar", shard_abs, ti.offset_data, ti.size, ti.name))
                vids.append(key)
                captions.append(caption)
                labels.append(f"key {key!r} in {shard}")
    hint = " (a sample's caption is its {key}.txt or the 'caption' of its {key}.json)"
    return build_table(vids, captions, paths, str(source), labels, hint)


# -- a folder of videos with .txt sidecars ---------------------------------------------------------


def read_folder(source: str | Path) -> ClipTable:
    """The clips of a folder of videos, each captioned by the `.txt` file of the same stem beside it."""
    root = os.path.abspath(source)
    names = sorted(os.listdir(root))
    texts = {nfc(os.path.splitext(n)[0]): n for n in names if n.lower().endswith(".txt")}
    vids, captions, paths, labels = [], [], [], []
    for n in names:
        if not _video_ext(n):
            continue
        stem = nfc(os.path.splitext(n)[0])
        side = texts.get(stem)
        caption = None
        if side is not None:
            try:
                caption = Path(root, side).read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(
                    f"caption file {Path(root, side)} is unreadable or not UTF-8 ({exc})"
                ) from exc
        vids.append(stem)
        captions.append(caption)
        paths.append(os.path.join(root, n))
        labels.append(n)
    hint = " (each video needs a .txt caption of the same name beside it, a.mp4 + a.txt)"
    return build_table(vids, captions, paths, root, labels, hint)


# -- a saved Hugging Face dataset ------------------------------------------------------------------


def _load_hf(path: Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"{path} is a Hugging Face dataset: reading it needs the `datasets` package "
            "(pip install 'carv-attrib[datasets]')"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # a folder datasets cannot read: its own error, in one line
        raise UsageError(
            f"{path} is not a readable Hugging Face dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise UsageError(
                f"{path} holds the splits {', '.join(ds)}: give one split's folder, e.g. {path / next(iter(ds))}"
            )
        ds = next(iter(ds.values()))
    if getattr(ds, "_indices", None) is not None:
        raise UsageError(f"{path}: the dataset has an indices mapping; save it again with save_to_disk")
    return ds


def _pick(
    columns: Sequence[str],
    given: str | None,
    default: str | None,
    candidates: Sequence[str],
    flag: str,
    what: str,
    where: Path,
) -> str:
    if given is not None and given != default:
        if given not in columns:
            raise UsageError(
                f"{where} has no column {given!r} (columns: {', '.join(columns)}); name the {what} with {flag}"
            )
        return given
    for name in candidates:
        if name in columns:
            return name
    raise UsageError(
        f"{where}: no {what} column among {', '.join(columns)} (looked for {', '.join(candidates)}); name it with {flag}"
    )


def _binary_ranges(chunk: Any, base: int, raw: Any, where: str) -> list[tuple[int, int] | None]:
    """(file offset, size) of each value of a binary Arrow array memory-mapped from one file (`base`:
    the map's address), None for nulls; UsageError when the values are not stored in place."""
    import numpy as np
    import pyarrow as pa

    if len(chunk) == 0:
        return []
    wide = pa.types.is_large_binary(chunk.type)
    bufs = chunk.buffers()
    offs = np.frombuffer(bufs[1], np.int64 if wide else np.int32)[
        chunk.offset : chunk.offset + len(chunk) + 1
    ]
    data = bufs[2].address - base if bufs[2] is not None else 0
    valid = chunk.is_valid().to_numpy(zero_copy_only=False)
    out: list[tuple[int, int] | None] = []
    for i in range(len(chunk)):
        out.append((data + int(offs[i]), int(offs[i + 1] - offs[i])) if valid[i] else None)
    first = next((i for i, r in enumerate(out) if r is not None and r[1]), None)
    if first is not None:  # the arithmetic holds only for uncompressed, memory-mapped buffers
        o, n = out[first]  # type: ignore[misc]
        k = min(n, 64)
        if not (0 <= o and o + n <= raw.size) or raw[o : o + k].to_pybytes() != chunk[first].as_py()[:k]:
            raise UsageError(
                f"{where}: the video bytes are not stored uncompressed, so not readable in place"
            )
    return out


def read_hf_dataset(
    source: str | Path, videos: str | Path | None = None, opts: ManifestOptions | None = None
) -> ClipTable:
    """The clips of a dataset saved with `save_to_disk` (see the module docstring). Paths in the video
    column are taken as given when absolute, else relative to `videos` (default: the dataset folder)."""
    import pyarrow as pa

    opts = opts or ManifestOptions()
    path = Path(source)
    ds = _load_hf(path)
    columns = list(ds.column_names)
    defaults = ManifestOptions()
    vcol = _pick(columns, opts.path_column, None, VIDEO_COLUMNS, "--path-column", "video", path)
    ccol = _pick(
        columns,
        opts.caption_column,
        defaults.caption_column,
        CAPTION_COLUMNS,
        "--caption-column",
        "caption",
        path,
    )
    icol = next((c for c in (opts.id_column, "__key__") if c in columns), None)
    if opts.id_column != defaults.id_column and opts.id_column not in columns:
        raise UsageError(
            f"{path} has no column {opts.id_column!r} (columns: {', '.join(columns)}); check --id-column"
        )
    root = os.path.abspath(videos if videos is not None else path)

    vids: list[str] = []
    captions: list[Any] = []
    paths: list[str] = []
    labels: list[str] = []
    row = 0
    for entry in ds.cache_files:
        arrow = os.path.abspath(entry["filename"])
        mm = pa.memory_map(arrow)
        raw = mm.read_buffer()
        base = raw.address
        mm.seek(0)
        try:
            table = pa.ipc.open_stream(mm).read_all()
        except pa.ArrowInvalid:
            mm.seek(0)
            table = pa.ipc.open_file(mm).read_all()
        vcolumn = table.column(vcol)
        kind = vcolumn.type
        for chunk in vcolumn.chunks:
            n = len(chunk)
            file_paths: list[Any] = [None] * n
            ranges: list[Any] = [None] * n
            if pa.types.is_string(kind) or pa.types.is_large_string(kind):
                file_paths = chunk.to_pylist()
            elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
                ranges = _binary_ranges(chunk, base, raw, arrow)
            elif pa.types.is_struct(kind) and ("bytes" in kind.names or "path" in kind.names):
                valid = chunk.is_valid().to_numpy(zero_copy_only=False)  # a null row: no video
                if "bytes" in kind.names:
                    ranges = [
                        r if ok else None
                        for r, ok in zip(_binary_ranges(chunk.field("bytes"), base, raw, arrow), valid)
                    ]
                if "path" in kind.names:
                    file_paths = [p if ok else None for p, ok in zip(chunk.field("path").to_pylist(), valid)]
            else:
                raise UsageError(
                    f"{path}: video column {vcol!r} is {kind}: expected paths, bytes or {{bytes, path}}"
                )
            for i in range(n):
                fp, rng = file_paths[i], ranges[i]
                if rng is not None:
                    name = f"{vcol}[{row}]" + (f" ({os.path.basename(fp)})" if fp else "")
                    paths.append(member_path("arrow", arrow, rng[0], rng[1], name))
                elif fp:
                    paths.append(os.path.normpath(fp if os.path.isabs(fp) else os.path.join(root, fp)))
                else:
                    paths.append(member_path("arrow", arrow, None, None, f"{vcol}[{row}]"))
                stem = os.path.splitext(os.path.basename(fp))[0] if fp else ""
                vids.append(stem)
                labels.append(f"row {row + 1}")
                row += 1
        del table, vcolumn
    if row != len(ds):
        raise UsageError(
            f"{path}: its Arrow files hold {row} rows, the dataset {len(ds)}; save it again with save_to_disk"
        )
    cap_values = ds.data.column(ccol).to_pylist()
    captions = [c.get("caption") if isinstance(c, dict) else c for c in cap_values]
    if icol is not None:
        vids = [str(v) if v is not None else "" for v in ds.data.column(icol).to_pylist()]
    elif not all(vids):
        raise UsageError(
            f"{path}: the video column {vcol!r} holds bytes without file names, so clips have no id; "
            f"add an id column and name it with --id-column"
        )
    return build_table(vids, captions, paths, str(path), labels)
