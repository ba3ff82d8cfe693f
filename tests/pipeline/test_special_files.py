"""A directory, a named pipe (FIFO) and a socket among the videos (issue 23, item 3): `encode` never
opens them (a FIFO's open() blocks until a writer comes, in the main process, before any decode
timeout), records each as a `not_a_file` failure and encodes the other clips; `frames` on one is a
one-line usage error. The commands run in a subprocess with a timeout, so a regression fails instead
of hanging the suite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from carv_attrib.errors import EXIT_PARTIAL, EXIT_USAGE
from carv_attrib.store.shards import ShardStore
from carv_attrib.video.failures import FAILURE_KINDS

REPO = Path(__file__).resolve().parents[2]
LIMIT_S = 240  # the tiny encode takes seconds; a blocked open() would take for ever


def carv(*args: object, timeout: float = LIMIT_S) -> subprocess.CompletedProcess:
    """The CLI in a child process (this checkout's package), killed after `timeout` s."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "from carv_attrib.cli.app import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def odd_videos(tmp_path: Path, demo_data: Path) -> Iterator[tuple[Path, Path]]:
    """(manifest, videos): 3 demo clips plus a FIFO, a directory and a socket named as videos."""
    videos = tmp_path / "v"
    videos.mkdir()
    good = sorted((demo_data / "videos").glob("*.mp4"))[:3]
    for p in good:
        (videos / p.name).write_bytes(p.read_bytes())
    os.mkfifo(videos / "fifo.mp4")
    (videos / "folder.mp4").mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(videos / "sock.mp4"))  # a bound, listening-less socket: connect() would be refused
    rows = [{"vid": p.stem, "caption": "a clip"} for p in good]
    rows += [{"vid": v, "caption": "odd"} for v in ("fifo", "folder", "sock")]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(rows))
    try:
        yield manifest, videos
    finally:
        sock.close()


def test_encode_records_special_files_as_not_a_file_and_encodes_the_rest(
    odd_videos: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    manifest, videos = odd_videos
    run = tmp_path / "run"
    res = carv(
        "encode", manifest, "--videos", videos, "-m", tiny_model_dir, "--run", run,
        "--frames", 9, "--size", "32x32", "--device", "cpu", "--workers", 1, "--format", "json",
    )  # fmt: skip
    # 3 of 6 clips failed, above the default --max-failure-rate: the exit of any per-clip failure
    assert res.returncode == EXIT_PARTIAL, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["ok"], summary["failures"]) == (3, {"not_a_file": 3})
    rows = {r["vid"]: r for r in ShardStore(run, "latents").read_table().to_pylist()}
    assert {v: rows[v]["status"] for v in ("fifo", "folder", "sock")} == dict.fromkeys(
        ("fifo", "folder", "sock"), "not_a_file"
    )
    assert "a named pipe" in rows["fifo"]["error"] and "a directory" in rows["folder"]["error"]
    assert "a socket" in rows["sock"]["error"]
    # the dry run on the same manifest does not block either
    dry = carv(
        "encode", manifest, "--videos", videos, "-m", tiny_model_dir, "--run", tmp_path / "dry",
        "--frames", 9, "--size", "32x32", "--device", "cpu", "--dry-run", "--format", "json",
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr


def test_frames_on_a_fifo_is_one_line_and_exit_2(odd_videos: tuple[Path, Path]) -> None:
    _, videos = odd_videos
    for name, what in [("fifo.mp4", "a named pipe"), ("folder.mp4", "a directory"), ("sock.mp4", "a socket")]:
        res = carv("frames", videos / name, "--format", "json", timeout=120)
        assert res.returncode == EXIT_USAGE, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and what in lines[0] and lines[0].startswith("error:"), res.stderr


def test_not_a_file_is_a_listed_failure_kind() -> None:
    assert "not_a_file" in FAILURE_KINDS
