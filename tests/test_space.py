"""carv_attrib/space.py: a full disk or quota recognised in every shape the writers raise it, and
turned into one DiskFullError line naming the path and the space needed (exit 3)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from carv_attrib.errors import EXIT_PARTIAL, DiskFullError
from carv_attrib.space import check_space, free_bytes, human_bytes, is_no_space, no_space_error, space_for

# The shapes seen on a full tmpfs on this machine (messages copied from the writers' errors).
FULL = {
    "python": OSError(errno.ENOSPC, "No space left on device", "/runs/x/run.json"),
    "quota": OSError(errno.EDQUOT, "Disk quota exceeded", "/runs/x/run.json"),
    "pyarrow": OSError(
        errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"
    ),
    "pyarrow-no-errno": OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),
    "faiss": RuntimeError(
        "Error in void faiss::write_index(const Index*, IOWriter*, int) at index_write.cpp:499: Error: "
        "'ret == (size * 4)' failed: write error in /mnt/a.index: 1048531 != 1600000 (No space left on device)"
    ),
    "numpy": OSError("200000 requested and 131056 written"),
}
NOT_FULL = {
    "missing": FileNotFoundError(errno.ENOENT, "No such file or directory", "x"),
    "perm": PermissionError(errno.EACCES, "Permission denied", "x"),
    "bug": RuntimeError("an unexpected bug"),
    "value": ValueError("No space left on device"),  # not an I/O error, whatever its text
}


@pytest.mark.parametrize("kind", sorted(FULL))
def test_every_full_disk_shape_is_recognised(kind: str) -> None:
    assert is_no_space(FULL[kind])


@pytest.mark.parametrize("kind", sorted(NOT_FULL))
def test_other_errors_are_not_a_full_disk(kind: str) -> None:
    assert not is_no_space(NOT_FULL[kind])


def test_message_names_path_need_and_free(tmp_path: Path) -> None:
    err = no_space_error(FULL["python"], tmp_path / "part-00003.parquet", need=3 * 2**20)
    assert isinstance(err, DiskFullError) and err.exit_code == EXIT_PARTIAL == 3
    text = str(err)
    assert "\n" not in text
    assert text.startswith(f"no space left on device writing {tmp_path / 'part-00003.parquet'}")
    assert "it needs about 3.0 MiB" in text and "free there now" in text
    assert "rerun the same command" in text
    assert err.need == 3 * 2**20 and err.path == str(tmp_path / "part-00003.parquet")


def test_quota_is_named_as_such(tmp_path: Path) -> None:
    assert str(no_space_error(FULL["quota"], tmp_path / "a")).startswith("disk quota exceeded writing")


def test_message_without_a_path_uses_the_errors_own() -> None:
    assert "writing /runs/x/run.json" in str(no_space_error(FULL["python"], None))
    assert str(no_space_error(FULL["numpy"], None)).startswith("no space left on device;")


def test_space_for_converts_only_a_full_disk(tmp_path: Path) -> None:
    with pytest.raises(DiskFullError, match="needs about 1.0 KiB"), space_for(tmp_path / "f", need=1024):
        raise FULL["faiss"]
    with pytest.raises(PermissionError), space_for(tmp_path / "f"):
        raise NOT_FULL["perm"]


def test_check_space_refuses_what_cannot_fit(tmp_path: Path) -> None:
    free = free_bytes(tmp_path)
    assert free is not None and free > 0
    check_space(tmp_path, 1, "one byte")  # fits: nothing happens
    with pytest.raises(DiskFullError, match="the index of 9 clips needs about .* it was not written"):
        check_space(tmp_path, free * 2 + 2**40, "the index of 9 clips")


def test_free_bytes_of_a_path_not_yet_made(tmp_path: Path) -> None:
    assert free_bytes(tmp_path / "a" / "b" / "c.json") == free_bytes(tmp_path)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 2**30, "5.0 GiB"), (2**50, "1024.0 TiB")],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text
