"""Clips inside another file (`carv_attrib.video.member`): names, byte-range reads, stats."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from carv_attrib.video.member import (
    describe,
    member_path,
    open_source,
    parse_member,
    source_bytes_available,
    source_stat,
)


@pytest.mark.parametrize(
    "container, name",
    [
        ("/data/shards/00000.tar", "000042.mp4"),
        ("/odd#dir/100%/x.tar", "sub/a#1+2:b%23.mp4"),  # '#', '%', ':' survive the round trip
        ("/ds/data-00000-of-00001.arrow", "video[7] (clip.mp4)"),
    ],
)
def test_names_round_trip(container: str, name: str) -> None:
    for off, size in ((1536, 40213), (None, None)):
        path = member_path("tar", container, off, size, name)
        m = parse_member(path)
        assert m is not None and (m.container, m.offset, m.size, m.name) == (container, off, size, name)
        assert describe(path) == f"{name} in {container}"


def test_ordinary_paths_are_not_members() -> None:
    for p in ("/videos/a.mp4", "/videos/tar:x#1+2:y", "tar.mp4", "relative/tar:1"):
        assert parse_member(p) is None and describe(p) == p
    with pytest.raises(ValueError):
        member_path("zip", "/a.zip", 0, 1, "x")


def test_a_member_reads_as_its_own_file(tmp_path: Path) -> None:
    blob = tmp_path / "c.bin"
    blob.write_bytes(b"HEAD" + bytes(range(256)) * 4 + b"TAIL")
    path = member_path("tar", str(blob), 4, 1024, "x.mp4")
    with open_source(path) as f:
        assert f.read(3) == bytes([0, 1, 2])
        assert f.seek(-2, io.SEEK_END) == 1022 and f.read() == bytes([254, 255]) and f.read() == b""
        f.seek(256)
        assert f.tell() == 256 and f.read(2) == bytes([0, 1])
    st, own = source_stat(path), os.stat(blob)
    assert (st.st_size, st.st_mtime_ns, st.st_mode) == (1024, own.st_mtime_ns, own.st_mode)
    # a range the container's end cuts into reads as a truncated file
    cut = member_path("tar", str(blob), 1000, 500, "cut.mp4")
    assert source_bytes_available(cut) == 1032 - 1000
    with open_source(cut) as f:
        assert len(f.read()) == 32 and f.seek(0, io.SEEK_END) == 32


def test_an_absent_member_or_container_is_not_found(tmp_path: Path) -> None:
    for path in (
        member_path("tar", str(tmp_path / "x.tar"), None, None, "k.mp4"),
        member_path("tar", str(tmp_path / "gone.tar"), 0, 10, "k.mp4"),
    ):
        with pytest.raises(FileNotFoundError):
            source_stat(path)
        with pytest.raises(FileNotFoundError):
            open_source(path)
