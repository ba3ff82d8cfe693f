"""One writer per run (`carv_attrib.store.lock`): another process's lock, held at a file handshake."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from carv_attrib.errors import EXIT_USAGE, RunLockedError
from carv_attrib.store.lock import holder, holds, is_written, lock_path, run_lock
from tests.store.lock_child import Child


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    child = Child(tmp_path, "hold", run).ready()
    assert is_written(run)
    with pytest.raises(RunLockedError) as err:
        with run_lock(run, "index"):
            pytest.fail("took a lock another process holds")
    msg = str(err.value)
    assert err.value.exit_code == EXIT_USAGE and "\n" not in msg
    assert f"carv-attrib featurize (pid {child.proc.pid} on " in msg and "--wait" in msg
    child.go()
    assert not is_written(run)
    with run_lock(run, "index"):  # released with its holder
        assert holds(run) and f"pid {__import__('os').getpid()} " in holder(run)


def test_wait_blocks_until_the_holder_is_done(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    child = Child(tmp_path, "hold", run).ready()
    asked, got = threading.Event(), threading.Event()

    def waiter() -> None:
        asked.set()
        with run_lock(run, "index", wait=True):
            got.set()

    t = threading.Thread(target=waiter)
    t.start()
    asked.wait()
    assert not got.wait(0.5), "took the lock while the child held it"
    child.go()
    t.join(60)
    assert got.is_set()


def test_a_killed_holder_leaves_the_run_unlocked(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    child = Child(tmp_path, "hold", run).ready()
    child.kill()
    assert "featurize" in holder(run) and not is_written(run)  # a stale line, no lock
    with run_lock(run, "encode"):
        assert "carv-attrib encode" in holder(run)


def test_shard_parts_share_the_lock_but_not_with_a_full_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    part = Child(tmp_path, "hold", run, "shared").ready()
    with run_lock(run, "encode", shared=True):  # a second part beside the first
        pass
    with pytest.raises(RunLockedError):
        with run_lock(run, "encode"):
            pass
    part.go()


def test_the_lock_nests_within_a_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run, "featurize"):
        with run_lock(run, "index"):  # featurize builds the index under its own lock
            assert holds(run)
        assert holds(run)
    assert not holds(run)


def test_a_refused_first_encode_leaves_no_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "new"
    with pytest.raises(ValueError):
        with run_lock(run, "encode", create=True):
            assert lock_path(run).exists()
            raise ValueError("refused before any write")
    assert not run.exists()
    with run_lock(tmp_path / "missing", "index"):  # without create: no lock, nothing made
        pass
    assert not (tmp_path / "missing").exists()
