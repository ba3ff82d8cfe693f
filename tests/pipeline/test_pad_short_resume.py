"""`encode --pad-short` on an existing run (issue 24, item 5): the default policy fails a short clip
`too_short` and advises `--pad-short --retry-failed`; that rerun resumes the run (no --overwrite: no
encoded clip changes), encodes only the short clip, padded and marked (`padded_frames`), keeps the
run's fingerprint and records the policy change in latents/config.json. Turning it off again resumes
too; a real configuration change is still refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.errors import ConfigMismatchError
from carv_attrib.pipeline.encode import EncodeConfig, run_encode
from carv_attrib.store.shards import ShardStore, read_json


def short_clip(path: Path, frames: int = 6, rate: int = 8) -> Path:
    """`frames` frames at `rate` fps (6 at 8: 0.75 s, less than the 1 s 9 frames at 8 fps need)."""
    import av

    rng = np.random.default_rng(3)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(frames):
            img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def rows(run: Path) -> list[dict]:
    return ShardStore(run, "latents").read_table().to_pylist()


def test_pad_short_retry_resumes_without_overwrite(
    tmp_path: Path, tiny_model_dir: Path, demo_data: Path
) -> None:
    videos = tmp_path / "v"
    videos.mkdir()
    good = sorted((demo_data / "videos").glob("*.mp4"))[:2]
    for p in good:
        (videos / p.name).write_bytes(p.read_bytes())
    short_clip(videos / "short.mp4")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"vid": v, "caption": v} for v in [p.stem for p in good] + ["short"]]))
    run = tmp_path / "run"
    cfg = EncodeConfig(
        manifest=manifest, videos=videos, model=str(tiny_model_dir), run=run,
        frames=9, size="32x32", fps=8, workers=0, device="cpu",
    )  # fmt: skip
    first = run_encode(cfg)
    assert first.failures == {"too_short": 1}
    before = {r["vid"]: r for r in rows(run)}
    assert "--pad-short --retry-failed" in before["short"]["error"]
    assert {before[p.stem]["padded_frames"] for p in good} == {0}
    stored = read_json(run / "latents" / "config.json")

    cfg.pad_short, cfg.retry_failed = True, True  # the advice, as given: no --overwrite
    second = run_encode(cfg)
    assert (second.encoded, second.ok, second.failures) == (1, 3, {})
    after = read_json(run / "latents" / "config.json")
    assert after["fingerprint"] == stored["fingerprint"] == second.fingerprint
    assert after["config"]["pad_short"] is True and after["config"] | {"pad_short": False} == stored["config"]
    (change,) = after["policy_changes"]
    assert (change["key"], change["from"], change["to"], change["first_shard"]) == (
        "pad_short",
        False,
        True,
        1,
    )
    live = {r["vid"]: r for r in rows(run) if r["status"] == "ok"}
    assert live["short"]["padded_frames"] == 3 and live["short"]["frame_indices"][-4:] == [5, 5, 5, 5]
    for p in good:  # untouched: the very rows of the first encode
        assert live[p.stem]["latent_sha"] == before[p.stem]["latent_sha"]

    cfg.pad_short, cfg.retry_failed = False, False  # off again: resumes, nothing to encode, recorded
    third = run_encode(cfg)
    assert third.encoded == 0 and third.ok == 3
    assert [c["to"] for c in read_json(run / "latents" / "config.json")["policy_changes"]] == [True, False]

    cfg.frames = 13  # a policy that changes encoded clips is still the run's configuration
    with pytest.raises(ConfigMismatchError, match=r"frames: 9 -> 13") as exc:
        run_encode(cfg)
    assert "pad_short:" not in str(exc.value)


def test_dry_run_predicts_too_short_and_still_images(
    tmp_path: Path, tiny_model_dir: Path, demo_data: Path
) -> None:
    """The first-hour trap: --dry-run said "would encode 30" and 18 then failed too_short. Now the dry
    run probes each file's length (no decode) and says how many would fail, with advice that works."""
    from PIL import Image
    from typer.testing import CliRunner

    from carv_attrib.cli.app import app

    videos = tmp_path / "v"
    videos.mkdir()
    good = sorted((demo_data / "videos").glob("*.mp4"))[:2]
    for p in good:
        (videos / p.name).write_bytes(p.read_bytes())
    for k in range(3):
        short_clip(videos / f"short{k}.mp4", frames=3 + k)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(videos / "picture.mp4", format="PNG")
    vids = [p.stem for p in good] + [f"short{k}" for k in range(3)] + ["picture"]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"vid": v, "caption": v} for v in vids]))
    cfg = EncodeConfig(
        manifest=manifest, videos=videos, model=str(tiny_model_dir), run=tmp_path / "run",
        frames=9, size="32x32", fps=8, workers=0, device="cpu", dry_run=True,
    )  # fmt: skip
    length = run_encode(cfg).files["length"]
    assert (length["probed"], length["of"], length["sampled"]) == (6, 6, False)
    assert length["too_short"] == 3 and length["still_image"] == 1 and length["needs_s"] == 1.0
    padded = run_encode(dataclasses.replace(cfg, pad_short=True)).files["length"]
    assert padded["too_short"] == 0 and padded["still_image"] == 1
    args = ["encode", str(manifest), "--videos", str(videos), "-m", str(tiny_model_dir), "-r", str(tmp_path / "run"),
            "--frames", "9", "--size", "32x32", "--fps", "8", "--workers", "0", "--device", "cpu", "--dry-run"]  # fmt: skip
    r = CliRunner().invoke(app, args + ["--format", "human"])
    assert r.exit_code == 0, r.output
    assert "3 clips are too short" in r.stderr and "add --pad-short" in r.stderr
    assert "1 files are still images" in r.stderr and "6 of them probed for their length" in r.stderr
