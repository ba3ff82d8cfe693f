from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from carv_attrib.data.manifest import ManifestOptions, clip_id_for, read_manifest
from carv_attrib.errors import UsageError

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
