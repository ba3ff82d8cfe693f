"""`encode --dry-run` at VidGen-1M scale (issue 23, item 5): it stats the files and reads none, names
missing and non-regular files first, estimates time only for files present; `identify_files` keeps
a bounded number of futures in flight however many rows there are."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.store import sources
from tests.pipeline.worlds import World


def _no_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Any) -> str:
        raise AssertionError(f"a dry run hashed {path}")

    monkeypatch.setattr(sources, "file_sha256", refuse)


def test_a_dry_run_names_missing_files_first_and_hashes_nothing(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    present = len(world.rows)
    world.rows += [{"vid": f"gone-{i}", "caption": f"not there {i}"} for i in range(7)]
    os.mkdir(world.videos / "folder.mp4")
    world.rows.append({"vid": "folder", "caption": "a directory"})
    world.write()
    _no_hashing(monkeypatch)
    s = world.encode(tmp_path / "run", dry_run=True)
    assert s.files["hashed"] is False
    assert (s.files["missing"], s.files["not_a_file"], s.files["present"]) == (7, 1, present)
    assert [Path(p).name for p in s.files["missing_examples"]] == [f"gone-{i}.mp4" for i in range(5)]
    assert s.changes["to_encode"] == present + 8 and s.files["to_encode_present"] == present
    assert s.files["to_encode_unhashed"] == present and not (tmp_path / "run").exists()

    r = CliRunner().invoke(
        app,
        [str(a) for a in ("encode", world.manifest, "--videos", world.videos, "-m", world.model)]
        + [
            "-r",
            str(tmp_path / "run"),
            "--frames",
            "9",
            "--size",
            "32x32",
            "--device",
            "cpu",
            "--dry-run",
            "--format",
            "human",
        ],
    )
    assert r.exit_code == 0, r.output
    out = " ".join(r.stderr.split())
    assert (
        out.index("7 video files missing")
        < out.index("1 video files not regular")
        < out.index("would encode")
    )
    assert "gone-0.mp4" in out and "and 2 more" in out
    assert f"for the {present} whose file is present" in out and "no file was read or hashed" in out


def test_a_dry_run_after_an_encode_matches_by_size_and_mtime(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    world.encode(run)
    _no_hashing(monkeypatch)
    s = world.encode(run, dry_run=True)
    assert s.changes["to_encode"] == 0 and s.changes["unchanged"] == len(world.rows) and s.estimated_s == 0
    touched = world.videos / f"{world.rows[0]['vid']}.mp4"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, another mtime
    s = world.encode(run, dry_run=True)
    assert (s.changes["to_encode"], s.changes["changed"], s.files["to_encode_unhashed"]) == (1, 1, 1)
    monkeypatch.undo()
    assert world.encode(run).encoded == 0  # the real encode hashes it: the same bytes, nothing to do


def test_identify_files_keeps_few_futures_in_flight(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    submitted = [0]

    class Counting(ThreadPoolExecutor):
        def submit(self, *a: Any, **kw: Any) -> Any:
            submitted[0] += 1
            return super().submit(*a, **kw)

    monkeypatch.setattr(sources, "ThreadPoolExecutor", Counting)
    (tmp_path / "a.mp4").write_bytes(b"x")
    paths = [str(tmp_path / ("a.mp4" if i % 1000 == 0 else f"m{i}.mp4")) for i in range(50_000)]
    cap = sources._HASH_THREADS * sources._IN_FLIGHT
    worst = 0
    for n, _ in enumerate(sources.bounded_map(sources._stat, paths), start=1):
        worst = max(worst, submitted[0] - n // sources._CHUNK)
    assert worst <= cap + 1 and submitted[0] == -(-len(paths) // sources._CHUNK)
    ids = sources.identify_files(paths)
    assert [i.missing for i in ids] == [i % 1000 != 0 for i in range(len(paths))]
    assert ids[0].sha256 == sources.file_sha256(tmp_path / "a.mp4")
