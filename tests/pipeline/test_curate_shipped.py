"""`curate` on what datasets ship (`carv_attrib.store.subsets`): the subset of WebDataset shards, a saved
Hugging Face dataset or a sidecar folder is the same kind of input, and the input readers (what `encode`
reads) give exactly the selected clips from it, their members' bytes unchanged; refusals leave nothing."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from carv_attrib.config import CurateConfig
from carv_attrib.errors import UsageError
from carv_attrib.pipeline.curate import run_curate
from carv_attrib.store.inputs import detect_input, read_clips
from carv_attrib.store.manifest import clip_id_for
from carv_attrib.video.member import open_source
from tests.store.shipped import demo_clips, write_hf, write_shards, write_sidecars

pytest.importorskip("datasets")


def attribution(path: Path, vids: list[str]) -> Path:
    """One query whose top-k is `vids` in that order (scores 1.0, 0.9, ...)."""
    results = [
        {"rank": i, "clip_id": clip_id_for(v), "clip_id_str": str(clip_id_for(v)), "vid": v,
         "caption": f"cap {v}", "score": 1.0 - 0.1 * i}
        for i, v in enumerate(vids, start=1)
    ]  # fmt: skip
    doc = {"index": {"fingerprint": "f"}, "queries": [{"path": "q.mp4", "status": "ok", "results": results}]}
    path.write_text(json.dumps(doc))
    return path


def curate(source: object, out: Path, att: Path, **kw):
    return run_curate(CurateConfig(attributions=[att], manifest=source, out=out, **kw))


def clip_bytes(path: str) -> bytes:
    with open_source(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def clips(demo_data: Path) -> list[tuple[str, str, Path]]:
    return demo_clips(demo_data, 6)


def test_webdataset_subset_is_shards_of_the_kept_samples(tmp_path: Path, clips) -> None:
    pattern = write_shards(clips, tmp_path / "shards", shards=3)  # 2 samples per shard
    vids = [v for v, _, _ in clips]
    keep = [vids[0], vids[3], vids[2]]  # the top 50 % of the ranking below
    att = attribution(tmp_path / "a.json", keep + [vids[5], vids[1], vids[4]])
    s = curate(pattern, tmp_path / "keep", att, top=50)
    assert (s.kind, s.selected, s.written, s.shards) == ("webdataset", 3, 3, 3)
    out = tmp_path / "keep"
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    assert detect_input(out) == "webdataset"
    got = read_clips(pattern.replace(str(tmp_path / "shards"), str(out)))  # the same brace pattern
    assert sorted(got.vid) == sorted(keep)
    assert sorted(got.clip_id) == sorted(clip_id_for(v) for v in keep)
    ref = read_clips(pattern)
    ref_by = dict(zip(ref.vid, zip(ref.caption, ref.path)))
    for vid, caption, path in zip(got.vid, got.caption, got.path):
        assert caption == ref_by[vid][0]
        assert clip_bytes(path) == clip_bytes(ref_by[vid][1])  # the video bytes, unchanged
    # every member of a kept sample, in tar order, bytes as they were; none of a removed one
    for shard in sorted((tmp_path / "shards").iterdir()):
        with tarfile.open(shard) as src, tarfile.open(out / shard.name) as dst:
            want = [ti for ti in src.getmembers() if ti.name.split(".")[0] in keep]
            have = dst.getmembers()
            assert [ti.name for ti in have] == [ti.name for ti in want]
            for a, b in zip(want, have):
                assert src.extractfile(a).read() == dst.extractfile(b).read()
                assert (a.mtime, a.mode) == (b.mtime, b.mode)
    with tarfile.open(out / "00002.tar") as tf:  # clips 4, 5: none kept, an empty shard
        assert tf.getmembers() == []


def test_hf_dataset_subset_is_the_selected_rows(tmp_path: Path, clips) -> None:
    import datasets

    vids = [v for v, _, _ in clips]
    keep = [vids[4], vids[1]]
    att = attribution(tmp_path / "a.json", keep + [vids[0], vids[2]])
    for form in ("bytes", "dict", "path"):
        src = write_hf(clips, tmp_path / f"hf-{form}", form)
        out = tmp_path / f"keep-{form}"
        s = curate(src, out, att, top=50)
        assert (s.kind, s.written) == ("hf-dataset", 2), form
        assert detect_input(out) == "hf-dataset"
        got = read_clips(out)
        assert sorted(got.clip_id) == sorted(clip_id_for(v) for v in keep), form
        ref = read_clips(src)
        ref_by = dict(zip(ref.vid, ref.path))
        assert [v for v in ref.vid if v in keep] == got.vid  # rows in the dataset's order
        for vid, path in zip(got.vid, got.path):
            assert clip_bytes(path) == clip_bytes(ref_by[vid]), form
        whole, sub = datasets.load_from_disk(str(src)), datasets.load_from_disk(str(out))
        assert sub.column_names == whole.column_names and len(sub) == 2


def test_hf_dataset_relative_paths_travel_with_the_subset(tmp_path: Path, clips) -> None:
    import datasets

    src = tmp_path / "hf"
    (src / "clips").mkdir(parents=True)
    for vid, _, path in clips:
        (src / "clips" / f"{vid}.mp4").write_bytes(path.read_bytes())
    # saved first, then the videos placed beside it under clips/ (relative to the dataset folder)
    datasets.Dataset.from_dict(
        {"video": [f"clips/{v}.mp4" for v, _, _ in clips], "caption": [c for _, c, _ in clips]}
    ).save_to_disk(str(tmp_path / "tmp-hf"))
    for p in (tmp_path / "tmp-hf").iterdir():
        os.replace(p, src / p.name)
    vids = [v for v, _, _ in clips]
    att = attribution(tmp_path / "a.json", [vids[2], vids[0]])
    curate(src, tmp_path / "keep", att, top=50)
    got = read_clips(tmp_path / "keep")
    assert got.vid == [vids[2]]
    assert got.path == [str(tmp_path / "keep" / "clips" / f"{vids[2]}.mp4")]
    assert Path(got.path[0]).read_bytes() == (src / "clips" / f"{vids[2]}.mp4").read_bytes()


def test_sidecar_folder_subset_links_videos_and_copies_captions(tmp_path: Path, clips) -> None:
    src = write_sidecars(clips, tmp_path / "folder")
    vids = [v for v, _, _ in clips]
    (src / f"{vids[1]}.json").write_text('{"fps": 8}')  # another sidecar of a kept clip travels too
    att = attribution(tmp_path / "a.json", [vids[1], vids[3], vids[0], vids[5]])
    s = curate(src, tmp_path / "keep", att, top=50)
    out = tmp_path / "keep"
    assert (s.kind, s.written, s.files) == ("folder", 2, 5)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{vids[1]}.mp4", f"{vids[1]}.txt", f"{vids[1]}.json", f"{vids[3]}.mp4", f"{vids[3]}.txt"]
    )
    got = read_clips(out)
    assert sorted(got.vid) == sorted([vids[1], vids[3]])
    assert os.path.samefile(out / f"{vids[1]}.mp4", src / f"{vids[1]}.mp4")  # a hard link
    (out / f"{vids[1]}.txt").write_text("recaptioned")
    assert (src / f"{vids[1]}.txt").read_text() == clips[1][1] + "\n"  # the input is never changed


def test_refusals_write_nothing(tmp_path: Path, clips) -> None:
    pattern = write_shards(clips, tmp_path / "shards", shards=2)
    vids = [v for v, _, _ in clips]
    att = attribution(tmp_path / "a.json", vids)
    out = tmp_path / "keep"
    out.mkdir()
    (out / "mine.txt").write_text("something of the user's")
    with pytest.raises(UsageError, match="already exists and is not empty; pass --overwrite"):
        curate(pattern, out, att, top=50, csv=tmp_path / "agg.csv")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and not (tmp_path / "agg.csv").exists()
    with pytest.raises(UsageError, match="overlaps the input"):
        curate(tmp_path / "shards", tmp_path / "shards", att, top=50, overwrite=True)
    with pytest.raises(UsageError, match="is a file"):
        curate(pattern, tmp_path / "a.json", att, top=50)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000.tar", "00001.tar"]
    s = curate(pattern, out, att, top=50, overwrite=True)  # --overwrite replaces the folder whole
    assert s.written == 3 and sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries


def test_a_failed_write_leaves_no_partial_subset(tmp_path: Path, clips, monkeypatch) -> None:
    from carv_attrib.store import subsets

    pattern = write_shards(clips, tmp_path / "shards", shards=2)
    att = attribution(tmp_path / "a.json", [v for v, _, _ in clips])
    calls = {"n": 0}
    real = subsets.tar_members

    def second_shard_fails(path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise UsageError(f"{path} is not a readable tar file (simulated)")
        return real(path)

    monkeypatch.setattr(subsets, "tar_members", second_shard_fails)
    with pytest.raises(UsageError, match="simulated"):
        curate(pattern, tmp_path / "keep", att, top=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "shards"]


@pytest.mark.parametrize("form", ["webdataset", "hf-bytes", "folder"])
def test_the_curated_subset_encodes_to_exactly_the_selected_clips(
    tmp_path: Path, clips, tiny_model_dir: Path, form: str
) -> None:
    from carv_attrib.pipeline.encode import EncodeConfig, run_encode
    from carv_attrib.store.shards import ShardStore

    if form == "webdataset":
        source = write_shards(clips, tmp_path / "in", shards=2)
        subset = source.replace(str(tmp_path / "in"), str(tmp_path / "keep"))
    elif form == "hf-bytes":
        source, subset = str(write_hf(clips, tmp_path / "in", "bytes")), str(tmp_path / "keep")
    else:
        source, subset = str(write_sidecars(clips, tmp_path / "in")), str(tmp_path / "keep")
    vids = [v for v, _, _ in clips]
    att = attribution(tmp_path / "a.json", [vids[5], vids[0], vids[2], vids[1]])
    curate(source, tmp_path / "keep", att, bottom=50)  # the bottom half of the ranking: 2, 1
    s = run_encode(
        EncodeConfig(
            manifest=subset, model=str(tiny_model_dir), run=tmp_path / "run", frames=9, size="32x32", fps=8,
            device="cpu", workers=0,
        )
    )  # fmt: skip
    assert (s.total, s.ok) == (2, 2), form
    table = ShardStore(tmp_path / "run", "latents").read_table().to_pylist()
    assert sorted(r["clip_id"] for r in table) == sorted(clip_id_for(v) for v in (vids[2], vids[1]))


def test_the_cli_names_the_subset_and_refuses_in_one_line(tmp_path: Path, clips) -> None:
    from typer.testing import CliRunner

    from carv_attrib.cli.app import app

    src = write_sidecars(clips, tmp_path / "folder")
    att = attribution(tmp_path / "a.json", [v for v, _, _ in clips])

    def invoke(*args):
        return CliRunner().invoke(app, ["curate", str(att), "--manifest", str(src), *map(str, args)])

    r = invoke("-o", tmp_path / "keep", "--top", "50", "--format", "human")
    assert r.exit_code == 0, r.output
    assert "3 selected, 3 clips (folder, 6 files) -> " in r.output
    r = invoke("-o", tmp_path / "keep", "--top", "50", "--format", "json")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "already exists and is not empty; pass --overwrite" in r.output and "Traceback" not in r.output
    r = invoke("-o", tmp_path / "keep", "--top", "50", "--format", "json", "--overwrite")
    assert r.exit_code == 0 and json.loads(r.stdout)["kind"] == "folder", r.output


def test_exclude_writes_every_clip_but_the_selected(tmp_path: Path, clips) -> None:
    vids = [v for v, _, _ in clips]
    att = attribution(tmp_path / "a.json", [vids[0], vids[1], vids[2], vids[3]])  # 4, 5: never returned
    pattern = write_shards(clips, tmp_path / "shards", shards=2)
    s = curate(pattern, tmp_path / "clean", att, bottom=50, exclude=True)  # drop vids 2, 3
    assert s.exclude and s.selected == 2 and s.written == 4
    assert sorted(read_clips(tmp_path / "clean").vid) == sorted([vids[0], vids[1], vids[4], vids[5]])
    folder = write_sidecars(clips, tmp_path / "folder")
    curate(folder, tmp_path / "clean-folder", att, bottom=50, exclude=True)
    assert sorted(read_clips(tmp_path / "clean-folder").vid) == sorted([vids[0], vids[1], vids[4], vids[5]])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"vid": v, "caption": c}) + "\n" for v, c, _ in clips))
    m = curate(manifest, tmp_path / "clean.jsonl", att, bottom=50, exclude=True)
    assert m.written == 4
    got = [json.loads(x)["vid"] for x in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert got == [vids[0], vids[1], vids[4], vids[5]]


def test_a_dataset_dict_of_one_split_gives_that_split(tmp_path: Path, clips) -> None:
    import datasets

    data = {"vid": [v for v, _, _ in clips], "mp4": [p.read_bytes() for _, _, p in clips]}
    data["caption"] = [c for _, c, _ in clips]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(data)}).save_to_disk(str(tmp_path / "dd"))
    vids = [v for v, _, _ in clips]
    att = attribution(tmp_path / "a.json", [vids[3], vids[0]])
    assert curate(tmp_path / "dd", tmp_path / "keep", att, top=50).written == 1
    assert read_clips(tmp_path / "keep").vid == [vids[3]]
