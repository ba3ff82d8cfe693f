"""Expected errors. The CLI turns each into one clear line and its exit code; no traceback."""

from __future__ import annotations


class CarvError(Exception):
    """Base class of expected errors. `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(CarvError):
    """Bad input from the user: a manifest, an option, a path. Exit 2."""

    exit_code = 2


class ConfigMismatchError(UsageError):
    """A run directory was built with another configuration than the one asked for. Exit 2."""


class ModelLoadError(UsageError):
    """A model directory or Hub id that cannot be loaded. Exit 2."""
