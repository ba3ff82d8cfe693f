"""Reading what datasets ship into clip tables (`carv_attrib.store.inputs`), without a model."""

from __future__ import annotations

import gzip
import json
import logging
import sys
import tarfile
from pathlib import Path

import pytest

from carv_attrib.errors import UsageError
from carv_attrib.store.inputs import detect_input, expand_braces, read_clips, read_hf_dataset
from carv_attrib.store.manifest import ManifestOptions, clip_id_for
from carv_attrib.video.member import open_source, parse_member
from tests.store.shipped import add_bytes, write_hf, write_shards, write_sidecars

VIDEO = b"\x00\x00\x00\x18ftypmp42" + b"v" * 200  # contents matter only to decoders, not here


@pytest.fixture
def clips(tmp_path: Path) -> list[tuple[str, str, Path]]:
    out = []
    for i in range(4):
        p = tmp_path / "videos" / f"clip-{i}.mp4"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(VIDEO + bytes([i]) * (i + 1))
        out.append((f"clip-{i}", f"caption {i}", p))
    return out


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("s/{00000..00003}.tar", [f"s/{i:05d}.tar" for i in range(4)]),
        ("{8..11}", ["8", "9", "10", "11"]),
        ("{3..1}", ["3", "2", "1"]),
        ("{0..10..5}", ["0", "5", "10"]),
        ("a{b,c{d,e}}f", ["abf", "acdf", "acef"]),
        ("{a,b}{0..1}", ["a0", "a1", "b0", "b1"]),
        ("{x}/{a..c}", ["{x}/a", "{x}/b", "{x}/c"]),  # no expansion: literal
        ("plain.tar", ["plain.tar"]),
        ("open{brace", ["open{brace"]),
        ("{}", ["{}"]),
    ],
)
def test_brace_expansion(pattern: str, expected: list[str]) -> None:
    assert expand_braces(pattern) == expected
    braceexpand = pytest.importorskip("braceexpand")  # WebDataset's own, where installed
    if pattern not in ("open{brace",):
        assert list(braceexpand.braceexpand(pattern)) == expected


def test_kinds_are_told_apart(tmp_path: Path, clips: list) -> None:
    pytest.importorskip("datasets")
    write_shards(clips, tmp_path / "wds", shards=2)
    write_hf(clips, tmp_path / "hf", "path")
    write_sidecars(clips, tmp_path / "side")
    (tmp_path / "m.json").write_text("[]")
    assert detect_input(tmp_path / "wds") == "webdataset"
    assert detect_input(tmp_path / "wds" / "00000.tar") == "webdataset"
    assert detect_input(str(tmp_path / "wds" / "{00000..00001}.tar")) == "webdataset"
    assert detect_input(str(tmp_path / "wds" / "*.tar")) == "webdataset"
    assert detect_input(tmp_path / "hf") == "hf-dataset"
    assert detect_input(tmp_path / "side") == "folder"
    assert detect_input(tmp_path / "m.json") == "manifest"
    assert detect_input(tmp_path / "wds", ManifestOptions(fmt="csv")) == "manifest"
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        UsageError, match="holding no .tar shards, Hugging Face dataset.*give a manifest file"
    ):
        detect_input(tmp_path / "empty")


def test_webdataset_rows_are_manifest_rows(tmp_path: Path, clips: list) -> None:
    pattern = write_shards(clips, tmp_path / "wds", shards=2)
    t = read_clips(pattern)
    assert t.vid == [v for v, _, _ in clips] and t.caption == [c for _, c, _ in clips]
    assert t.clip_id == [clip_id_for(v) for v, _, _ in clips]
    for path, (_, _, p) in zip(t.path, clips):
        m = parse_member(path)
        assert m is not None and m.scheme == "tar" and m.container.startswith(str(tmp_path))
        with open_source(path) as f:
            assert f.read() == p.read_bytes()
    # a folder of shards and a glob give the same table
    assert read_clips(tmp_path / "wds").path == t.path == read_clips(str(tmp_path / "wds" / "*.tar")).path


def test_webdataset_keys_captions_and_json_fields(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        add_bytes(tf, "part/000.seg.mp4", VIDEO)  # key = up to the first dot of the base name
        add_bytes(tf, "part/000.json", json.dumps({"text": " from json "}).encode())
        add_bytes(tf, "README", b"no extension: not a sample")
        add_bytes(tf, "./001.webm", VIDEO)  # as `tar -cf s.tar .` names members
        add_bytes(tf, "001.json", json.dumps({"alt": "named field", "caption": "other"}).encode())
    t = read_clips(tmp_path / "s.tar", opts=ManifestOptions(caption_column="alt"))
    assert t.vid == ["part/000", "001"] and t.caption == ["from json", "named field"]
    assert parse_member(t.path[0]).name == "part/000.seg.mp4"


def test_webdataset_input_problems_are_usage_errors(tmp_path: Path, clips: list) -> None:
    write_shards(clips, tmp_path / "wds", shards=2)
    with pytest.raises(UsageError, match=r"2 of 4 shards do not exist: .*00002.tar, .*00003.tar"):
        read_clips(str(tmp_path / "wds" / "{00000..00003}.tar"))
    dup = tmp_path / "dup"
    dup.mkdir()
    for s in ("a", "b"):
        with tarfile.open(dup / f"{s}.tar", "w") as tf:
            add_bytes(tf, "k.mp4", VIDEO)
            add_bytes(tf, "k.txt", b"c")
    with pytest.raises(UsageError, match=r"duplicate ids: 'k' \(key 'k' in .*a.tar and key 'k' in .*b.tar\)"):
        read_clips(dup)
    gz = tmp_path / "c.tar"
    gz.write_bytes(gzip.compress((tmp_path / "wds" / "00000.tar").read_bytes()))
    with pytest.raises(UsageError, match="is a compressed tar"):
        read_clips(gz)
    with pytest.raises(UsageError, match="is a compressed tar.*decompress it"):
        read_clips(gz.rename(tmp_path / "c.tar.gz"))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(UsageError, match="is not a readable tar file"):
        read_clips(tmp_path / "empty.tar")


def test_a_truncated_tar_keeps_what_is_there(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        add_bytes(tf, "a.mp4", VIDEO)
        add_bytes(tf, "a.txt", b"whole")
        add_bytes(tf, "b.mp4", VIDEO * 20)
        add_bytes(tf, "b.txt", b"lost with the end")
    with tarfile.open(tmp_path / "s.tar") as tf:
        b = tf.getmember("b.mp4")
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: b.offset_data + 100])
    with caplog.at_level(logging.WARNING):
        t = read_clips(tmp_path / "s.tar")
    assert t.vid == ["a"]  # b lost its caption to the cut: left out, said so
    assert "ends early" in caplog.text and "'b' lost its caption" in caplog.text


def test_hf_dataset_forms_and_columns(tmp_path: Path, clips: list) -> None:
    pytest.importorskip("datasets")
    want_ids = [clip_id_for(v) for v, _, _ in clips]
    for form in ("path", "bytes", "dict"):
        t = read_clips(write_hf(clips, tmp_path / form, form))
        assert t.clip_id == want_ids and t.caption == [c for _, c, _ in clips], form
        for path, (_, _, p) in zip(t.path, clips):
            assert (parse_member(path) is None) == (form == "path")
            with open_source(path) as f:
                assert f.read() == p.read_bytes(), form
    import datasets

    if hasattr(datasets, "Video"):  # datasets >= 4: a Video feature embeds the files' bytes on save
        ds = datasets.Dataset.from_dict(
            {"video": [str(p) for _, _, p in clips], "caption": [c for _, c, _ in clips]}
        )
        ds.cast_column("video", datasets.Video()).save_to_disk(str(tmp_path / "feature"))
        t = read_clips(tmp_path / "feature")
        assert t.clip_id == want_ids and all(parse_member(p).scheme == "arrow" for p in t.path)
        with open_source(t.path[2]) as f:
            assert f.read() == clips[2][2].read_bytes()

    rel = tmp_path / "rel"
    datasets.Dataset.from_dict({"file": ["a.mp4"], "desc": ["d"], "vid": ["x"]}).save_to_disk(str(rel))
    t = read_hf_dataset(rel, tmp_path / "videos", ManifestOptions(caption_column="desc"))
    assert t.vid == ["x"] and t.path == [str(tmp_path / "videos" / "a.mp4")]
    with pytest.raises(UsageError, match=r"no caption column .*--caption-column"):
        read_hf_dataset(rel)
    with pytest.raises(UsageError, match=r"has no column 'clip' .*--path-column"):
        read_hf_dataset(rel, opts=ManifestOptions(caption_column="desc", path_column="clip"))
    nameless = tmp_path / "nameless"
    datasets.Dataset.from_dict({"mp4": [VIDEO], "txt": ["t"]}).save_to_disk(str(nameless))
    with pytest.raises(UsageError, match="bytes without file names.*--id-column"):
        read_hf_dataset(nameless)
    splits = tmp_path / "splits"
    d = datasets.Dataset.from_dict({"video": ["a.mp4"], "caption": ["c"]})
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(splits))
    with pytest.raises(UsageError, match="holds the splits train, test: give one split's folder"):
        read_clips(splits)
    assert read_clips(splits / "train").vid == ["a"]


def test_hf_dataset_without_the_datasets_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(
        UsageError, match=r"needs the `datasets` package \(pip install 'carv-attrib\[datasets\]'\)"
    ):
        read_clips(tmp_path / "ds")


def test_sidecar_folder(tmp_path: Path, clips: list) -> None:
    folder = write_sidecars(clips, tmp_path / "side")
    t = read_clips(folder)
    assert t.vid == [v for v, _, _ in clips] and t.caption == [c for _, c, _ in clips]
    assert t.path == [str(folder / f"{v}.mp4") for v, _, _ in clips]
    (folder / "clip-1.txt").unlink()
    (folder / "extra.webm").write_bytes(VIDEO)
    with pytest.raises(UsageError, match=r"no caption for clip-1.mp4, extra.webm \(each video needs a .txt"):
        read_clips(folder)
