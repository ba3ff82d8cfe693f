from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from carv_attrib.errors import ConfigMismatchError
from carv_attrib.models.wan import encode_prompts, encode_video, load_wan
from carv_attrib.pipeline.encode import EncodeConfig, run_encode
from carv_attrib.store.latents import iter_cached
from carv_attrib.store.shards import ShardStore
from carv_attrib.video.decode import FramePolicy, decode_clip, frames_to_tensor
from tests.pipeline.sigkill import sigkill_after_first_shard

POLICY = FramePolicy(frames=9, height=32, width=32, fps=8)
FRAMES = {"frames": 9, "size": "32x32", "fps": 8}  # POLICY as encode options


def rows_of(run: Path) -> list[dict]:
    return ShardStore(run, "latents").read_table().sort_by("clip_id").to_pylist()


def test_cached_latents_and_text_match_direct_encoding(
    encoded_run: Path, tiny_model_dir: Path, demo_data: Path
) -> None:
    wan = load_wan(str(tiny_model_dir), ("vae", "text_encoder", "tokenizer"))
    manifest = {r["vid"]: r["caption"] for r in json.loads((demo_data / "manifest.json").read_text())}
    clips = list(iter_cached(encoded_run))
    assert len(clips) == 8
    for c in clips[:3]:
        frames = decode_clip(str(demo_data / "videos" / f"{c.vid}.mp4"), POLICY).frames
        z = encode_video(wan.vae, frames_to_tensor(frames)[None])[0]
        assert c.latent.shape == z.shape == (16, 3, 4, 4)
        torch.testing.assert_close(c.latent, z, rtol=1e-5, atol=1e-5)
        (emb,) = encode_prompts(wan, [manifest[c.vid]])
        torch.testing.assert_close(c.text_emb, emb)
    row = rows_of(encoded_run)[0]
    assert row["frame_indices"] == list(range(9)) and row["fps"] == 8.0 and row["source_fps"] == 8.0


def test_config_and_provenance_recorded(encoded_run: Path) -> None:
    store = ShardStore(encoded_run, "latents")
    cfg = store.read_config()
    assert cfg["config"]["frames"] == 9 and cfg["config"]["height"] == 32
    assert set(cfg["config"]["model"]["components"]) == {"vae", "text_encoder", "tokenizer"}
    assert store.read_provenance()["fingerprint"] == cfg["fingerprint"]
    stats = store.read_stats()
    assert [s["shard"] for s in stats] == [0, 1, 2] and sum(s["clips"] for s in stats) == 8


def test_bad_files_are_recorded_failures_and_others_encode(
    tmp_path: Path, tiny_model_dir: Path, demo_data: Path
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    good = sorted((demo_data / "videos").glob("*.mp4"))[:3]
    for p in good:
        (videos / p.name).write_bytes(p.read_bytes())
    data = good[0].read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(4000))
    rows = [{"vid": p.stem, "caption": "a clip"} for p in good]
    rows += [{"vid": v, "caption": "bad"} for v in ("truncated", "zero", "corrupt", "missing")]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    s = run_encode(
        EncodeConfig(
            manifest=tmp_path / "m.json",
            videos=videos,
            model=str(tiny_model_dir),
            run=tmp_path / "run",
            **FRAMES,
            shard_size=4,
            workers=2,
            device="cpu",
        )
    )
    assert (s.total, s.ok, s.failed) == (7, 3, 4)
    assert s.failures == {"decode_error": 2, "truncated": 1, "missing": 1}
    by_vid = {r["vid"]: r for r in rows_of(tmp_path / "run")}
    assert by_vid["missing"]["status"] == "missing" and "not found" in by_vid["missing"]["error"]
    assert by_vid["zero"]["error"].startswith("file is empty")
    assert by_vid["truncated"]["latent"] is None
    assert all(by_vid[p.stem]["status"] == "ok" for p in good)


def test_rerun_with_another_config_is_refused_unless_overwrite(
    tmp_path: Path, tiny_model_dir: Path, demo_data: Path
) -> None:
    cfg = EncodeConfig(
        manifest=demo_data / "manifest.json",
        videos=demo_data / "videos",
        model=str(tiny_model_dir),
        run=tmp_path / "run",
        **FRAMES,
        shard_size=4,
        workers=0,
        device="cpu",
    )
    run_encode(cfg)
    again = run_encode(cfg)
    assert again.encoded == 0 and again.shards_written == 0 and again.changes["unchanged"] == 8
    cfg.frames = 13
    with pytest.raises(ConfigMismatchError, match=r"frames: 9 -> 13"):
        run_encode(cfg)
    cfg.overwrite = True
    s = run_encode(cfg)
    assert s.shards_written == 2 and rows_of(tmp_path / "run")[0]["latent_shape"] == [16, 4, 4, 4]


SLOW_ENCODE = textwrap.dedent(
    """
    import sys, time
    from carv_attrib.pipeline.encode import EncodeConfig, run_encode

    def slow(event, info):
        if event == "shard":
            time.sleep(float(sys.argv[4]))  # leaves time to be killed between shards

    run_encode(EncodeConfig(manifest=sys.argv[1], videos=sys.argv[2], model=sys.argv[3], run=sys.argv[5],
                            frames=9, size="32x32", fps=8, shard_size=2,
                            workers=1, device="cpu"), progress=slow)
    """
)


def _encode_subprocess(demo_data: Path, model: Path, out: Path, pause: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-c",
        SLOW_ENCODE,
        str(demo_data / "manifest.json"),
        str(demo_data / "videos"),
        str(model),
        str(pause),
        str(out),
    ]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_after_sigkill_gives_the_same_rows(
    tmp_path: Path, tiny_model_dir: Path, demo_data: Path
) -> None:
    killed = tmp_path / "killed"
    proc = _encode_subprocess(demo_data, tiny_model_dir, killed, pause=2.0)
    done = ShardStore(killed, "latents")
    sigkill_after_first_shard(proc, done)
    finished_before = done.done_shards()
    assert 1 <= len(finished_before) < 4, "killed mid-run"
    # Resume in a second process, then compare against an uninterrupted run.
    assert _encode_subprocess(demo_data, tiny_model_dir, killed, pause=0).wait() == 0
    clean = tmp_path / "clean"
    assert _encode_subprocess(demo_data, tiny_model_dir, clean, pause=0).wait() == 0
    a, b = rows_of(killed), rows_of(clean)
    assert [r["clip_id"] for r in a] == [r["clip_id"] for r in b]
    assert len({r["clip_id"] for r in a}) == len(a) == 8, "none lost or duplicated"
    for ra, rb in zip(a, b):
        assert ra["status"] == rb["status"] == "ok"
        za = np.frombuffer(ra["latent"], np.float32)
        zb = np.frombuffer(rb["latent"], np.float32)
        np.testing.assert_allclose(za, zb, rtol=1e-6, atol=1e-6)
        assert ra["text_emb"] == rb["text_emb"]
    assert not list((killed / "latents").glob(".*.tmp"))
    assert sum(pq.read_metadata(p).num_rows for p in (killed / "latents").glob("part-*.parquet")) == 8


def test_vae_tiling_is_decided_once_recorded_and_followed_by_score(
    tmp_path: Path, tiny_model_dir: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carv_attrib.models import wan as wan_mod
    from carv_attrib.store.run import EncodeFacts, RunDir

    assert wan_mod.vae_tiling_decision("on", 32, 32, 1, "float32", "cpu")
    assert not wan_mod.vae_tiling_decision("off", 4096, 4096, 64, "float32", "cpu")
    monkeypatch.setattr(wan_mod, "device_free_bytes", lambda device: 1e9)  # 1 GB free
    assert wan_mod.vae_tiling_decision("auto", 480, 832, 1, "float32", "cpu")  # ~8 GB: tile
    assert not wan_mod.vae_tiling_decision("auto", 64, 64, 1, "float32", "cpu")
    cfg = EncodeConfig(
        manifest=demo_data / "manifest.json", videos=demo_data / "videos", model=str(tiny_model_dir),
        run=tmp_path / "run", **FRAMES, workers=0, device="cpu", vae_tiling="on",
    )  # fmt: skip
    run_encode(cfg)
    lat = RunDir(tmp_path / "run").latents.read_config()["config"]
    assert lat["vae_tiling"] is True and EncodeFacts.from_latents_config(lat).vae_tiling
    cfg.vae_tiling = "off"
    with pytest.raises(ConfigMismatchError, match="vae_tiling"):
        run_encode(cfg)  # never mixed into one run


def test_captions_past_512_tokens_are_encoded_truncated_and_counted(
    tmp_path: Path, tiny_model_dir: Path, demo_data: Path
) -> None:
    """Two 2,000-word captions that differ after word 1,000 are embedded as WanPipeline embeds them (their
    first 512 UMT5 tokens: one embedding), and the run says so: a count, the longest length and a
    warning in the summary (`--format json`), the same warning on the terminal (`--format human`)."""
    from typer.testing import CliRunner

    from carv_attrib.cli.app import app

    clips = sorted((demo_data / "videos").glob("*.mp4"))[:3]
    words = " ".join(["a red square moves over a grey field"] * 125)  # 1,000 words
    long_a = words + " " + " ".join(["then it turns blue"] * 250)  # 2,000 words
    long_b = words + " " + " ".join(["then a dog runs in"] * 200)
    rows = [{"vid": clips[0].stem, "caption": long_a}, {"vid": clips[1].stem, "caption": long_b}]
    rows.append({"vid": clips[2].stem, "caption": "a short caption"})
    (tmp_path / "m.json").write_text(json.dumps(rows))
    common = ["-m", tiny_model_dir, "--videos", demo_data / "videos", "--frames", "9", "--size", "32x32"]
    common += ["--workers", "0", "--device", "cpu"]
    r = CliRunner().invoke(
        app,
        [
            str(a)
            for a in ["encode", tmp_path / "m.json", "-r", tmp_path / "run", *common, "--format", "json"]
        ],
    )
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["ok"] == 3 and s["truncated_captions"] == 2 and s["truncated_tokens_max"] > 2000
    (warning,) = s["warnings"]
    assert warning.startswith(
        "2 captions exceed 512 UMT5 tokens and were truncated as WanPipeline truncates them"
    )
    by_vid = {r["vid"]: r for r in rows_of(tmp_path / "run")}
    a, b = by_vid[clips[0].stem], by_vid[clips[1].stem]
    assert a["text_len"] == b["text_len"] == 512 and a["text_emb"] == b["text_emb"]
    assert by_vid[clips[2].stem]["text_len"] < 512
    r = CliRunner().invoke(
        app,
        [
            str(a)
            for a in ["encode", tmp_path / "m.json", "-r", tmp_path / "run2", *common, "--format", "human"]
        ],
    )
    assert r.exit_code == 0, r.output
    assert "warning: 2 captions exceed 512 UMT5 tokens" in " ".join(r.stderr.split())
    r = CliRunner().invoke(  # nothing to encode: no caption embedded, none counted
        app,
        [
            str(a)
            for a in ["encode", tmp_path / "m.json", "-r", tmp_path / "run", *common, "--format", "json"]
        ],
    )
    again = json.loads(r.stdout)
    assert again["encoded"] == 0 and again["truncated_captions"] == 0 and again["warnings"] == []
