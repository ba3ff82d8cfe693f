"""carv_attrib/atomic.py: a write either lands whole under its name or leaves nothing; a full disk
inside it is DiskFullError naming the target, not the temporary name."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from carv_attrib.atomic import atomic_path
from carv_attrib.errors import DiskFullError


def test_success_renames_onto_the_target(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".a.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_full_disk_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "part-00001.parquet"
    target.write_text("old")
    with pytest.raises(DiskFullError) as info, atomic_path(target, need=4096) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert str(target) in str(info.value) and ".tmp" not in str(info.value)
    assert "it needs about 4.0 KiB" in str(info.value)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_other_errors_pass_through_and_clean_up(tmp_path: Path) -> None:
    target = tmp_path / "b.json"
    with pytest.raises(KeyError), atomic_path(target) as tmp:
        tmp.write_text("x")
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_lands_whole_or_not_at_all(tmp_path: Path) -> None:
    from carv_attrib.atomic import atomic_dir

    target = tmp_path / "subset"
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and tmp.name.startswith(".subset.") and tmp.name.endswith(".tmp")
        (tmp / "a.tar").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subset"]
    assert (target / "a.tar").read_text() == "new"
    with pytest.raises(KeyError), atomic_dir(target) as tmp:
        (tmp / "b.tar").write_text("half")
        raise KeyError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a.tar"]  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subset"]
    with atomic_dir(target) as tmp:  # a folder already there is replaced
        (tmp / "c.tar").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == ["c.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subset"]
