"""`store.uri`: RUN as a path or a file:// URI; other schemes and other hosts refused (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from carv_attrib.errors import UsageError
from carv_attrib.store.uri import local_run, run_uri


@pytest.mark.parametrize(
    ("given", "path"),
    [
        ("/plain/run", "/plain/run"),
        ("file:///data/runs/a", "/data/runs/a"),
        ("FILE:///data/x", "/data/x"),
        ("file://localhost/data/x", "/data/x"),
        ("file:///data/a%20b", "/data/a b"),  # what Path.as_uri() writes for a space
    ],
)
def test_paths_and_file_uris(given: str, path: str) -> None:
    assert local_run(given) == Path(path)


def test_run_uri_round_trips_odd_names(tmp_path: Path) -> None:
    odd = tmp_path / "a b%c#d"
    assert local_run(run_uri(odd)) == odd.resolve()


@pytest.mark.parametrize("given", ["s3://bucket/run", "gs://b/r", "file://otherhost/data/run"])
def test_other_schemes_and_hosts_are_refused(given: str) -> None:
    with pytest.raises(UsageError) as exc:
        local_run(given)
    assert exc.value.exit_code == 2
