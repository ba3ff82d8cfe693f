from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from carv_attrib.errors import UsageError
from carv_attrib.store.manifest import ManifestOptions, clip_id_for, read_manifest

ROWS = [
    {"vid": "a", "caption": "a red square moving left"},
    {"vid": "b", "caption": "a blue circle moving up"},
    {"vid": "c", "caption": "a green ring moving down"},
]


def write(path: Path, rows: list[dict], fmt: str) -> Path:
    if fmt == "vidgen":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "csv":
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


EXT = {"vidgen": ".json", "jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}


@pytest.mark.parametrize("fmt", ["vidgen", "jsonl", "csv", "parquet"])
def test_every_format_normalises_to_the_same_table(tmp_path: Path, fmt: str) -> None:
    m = write(tmp_path / f"m{EXT[fmt]}", ROWS, fmt)
    t = read_manifest(m, tmp_path / "videos")
    assert t.vid == ["a", "b", "c"]
    assert t.caption == [r["caption"] for r in ROWS]
    assert t.path == [str((tmp_path / "videos" / f"{v}.mp4").resolve()) for v in "abc"]
    assert t.clip_id == [clip_id_for(v) for v in "abc"]
    assert all(0 <= i < 2**63 for i in t.clip_id)
    arrow = t.to_arrow()
    assert arrow.schema.field("clip_id").type == pa.int64()


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_custom_columns_and_path_column(tmp_path: Path, fmt: str) -> None:
    rows = [{"id": r["vid"], "text": r["caption"], "file": f"sub/{r['vid']}.webm"} for r in ROWS]
    m = write(tmp_path / f"m{EXT[fmt]}", rows, fmt)
    t = read_manifest(m, tmp_path, ManifestOptions(id_column="id", caption_column="text", path_column="file"))
    assert t.path[0] == str((tmp_path / "sub" / "a.webm").resolve())
    assert t.caption[1] == ROWS[1]["caption"]


def test_clip_ids_are_stable_under_reordering(tmp_path: Path) -> None:
    a = read_manifest(write(tmp_path / "a.json", ROWS, "vidgen"), tmp_path)
    b = read_manifest(
        write(tmp_path / "b.json", ROWS[::-1] + [{"vid": "d", "caption": "x"}], "vidgen"), tmp_path
    )
    ids_b = dict(zip(b.vid, b.clip_id))
    assert all(ids_b[v] == i for v, i in zip(a.vid, a.clip_id))


def test_missing_column_names_the_column_and_the_flag(tmp_path: Path) -> None:
    m = write(tmp_path / "m.jsonl", [{"vid": "a", "text": "x"}], "jsonl")
    with pytest.raises(UsageError, match=r"lacks column 'caption'.*--caption-column"):
        read_manifest(m, tmp_path)


def test_duplicate_ids_name_the_rows(tmp_path: Path) -> None:
    m = write(tmp_path / "m.json", ROWS + [{"vid": "b", "caption": "again"}], "vidgen")
    with pytest.raises(UsageError, match=r"duplicate ids: 'b' \(rows 2 and 4\)"):
        read_manifest(m, tmp_path)


def test_empty_captions_name_the_rows(tmp_path: Path) -> None:
    rows = [{"vid": "a", "caption": "ok"}, {"vid": "b", "caption": "  "}, {"vid": "c", "caption": ""}]
    with pytest.raises(UsageError, match=r"empty caption in rows 2, 3"):
        read_manifest(write(tmp_path / "m.csv", rows, "csv"), tmp_path)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    rows = [{"vid": "a", "caption": ""}, {"vid": "a", "caption": "x"}]
    with pytest.raises(UsageError) as exc:
        read_manifest(write(tmp_path / "m.json", rows, "vidgen"), tmp_path)
    assert "empty caption in row 1" in str(exc.value) and "duplicate ids" in str(exc.value)


def test_paths_escaping_the_root_are_refused_unless_allowed(tmp_path: Path) -> None:
    rows = [
        {"vid": "a", "caption": "x", "path": "../outside.mp4"},
        {"vid": "b", "caption": "y", "path": "/abs/b.mp4"},
    ]
    m = write(tmp_path / "m.jsonl", rows, "jsonl")
    root = tmp_path / "videos"
    with pytest.raises(UsageError, match=r"outside the videos root .* rows 1, 2.*--allow-absolute-paths"):
        read_manifest(m, root)
    t = read_manifest(m, root, ManifestOptions(allow_absolute_paths=True))
    assert t.path == [str((tmp_path / "outside.mp4").resolve()), "/abs/b.mp4"]


def test_vidgen_needs_a_videos_root(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--videos"):
        read_manifest(write(tmp_path / "m.json", ROWS, "vidgen"), None)


@pytest.mark.parametrize(
    "content,name,match",
    [
        ("{not json", "m.json", "not valid"),
        ('{"vid": 1}\nnope\n', "m.jsonl", "line 2 is not valid JSON"),
        ("[]", "m.json", "no rows"),
        ("x", "m.txt", "cannot tell the format"),
        ("not parquet", "m.parquet", "could not be read as parquet"),
    ],
)
def test_unreadable_manifests(tmp_path: Path, content: str, name: str, match: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(UsageError, match=match):
        read_manifest(tmp_path / name, tmp_path)


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        read_manifest(tmp_path / "nope.json", tmp_path)


def test_shipped_example_manifests_parse() -> None:
    root = Path(__file__).resolve().parents[2] / "data_manifests"
    files = sorted(p for p in root.iterdir() if p.suffix in {".json", ".jsonl", ".csv", ".parquet"})
    assert {p.suffix for p in files} == {".json", ".jsonl", ".csv", ".parquet"}
    for p in files:
        opts = ManifestOptions(allow_absolute_paths=False)
        t = read_manifest(p, root / "videos", opts)
        assert len(t) >= 3


@pytest.mark.parametrize("fmt", ["vidgen", "jsonl", "csv"])
def test_byte_order_mark_is_dropped(tmp_path: Path, fmt: str) -> None:
    m = write(tmp_path / f"m{EXT[fmt]}", ROWS, fmt)
    m.write_bytes(b"\xef\xbb\xbf" + m.read_bytes())  # as spreadsheet programs save UTF-8
    t = read_manifest(m, tmp_path / "videos")
    assert t.vid == ["a", "b", "c"] and t.caption == [r["caption"] for r in ROWS]


def test_bom_glued_to_a_parquet_column_name_is_dropped(tmp_path: Path) -> None:
    rows = [{"\ufeffvid": r["vid"], "caption": r["caption"]} for r in ROWS]  # a BOM'd CSV converted
    t = read_manifest(write(tmp_path / "m.parquet", rows, "parquet"), tmp_path)
    assert t.vid == ["a", "b", "c"]


def test_read_text_file_drops_the_bom(tmp_path: Path) -> None:
    from carv_attrib.store.manifest import read_text_file

    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa prompt\nanother\n")
    assert read_text_file(tmp_path / "p.txt").splitlines() == ["a prompt", "another"]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="prompts file .* is not UTF-8"):
        read_text_file(tmp_path / "bad.txt", "prompts file")
    with pytest.raises(UsageError, match="does not exist"):
        read_text_file(tmp_path / "nope.txt")


def test_hugging_face_cache_layout_keeps_link_names(tmp_path: Path) -> None:
    """snapshots/<rev>/<name> are relative symlinks to ../../blobs/<sha256>, outside the folder."""
    blobs = tmp_path / "repo" / "blobs"
    snap = tmp_path / "repo" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, r in enumerate(ROWS):
        (blobs / f"{i:064x}").write_bytes(b"video")
        (snap / f"{r['vid']}.mp4").symlink_to(Path("../../blobs") / f"{i:064x}")
    t = read_manifest(write(tmp_path / "m.json", ROWS, "vidgen"), snap)
    assert t.path == [str(snap.resolve() / f"{v}.mp4") for v in "abc"]
    assert all(Path(p).is_symlink() and Path(p).exists() for p in t.path)


def test_ids_and_file_names_compare_in_nfc(tmp_path: Path) -> None:
    import unicodedata

    nfc_id, nfd_id = unicodedata.normalize("NFC", "café-01"), unicodedata.normalize("NFD", "café-01")
    assert nfc_id != nfd_id
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / f"{nfd_id}.mp4").write_bytes(b"v")  # the name as a macOS file system stores it
    t = read_manifest(write(tmp_path / "m.json", [{"vid": nfc_id, "caption": "x"}], "vidgen"), videos)
    assert Path(t.path[0]).exists() and t.vid == [nfc_id]
    assert clip_id_for(nfd_id) == clip_id_for(nfc_id)
    rows = [{"vid": nfc_id, "caption": "x"}, {"vid": nfd_id, "caption": "y"}]
    with pytest.raises(UsageError, match="duplicate ids"):
        read_manifest(write(tmp_path / "d.json", rows, "vidgen"), videos)
