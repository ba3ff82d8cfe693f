"""What every command shares: consoles, option definitions, error handling.

Data goes to stdout; progress, logs and messages go to stderr. Expected errors (CarvError) are one
line plus the fix and exit with their code (2 for usage/config mismatches, 3 for a full disk or
quota, which is recognised from the OSError/RuntimeError too); unexpected ones keep their traceback. A `PartialRun` (a job that finished with too many failures) is its one red line
and exit 3. Ctrl-C exits 130 after a clean stop.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from carv_attrib.config import FORMATS
from carv_attrib.errors import EXIT_INTERRUPTED, CarvError, PartialRun, UsageError
from carv_attrib.space import is_no_space, no_space_error

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


class State:
    verbose: int = 0
    quiet: bool = False


state = State()

# Option definitions live with the stage configs (`carv_attrib.config`); `carv_attrib.cli.options`
# turns them into Typer parameters, so a flag means the same thing in every command.


def say(text: str, style: str | None = None, error: bool = False) -> None:
    """A message to stderr; `text` is printed literally (no rich markup), `style` colours it whole.
    Silenced by --quiet unless `error`."""
    if state.quiet and not error:
        return
    quiet, err_console.quiet = err_console.quiet, False
    try:
        err_console.print(text, style=style, markup=False, soft_wrap=True)
    finally:
        err_console.quiet = quiet


def check_format(fmt: str | None) -> str:
    """The output format: `fmt`, or human on a terminal and json otherwise; refused when unknown.
    Every command that prints data takes the same three (`--format human|json|jsonl`)."""
    fmt = fmt or ("human" if sys.stdout.isatty() else "json")
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    return fmt


def emit(data: Any, fmt: str, lines: list[Any] | None = None) -> None:
    """Print a result as data on stdout: `json` the document (indented), `jsonl` one compact JSON
    object per line (`lines`, or the document as one line). `human` is each command's own rendering."""
    if fmt == "json":
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif fmt == "jsonl":
        for line in lines if lines is not None else [data]:
            sys.stdout.write(json.dumps(line, default=str) + "\n")
    sys.stdout.flush()


F = TypeVar("F", bound=Callable[..., Any])


def setup_logging() -> None:
    err_console.quiet = state.quiet  # --quiet: stderr shows errors only (`say(error=True)`, failures)
    level = logging.WARNING if state.verbose == 0 else logging.INFO if state.verbose == 1 else logging.DEBUG
    if state.quiet:
        level = logging.ERROR
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )


def _fail(exc: CarvError) -> None:
    err_console.quiet = False  # errors are printed under --quiet too
    if state.verbose:
        err_console.print_exception()
    err_console.print(Text.assemble(("error:", "bold red"), " ", str(exc)), soft_wrap=True)
    raise typer.Exit(exc.exit_code) from None


def handle_errors(fn: F) -> F:
    """Turn expected errors into one stderr line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except PartialRun as exc:  # finished, but too many items failed: the command has shown its summary
            say(str(exc), style="bold red", error=True)
            raise typer.Exit(exc.exit_code) from None
        except CarvError as exc:
            _fail(exc)
        except (OSError, RuntimeError) as exc:
            # a full disk or quota where no write site said how much it needed: the same one line
            if not is_no_space(exc):
                raise
            _fail(no_space_error(exc, None))
        except KeyboardInterrupt:
            err_console.quiet = False
            err_console.print("[yellow]interrupted[/]; rerun the same command to resume where it stopped")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]
