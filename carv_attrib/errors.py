"""Expected errors and the exit codes. The CLI turns each error into one clear line and its exit
code; no traceback. Every command uses the same table (README, "Exit codes"):

    0    done
    1    an unexpected error (a bug: the traceback is printed; please report it)
    2    usage: a bad option, input or run (mismatched configuration, stale index, a run another
         command is writing); nothing was changed
    3    partly done: the command finished, but some items failed (queries that could not be scored,
         failed clips above --max-failure-rate, a clip `frames` cannot decode)
         or it stopped on a full disk or quota (ENOSPC/EDQUOT): what was committed stays, nothing
         partly written is kept; free space and rerun the same command
    130  interrupted (Ctrl-C); rerunning the same command resumes
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130


class CarvError(Exception):
    """Base class of expected errors. `exit_code` is what the CLI exits with."""

    exit_code = EXIT_ERROR


class UsageError(CarvError):
    """Bad input from the user: a manifest, an option, a path. Exit 2."""

    exit_code = EXIT_USAGE


class ConfigMismatchError(UsageError):
    """A run directory was built with another configuration than the one asked for. Exit 2."""


class RunLockedError(UsageError):
    """Another command is writing the run (it holds RUN/.lock, `carv_attrib.store.lock`): the message
    names the holder. Nothing was changed; rerun when it is done, or with --wait. Exit 2."""


class IndexChangedError(UsageError):
    """RUN/index was replaced (a featurize or index rebuilt it) while a reader was loading it, twice
    in a row: the reader refuses rather than mix two indexes. Nothing was changed. Exit 2."""


class DamagedFileError(UsageError):
    """A run file that cannot be trusted: truncated, its bytes changed (a Parquet page CRC, an index
    file's sha256 recorded in index_info.json), edited by hand, or missing. The message names the
    file and the command that repairs it; nothing is scored from it. Exit 2."""


class ModelLoadError(UsageError):
    """A model directory or Hub id that cannot be loaded. Exit 2."""


class DiskFullError(CarvError):
    """A write of the run (or of `-o`) found the disk or the quota full (`carv_attrib.space`):
    the message names the path and the space needed. What was committed before stays and nothing
    partly written is kept, so a rerun after freeing space resumes. Exit 3."""

    exit_code = EXIT_PARTIAL
    path: str | None = None
    need: int | None = None


class PartialRun(CarvError):
    """The job finished, but too many of its items failed (encode: more failed clips than
    --max-failure-rate allows). `summary` is the job's finished summary, for the caller to report.
    Exit 3."""

    exit_code = EXIT_PARTIAL

    def __init__(self, message: str, summary: object):
        super().__init__(message)
        self.summary = summary
