"""cli/common.py: `handle_errors` (expected errors -> one stderr line + exit code, Ctrl-C -> 130,
anything else propagates) and `record_run` (RUN/run.json, never fatal). A throwaway Typer app wraps
a function in `handle_errors`, the way every real command is wrapped."""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import stat
import sys
import time
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from carv_attrib import __version__
from carv_attrib.cli.common import handle_errors, state
from carv_attrib.errors import CarvError, ConfigMismatchError, ModelLoadError, UsageError
from carv_attrib.pipeline._job import record as record_run

runner = CliRunner()


class QuotaError(CarvError):
    """A project-specific expected error with its own exit code (like encode's exit 3)."""

    exit_code = 3


ERRORS: dict[str, BaseException] = {
    "carv": CarvError("the job failed; see the log"),
    "usage": UsageError("--frames 16: use 1 + 4k frames"),
    "mismatch": ConfigMismatchError("runs/x was made with another encode configuration (frames: 17 -> 33)"),
    "model": ModelLoadError("models/nope is not a Wan2.1 diffusers directory"),
    "quota": QuotaError("12 of 100 clips failed, above --max-failure-rate 0.05"),
    "long": UsageError("a long message " + "word " * 60 + "end"),
    "brackets": UsageError("no such file: data/[draft]/manifest.json (see [/tmp/log])"),
    "interrupt": KeyboardInterrupt(),
    "bug": RuntimeError("an unexpected bug"),
    # a full disk from a writer that did not say how much it needed (`carv_attrib.space`)
    "enospc": OSError(errno.ENOSPC, "No space left on device", "/runs/x/run.json"),
    "faiss-full": RuntimeError(
        "write error in /runs/x/index/faiss.index: 10 != 16 (No space left on device)"
    ),
}


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    @handle_errors
    def job(
        kind: Annotated[str, typer.Argument(help="Which error to raise.")],
        times: Annotated[int, typer.Option("--times", help="A typed option seen through the wrapper.")] = 1,
    ) -> None:
        """A command that fails on demand."""
        if kind == "none":
            typer.echo(f"ran {times}")
            return
        raise ERRORS[kind]

    return app


@pytest.fixture
def quiet_state():
    """`state` is global (set by the app's callback): keep each test's changes to itself."""
    saved = (state.verbose, state.quiet)
    state.verbose, state.quiet = 0, False
    yield state
    state.verbose, state.quiet = saved


def _invoke(*args: str):
    return runner.invoke(_app(), list(args))


def test_wrapper_keeps_the_command_signature(quiet_state) -> None:
    r = _invoke("none", "--times", "3")
    assert r.exit_code == 0 and r.stdout == "ran 3\n" and r.stderr == ""
    help_text = _invoke("--help").stdout
    assert "--times" in help_text and "A command that fails on demand." in help_text
    assert _invoke("none", "--times", "x").exit_code == 2  # click still parses the typed option


@pytest.mark.parametrize("kind", ["carv", "usage", "mismatch", "model", "quota", "long"])
def test_expected_error_is_one_stderr_line_and_its_exit_code(quiet_state, kind: str) -> None:
    exc = ERRORS[kind]
    r = _invoke(kind)
    assert r.exit_code == type(exc).exit_code, r.output
    assert r.exit_code == {"carv": 1, "quota": 3}.get(kind, 2)
    assert r.stdout == ""  # data goes to stdout, messages to stderr
    lines = r.stderr.splitlines()
    assert lines == [f"error: {exc}"], r.stderr  # one line, however long: no wrapping
    assert "Traceback" not in r.output
    assert not isinstance(r.exception, CarvError)  # turned into SystemExit, not re-raised


def test_error_message_is_printed_verbatim_even_with_brackets(quiet_state) -> None:
    """Messages carry user paths and globs; square brackets in them are text, not console markup
    (unescaped, "[draft]" would vanish and "[/tmp/log]" would raise rich's MarkupError)."""
    exc = ERRORS["brackets"]
    r = _invoke("brackets")
    assert r.exit_code == 2, f"exit {r.exit_code}, exception {r.exception!r}, stderr {r.stderr!r}"
    assert r.stderr.splitlines() == [f"error: {exc}"]


def test_verbose_shows_the_traceback_of_an_expected_error(quiet_state) -> None:
    quiet_state.verbose = 1
    r = _invoke("usage")
    assert r.exit_code == 2
    assert "Traceback" in r.stderr and r.stderr.rstrip().endswith(f"error: {ERRORS['usage']}")


def test_keyboard_interrupt_exits_130_with_a_resume_hint(quiet_state) -> None:
    r = _invoke("interrupt")
    assert r.exit_code == 130
    assert r.stdout == "" and "Traceback" not in r.output
    (line,) = r.stderr.splitlines()
    assert "interrupted" in line and "rerun the same command to resume" in line


def test_unexpected_exception_propagates(quiet_state) -> None:
    r = _invoke("bug")
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
    assert str(r.exception) == "an unexpected bug"
    assert "error:" not in r.stderr  # not disguised as an expected error

    def boom() -> None:
        raise ValueError("direct")

    with pytest.raises(ValueError, match="direct"):
        handle_errors(boom)()


def test_direct_call_raises_typer_exit_with_the_code(quiet_state, capsys) -> None:
    def fail() -> None:
        raise QuotaError("over budget")

    wrapped = handle_errors(fail)
    assert wrapped.__name__ == "fail" and wrapped.__wrapped__ is fail
    with pytest.raises(typer.Exit) as info:
        wrapped()
    assert info.value.exit_code == 3
    assert info.value.__cause__ is None and info.value.__suppress_context__  # `from None`
    assert handle_errors(lambda x, y=1: x + y)(2, y=5) == 7  # arguments and result pass through
    with pytest.raises(typer.Exit) as info:
        handle_errors(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))()
    assert info.value.exit_code == 130


# -- record_run -------------------------------------------------------------------------------------


def test_record_run_appends_invocations(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    t0 = time.monotonic()
    record_run(run, "encode", device="cpu", started=t0, clips=8)
    record_run(run, "featurize")
    data = json.loads((run / "run.json").read_text())
    first, second = data["invocations"]
    assert first["command"] == "encode" and second["command"] == "featurize"
    assert first["argv"] == sys.argv
    assert first["tool_version"] == __version__ and first["python"] == platform.python_version()
    assert first["device"] == "cpu" and first["clips"] == 8  # extra fields are kept
    assert 0 <= first["seconds"] < 600
    assert second["device"] is None and second["seconds"] is None
    assert set(first["versions"]) >= {"torch", "pyarrow"} and first["versions"]["pyarrow"]
    assert first["host"] == platform.node() and first["finished_at"]
    # no temporary file left; .run.json.lock is the appends' lock file (readers record beside writers)
    assert sorted(p.name for p in run.iterdir()) == [".run.json.lock", "run.json"]

    (run / "run.json").write_text(json.dumps({"invocations": [{"command": "older"}], "note": "kept"}))
    record_run(run, "index")
    data = json.loads((run / "run.json").read_text())
    assert [i["command"] for i in data["invocations"]] == ["older", "index"] and data["note"] == "kept"


def test_record_run_in_a_read_only_run_dir_does_not_raise(tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    run.mkdir()
    record_run(run, "encode")
    before = (run / "run.json").read_text()
    mode = run.stat().st_mode
    run.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(run, os.W_OK):
            pytest.skip("chmod does not make the directory read-only here (running as root?)")
        with caplog.at_level(logging.WARNING):
            record_run(run, "featurize")
    finally:
        run.chmod(mode)
    assert (run / "run.json").read_text() == before
    assert "could not append" in caplog.text


def test_record_run_where_run_json_cannot_be_written_does_not_raise(tmp_path: Path, caplog) -> None:
    """The same OSError path, independent of the user: RUN is a file, so RUN/run.json cannot exist."""
    run = tmp_path / "not-a-dir"
    run.write_text("x")
    with caplog.at_level(logging.WARNING):
        record_run(run, "score")
    assert run.read_text() == "x"
    assert "could not append" in caplog.text


@pytest.mark.parametrize("kind", ["enospc", "faiss-full"])
def test_full_disk_is_one_line_and_exit_3(quiet_state, kind: str) -> None:
    r = _invoke(kind)
    assert r.exit_code == 3, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device"), r.stderr
    assert "rerun the same command" in lines[0] and "Traceback" not in r.output
    if kind == "enospc":
        assert "writing /runs/x/run.json" in lines[0]
