"""`encode` on what datasets ship (`carv_attrib.store.inputs`): the same clips as a manifest + videos,
as WebDataset tar shards, as a saved Hugging Face dataset (paths, bytes, {bytes, path}) and as a
folder with .txt sidecars encode to bitwise-equal latents under the same ids and source keys; bad
members are recorded per-clip failures."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from carv_attrib.errors import UsageError
from carv_attrib.pipeline.encode import EncodeConfig, run_encode
from carv_attrib.store.shards import ShardStore
from tests.store.shipped import (
    add_bytes,
    demo_clips,
    write_hf,
    write_manifest,
    write_shards,
    write_sidecars,
)

pytest.importorskip("datasets")

SMALL = dict(frames=9, size="32x32", fps=8, shard_size=3, device="cpu")


def encode(source: object, model: Path, run: Path, videos: Path | None = None, workers: int = 0, **kw):
    return run_encode(
        EncodeConfig(
            manifest=source, videos=videos, model=str(model), run=run, workers=workers, **SMALL, **kw
        )
    )


def rows(run: Path) -> dict[str, dict]:
    return {r["vid"]: r for r in ShardStore(run, "latents").read_table().to_pylist()}


def committed(run: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    return {r["vid"]: r for r in pq.read_table(run / "manifest" / "clips.parquet").to_pylist()}


def test_every_shipped_form_encodes_to_the_same_bits(
    tmp_path: Path, demo_data: Path, tiny_model_dir: Path
) -> None:
    clips = demo_clips(demo_data, 5)
    forms = {
        "manifest": (write_manifest(clips, tmp_path / "m" / "train.json"), demo_data / "videos"),
        "webdataset": (write_shards(clips, tmp_path / "shards", shards=2), None),
        "hf-paths": (write_hf(clips, tmp_path / "hf-paths", "path"), None),
        "hf-bytes": (write_hf(clips, tmp_path / "hf-bytes", "bytes"), None),
        "hf-dicts": (write_hf(clips, tmp_path / "hf-dicts", "dict"), None),
        "sidecars": (write_sidecars(clips, tmp_path / "folder"), None),
    }
    got = {}
    for name, (source, videos) in forms.items():
        workers = 1 if name == "webdataset" else 0  # members travel to decode workers as their path string
        dry = encode(source, tiny_model_dir, tmp_path / "runs" / name, videos, dry_run=True)
        assert dry.changes["to_encode"] == 5 and dry.files["present"] == 5, (name, dry.files)
        assert dry.files["length"]["probed"] == 5 and dry.files["length"]["too_short"] == 0, name
        s = encode(source, tiny_model_dir, tmp_path / "runs" / name, videos, workers=workers)
        assert (s.total, s.ok, s.failed) == (5, 5, 0), (name, s.failures, s.examples)
        got[name] = (rows(tmp_path / "runs" / name), committed(tmp_path / "runs" / name))
    ref_rows, ref_manifest = got["manifest"]
    assert sorted(ref_rows) == sorted(v for v, _, _ in clips)
    for name, (r, m) in got.items():
        assert sorted(r) == sorted(ref_rows), name
        for vid, ref in ref_rows.items():
            assert r[vid]["clip_id"] == ref["clip_id"], (name, vid)
            assert r[vid]["source_key"] == ref["source_key"], (name, vid)
            assert r[vid]["source_sha256"] == ref["source_sha256"], (name, vid)
            assert r[vid]["latent"] == ref["latent"], (name, vid)  # bitwise
            assert r[vid]["text_emb"] == ref["text_emb"], (name, vid)
            assert r[vid]["latent_sha"] == ref["latent_sha"], (name, vid)
            assert r[vid]["decoder"] == ref["decoder"] == "decord", (name, vid)  # a member's bytes, in memory
            assert m[vid]["source_key"] == ref_manifest[vid]["source_key"], (name, vid)
    tar_paths = [m["path"] for m in got["webdataset"][1].values()]
    assert all(p.startswith("tar:") for p in tar_paths)  # read in place: nothing was unpacked
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000.tar", "00001.tar"]


def test_a_rerun_on_the_same_shards_encodes_nothing_and_a_rewritten_shard_only_its_changes(
    tmp_path: Path, demo_data: Path, tiny_model_dir: Path
) -> None:
    clips = demo_clips(demo_data, 3)
    pattern = write_shards(clips, tmp_path / "shards", shards=1)
    run = tmp_path / "run"
    assert encode(pattern, tiny_model_dir, run).encoded == 3
    again = encode(pattern, tiny_model_dir, run)
    assert again.encoded == 0 and again.changes["unchanged"] == 3
    # the shard rewritten with the members in another order: offsets move, contents do not
    write_shards(clips[::-1], tmp_path / "shards", shards=1)
    moved = encode(pattern, tiny_model_dir, run)
    assert moved.encoded == 0 and moved.changes["unchanged"] == 3


def test_bad_members_are_recorded_failures_and_the_rest_encodes(
    tmp_path: Path, demo_data: Path, tiny_model_dir: Path
) -> None:
    clips = demo_clips(demo_data, 3)
    shards = tmp_path / "shards"
    write_shards(clips, shards, shards=1)
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    with tarfile.open(shards / "00001.tar", "w") as tf:
        add_bytes(tf, "notvideo.mp4", b"this is a caption file, not a video\n" * 20)
        add_bytes(tf, "notvideo.txt", b"a text member posing as a video")
        add_bytes(tf, "picture.jpg", png)
        add_bytes(tf, "picture.txt", b"a picture, not a clip")
        add_bytes(tf, "novideo.txt", b"a caption without its video")
    # a third shard cut short inside its second video (an interrupted download)
    big = clips[0][2].read_bytes()
    with tarfile.open(shards / "00002.tar", "w") as tf:
        add_bytes(tf, "whole.mp4", big)
        add_bytes(tf, "whole.txt", b"intact")
        add_bytes(tf, "cut.txt", b"cut short")
        add_bytes(tf, "cut.mp4", big)
    data = (shards / "00002.tar").read_bytes()
    with tarfile.open(shards / "00002.tar") as tf:
        cut = tf.getmember("cut.mp4")
    (shards / "00002.tar").write_bytes(data[: cut.offset_data + cut.size // 2])

    dry = encode(shards, tiny_model_dir, tmp_path / "run", dry_run=True)  # a folder of shards
    assert dry.dry_run and dry.changes["to_encode"] == 8
    assert dry.files["missing"] == 1 and dry.files["length"]["still_image"] == 1

    # batches of one: a clip's latent bits depend on which clips share its VAE batch
    s = encode(shards, tiny_model_dir, tmp_path / "run", max_failure_rate=1.0, batch_size=1)
    r = rows(tmp_path / "run")
    assert s.total == 8 and s.ok == 4, s.failures
    assert {v: r[v]["status"] for v in ("notvideo", "picture", "novideo", "cut")} == {
        "notvideo": "decode_error",
        "picture": "still_image",
        "novideo": "missing",
        "cut": "truncated",
    }
    assert "no video member: novideo.mp4 in" in r["novideo"]["error"] and "00001.tar" in r["novideo"]["error"]
    assert r["whole"]["status"] == "ok" and r["whole"]["latent"] == r[clips[0][0]]["latent"]


def test_input_problems_are_one_usage_error(tmp_path: Path, demo_data: Path, tiny_model_dir: Path) -> None:
    clips = demo_clips(demo_data, 2)
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tf:
        add_bytes(tf, "a.mp4", clips[0][2].read_bytes())
        add_bytes(tf, "a.json", json.dumps({"url": "x"}).encode())  # metadata without a caption
    with pytest.raises(UsageError, match=r"no caption for key 'a' in .*00000.tar.*\{key\}.txt"):
        encode(shards / "00000.tar", tiny_model_dir, tmp_path / "run")
    (shards / "00001.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UsageError, match="00001.tar is not a readable tar file"):
        encode(str(shards / "0000[1].tar"), tiny_model_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any write
