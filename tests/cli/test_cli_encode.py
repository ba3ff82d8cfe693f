from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from carv_attrib.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_and_version() -> None:
    r = invoke("--help")
    assert r.exit_code == 0 and "encode" in r.output
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.startswith("carv-attrib ")


def test_make_model_and_demo_data(tmp_path: Path) -> None:
    r = invoke("make-model", tmp_path / "m", "--preset", "tiny")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "model_index.json").exists()
    r = invoke("make-demo-data", tmp_path / "d", "--clips", "3")
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "d" / "manifest.json").read_text())) == 3
    assert invoke("make-model", tmp_path / "x", "--preset", "huge").exit_code == 2


def test_encode_status_and_mismatch(tmp_path: Path, tiny_model_dir: Path, demo_data: Path) -> None:
    base = [
        "encode",
        demo_data / "manifest.json",
        "--videos",
        demo_data / "videos",
        "-m",
        tiny_model_dir,
        "-r",
        tmp_path / "run",
        "--frames",
        "9",
        "--size",
        "32x32",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    r = invoke(*base, "--format", "json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["ok"] == 8 and summary["failed"] == 0
    r = invoke("status", tmp_path / "run", "--format", "json")
    assert r.exit_code == 0
    st = json.loads(r.stdout)
    assert st["latents"]["statuses"] == {"ok": 8} and st["manifest_clips"] == 8
    assert json.loads((tmp_path / "run" / "run.json").read_text())["invocations"][0]["command"] == "encode"
    # Another frame count on the same run: refused with exit 2 and a message naming the change.
    r = invoke(*base[:-6], "--frames", "13", "--workers", "0", "--device", "cpu")
    assert r.exit_code == 2
    assert "frames: 9 -> 13" in r.output and "--overwrite" in r.output


def test_bad_options_exit_2(tmp_path: Path, tiny_model_dir: Path, demo_data: Path) -> None:
    common = [
        demo_data / "manifest.json",
        "--videos",
        demo_data / "videos",
        "-m",
        tiny_model_dir,
        "-r",
        tmp_path / "r",
    ]
    r = invoke("encode", *common, "--frames", "16")
    assert r.exit_code == 2 and "1 + 4k" in r.output
    r = invoke("encode", *common, "--size", "30x30")
    assert r.exit_code == 2 and "multiples of 16" in r.output
    (tmp_path / "dup.json").write_text(
        json.dumps([{"vid": "a", "caption": "x"}, {"vid": "a", "caption": "y"}])
    )
    r = invoke("encode", tmp_path / "dup.json", *common[1:])
    assert r.exit_code == 2 and "duplicate ids" in r.output
    r = invoke("encode", *common[:3], "-m", tmp_path / "nomodel", "-r", tmp_path / "r2")
    assert r.exit_code == 2 and "cannot load" in r.output


def test_too_many_failures_exit_3(tmp_path: Path, tiny_model_dir: Path, demo_data: Path) -> None:
    rows = json.loads((demo_data / "manifest.json").read_text())[:2] + [{"vid": "gone", "caption": "x"}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    args = [
        "encode",
        tmp_path / "m.json",
        "--videos",
        demo_data / "videos",
        "-m",
        tiny_model_dir,
        "-r",
        tmp_path / "r",
        "--frames",
        "9",
        "--size",
        "32x32",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    r = invoke(*args)
    assert r.exit_code == 3 and "too many failures" in r.output
    r = invoke(*args, "--max-failure-rate", "0.5")
    assert r.exit_code == 0


def test_env_json() -> None:
    r = invoke("env", "--format", "json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["packages"]["torch"].startswith("2.")


def test_encode_takes_tar_shards_and_dataset_folders_without_videos(
    tmp_path: Path, tiny_model_dir: Path, demo_data: Path
) -> None:
    import tarfile

    from tests.store.shipped import add_bytes, demo_clips, write_shards, write_sidecars

    clips = demo_clips(demo_data, 3)
    pattern = write_shards(clips, tmp_path / "shards", shards=2)
    opts = ["-m", tiny_model_dir, "--frames", "9", "--size", "32x32", "--workers", "0", "--device", "cpu"]
    r = invoke("encode", pattern, *opts, "-r", tmp_path / "run", "--dry-run", "--format", "json")
    assert r.exit_code == 0, r.output
    dry = json.loads(r.stdout)
    assert dry["dry_run"] and dry["changes"]["added"] == 3 and dry["files"]["present"] == 3
    assert not (tmp_path / "run").exists()
    r = invoke("encode", pattern, *opts, "-r", tmp_path / "run", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ok"] == 3
    r = invoke(
        "encode", write_sidecars(clips, tmp_path / "side"), *opts, "-r", tmp_path / "run2", "--format", "json"
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] == 3, r.output
    with tarfile.open(tmp_path / "bad.tar", "w") as tf:
        add_bytes(tf, "k.mp4", clips[0][2].read_bytes())  # no caption
    r = invoke("encode", tmp_path / "bad.tar", *opts, "-r", tmp_path / "run3")
    assert r.exit_code == 2 and "no caption for key 'k'" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
