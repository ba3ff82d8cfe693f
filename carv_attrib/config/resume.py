"""Options without retyping: what a stage ran with is recorded in RUN/run.json, and a `--config FILE`
(TOML) sets any stage's options; an explicit flag still wins.

Precedence, per field of a stage config (highest first):

1. the command line (a flag or argument the user typed);
2. `--config FILE`: the command's own table (`[featurize]`), then top-level keys that name a field of
   the command (`run = "runs/demo"`, `model = "models/wan"`), e.g.

       model = "models/wan"
       [encode]
       frames = 33
       size = "480x832"
       [featurize]
       draws = 16

3. the options of the last `carv-attrib COMMAND` recorded in RUN/run.json (`recorded_options`,
   written by the stage itself through `pipeline._job.record`), for the resumable fields: every CLI
   field but the one-shot ones (`reset_fields`: --overwrite, --dry-run, -o, ...; score's questions);
4. the config's default.

A contradiction is not resolved here: a value that differs from what the run was made with still
reaches the stage's own check (`ShardStore.check`), which refuses it (exit 2) unless --overwrite.
Keys may be spelled as fields (`batch_size`) or flags (`batch-size`); an unknown key is a UsageError
naming the file and the key. TOML is read with the standard library's `tomllib` (Python >= 3.11).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import tomllib

from carv_attrib.errors import UsageError

# Fields that describe one invocation, not the run: never taken from RUN/run.json (a --config FILE may
# still set them).
RESET_EACH_TIME = frozenset(
    {
        "overwrite",
        "dry_run",
        "wait",
        "retry_failed",
        "shard",
        "lock_held",
        "out",
        "plot",
        "queries",
        "prompt",
        "prompts_file",
    }
)
# score: what to ask is typed each time; only how to run it (model, device, dtype, workers, batches,
# nprobe, executor) carries over. (featurize's --objective, say, is the run's and does carry over.)
SCORE_ASKS = frozenset(
    {
        "null_prompt",
        "top_k",
        "aggregate",
        "explain",
        "refine",
        "refine_budget",
        "rerank",
        "objective",
    }
)


def reset_fields(command: str) -> frozenset[str]:
    """The fields `command` never takes from RUN/run.json."""
    return RESET_EACH_TIME | (SCORE_ASKS if command == "score" else frozenset())


def cli_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The config's fields that are CLI options or arguments, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}


def recorded_options(cfg: Any) -> dict[str, Any]:
    """The JSON-able options of a stage config as `record` stores them: CLI fields only, paths made
    absolute (a resume from another directory finds the same files), tuples as lists."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v.absolute())
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return {name: plain(getattr(cfg, name)) for name in cli_fields(type(cfg))}


def stored_options(run: Path | str | None, command: str) -> dict[str, Any]:
    """The options of the last `command` recorded in RUN/run.json ({} when none: a new run, or one made
    before options were recorded). A run.json that cannot be read is no options, not an error: the
    stage reads the run itself and says what is wrong with it."""
    if run is None:
        return {}
    path = Path(run) / "run.json"
    try:
        entries = json.loads(path.read_text())["invocations"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    for entry in reversed(entries):
        if (
            isinstance(entry, dict)
            and entry.get("command") == command
            and isinstance(entry.get("options"), dict)
        ):
            return entry["options"]
    return {}


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The TOML document of `--config FILE`; UsageError (exit 2) naming the file when it is missing
    or not TOML."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--config {path}: is a directory, not a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML ({exc})") from None


def file_options(
    doc: dict[str, Any], command: str, cls: type, path: Path | str, commands: set[str]
) -> dict[str, Any]:
    """The options `doc` (a --config document) sets for `command`: its table, over the top-level keys
    that are fields of `cls`. Unknown keys of the command's table, and top-level keys that are
    neither a table of a known command nor a field of any stage, are UsageError."""
    fields = cli_fields(cls)
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            if key not in commands:
                raise UsageError(f"--config {path}: [{key}] is not a command ({', '.join(sorted(commands))})")
            continue
        name = key.replace("-", "_")
        if name in fields:
            out[name] = value
    table = doc.get(command, {})
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise UsageError(
                f"--config {path}: [{command}] {key} is not an option of `carv-attrib {command}` "
                f"(its options: {', '.join(sorted(n.replace('_', '-') for n in fields))})"
            )
        out[name] = value
    return out


def merge_options(
    cls: type,
    given: dict[str, Any],
    explicit: set[str],
    from_file: dict[str, Any],
    stored: dict[str, Any],
    reset: frozenset[str] = RESET_EACH_TIME,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The config kwargs after the precedence above, and where each non-default came from
    ({field: "command line" | "--config" | "run.json"}). `given` holds every CLI field (defaults for
    the ones not typed); `explicit` names the typed ones."""
    out = dict(given)
    source: dict[str, str] = {}
    fields = cli_fields(cls)
    for name in fields:
        if name in explicit:
            source[name] = "command line"
        elif name in from_file:
            out[name] = _as_field(fields[name], from_file[name])
            source[name] = "--config"
        elif name in stored and name not in reset:
            out[name] = _as_field(fields[name], stored[name])
            source[name] = "run.json"
    return out, source


def _as_field(f: dataclasses.Field, value: Any) -> Any:
    """A JSON/TOML value as the field takes it: a path for Path fields, a list for tuples."""
    tp = str(f.type)
    if value is not None and "Path" in tp and isinstance(value, str):
        return Path(value)
    if isinstance(value, tuple):
        return list(value)
    return value
