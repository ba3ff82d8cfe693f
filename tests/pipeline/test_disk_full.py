"""A full disk, for real: a small tmpfs holding a copy of a run, filled up to a few KiB, and the
public commands on it. Each gives one line naming the path and the space needed, exit 3, nothing
partly written that a rerun could take for finished, and the same command after freeing space
finishes the job with the numbers it would have given (issue 23, item 2).

Mounting a tmpfs needs root (CAP_SYS_ADMIN); elsewhere the tests skip, and `tests/test_space.py`
and `tests/test_atomic.py` still check the shapes and the clean-up with simulated errors.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import carv_attrib.pipeline.index as index_mod
from carv_attrib.cli.app import app
from carv_attrib.store.latents import iter_cached
from carv_attrib.store.run import RunDir


class SmallDisk:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def leave(self, free: int) -> None:
        """Fill the file system up to `free` bytes (rounded by tmpfs to pages)."""
        self.filler.unlink(missing_ok=True)
        avail = shutil.disk_usage(self.root).free
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT)
        try:
            os.posix_fallocate(fd, 0, max(1, avail - free))
        finally:
            os.close(fd)

    def free_up(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the simulated errors are tested elsewhere")
    try:
        yield SmallDisk(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file under root but the lock files (their content names the last holder)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (".lock", ".run.json.lock")
    }


def _cli(*args: str):
    r = CliRunner().invoke(app, list(args))
    return r


def _one_line(r, starts: str) -> str:
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 3, r.output
    assert len(lines) == 1 and lines[0].startswith(f"error: {starts}"), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


def test_index_that_cannot_fit_is_refused_before_any_write(disk: SmallDisk, featurized_run: Path) -> None:
    run = disk.root / "run"
    shutil.copytree(featurized_run, run)
    before = _files(run)
    disk.leave(8 * 1024)
    line = _one_line(_cli("index", str(run), "--precondition", "identity"), "the index of ")
    assert f"on the file system of {run}" in line and "it was not written" in line
    assert _files(run) == before and not list(run.glob(".index.tmp*"))


def test_faiss_write_that_fails_midway_keeps_the_old_index(
    disk: SmallDisk, featurized_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preflight bypassed (its estimate could be wrong): the FAISS file itself hits the full
    disk; the swap's temporary directory goes, the previous index stays live and unchanged."""
    run = disk.root / "run"
    shutil.copytree(featurized_run, run)
    before = _files(run)
    monkeypatch.setattr(index_mod, "check_space", lambda *a, **k: None)
    disk.leave(8 * 1024)
    line = _one_line(_cli("index", str(run), "--precondition", "identity"), "no space left on device writing")
    assert str(run / "index") in line
    assert _files(run) == before and not list(run.glob(".index.tmp*")) and not (run / ".index.old").exists()
    disk.free_up()
    r = _cli("index", str(run), "--precondition", "identity")
    assert r.exit_code == 0, r.output


def test_encode_on_a_full_disk_resumes_to_the_same_latents(
    disk: SmallDisk, demo_data: Path, tiny_model_dir: Path, encoded_run: Path
) -> None:
    run = disk.root / "run"
    args = [
        "encode", str(demo_data / "manifest.json"), "--videos", str(demo_data / "videos"),
        "-m", str(tiny_model_dir), "-r", str(run), "--frames", "9", "--size", "32x32", "--fps", "8",
        "--shard-size", "3", "--workers", "1", "--device", "cpu",
    ]  # fmt: skip
    disk.leave(16 * 1024)
    line = _one_line(_cli(*args), "no space left on device writing")
    assert f"{run}/latents/" in line and "it needs about" in line
    latents = run / "latents"
    for part in latents.glob("part-*.parquet"):  # every shard on disk is whole: it has its marker
        assert (latents / "_done" / f"{part.stem}.json").exists(), part
    assert not [p for p in run.rglob("*.tmp")]
    disk.free_up()
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    got = {c.vid: c.latent for c in iter_cached(RunDir(run))}
    want = {c.vid: c.latent for c in iter_cached(RunDir(encoded_run))}
    assert got.keys() == want.keys()
    for vid, lat in want.items():  # the same decode and VAE on the same machine: the same bytes
        assert got[vid].numpy().tobytes() == lat.numpy().tobytes(), vid


def test_score_output_on_a_full_disk_leaves_no_file(
    disk: SmallDisk, featurized_run: Path, demo_data: Path
) -> None:
    query = sorted((demo_data / "videos").glob("*.mp4"))[0]
    out = disk.root / "scores.json"
    disk.leave(1024)
    r = _cli(
        "score", "-r", str(featurized_run), str(query), "--null-prompt", "-o", str(out), "--device", "cpu"
    )
    line = _one_line(r, "no space left on device writing")
    assert str(out) in line
    assert sorted(p.name for p in disk.root.iterdir()) == ["filler"]
