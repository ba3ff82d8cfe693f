"""One machine-readable surface: --format, -q/-v after the subcommand, JSON when stdout is not a
terminal, clip ids as strings, flags shown as flags, and one exit-code table (`carv_attrib.errors`)
checked command by command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carv_attrib.cli.app import COMMANDS, app
from carv_attrib.errors import EXIT_PARTIAL, EXIT_USAGE

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _has_option(command: str, flag: str) -> bool:
    return flag in invoke(command, "--help").stdout


FORMAT_COMMANDS = [c for c in COMMANDS if _has_option(c, "--format")]


def test_every_data_command_takes_the_same_formats() -> None:
    assert {
        "encode",
        "featurize",
        "index",
        "score",
        "plan",
        "evaluate",
        "frames",
        "status",
        "env",
        "generate",
        "curate",
    } <= set(FORMAT_COMMANDS)
    for command in FORMAT_COMMANDS:
        help_text = invoke(command, "--help").stdout
        assert "human | json | jsonl" in " ".join(help_text.split()), command


@pytest.mark.parametrize("command", FORMAT_COMMANDS)
def test_an_unknown_format_is_refused_the_same_way(command: str, tmp_path: Path) -> None:
    """Refused before any work, with exit 2 and one line naming the choices. The positional
    arguments are dummies: the format is checked first."""
    r = invoke(command, *_dummy_args(command, tmp_path), "--format", "yaml")
    assert r.exit_code == EXIT_USAGE, (command, r.output)
    assert "--format yaml: choose one of human, json, jsonl" in r.output
    assert "Traceback" not in r.output


def _dummy_args(command: str, tmp: Path) -> list[object]:
    return {
        "encode": [tmp / "m.json", "--videos", tmp, "-m", tmp, "-r", tmp / "run"],
        "finetune": [tmp, "-m", tmp / "model", "-o", tmp / "ft"],
        "cost": [tmp, "--clips", "10"],
        "featurize": [tmp, "-m", tmp],
        "index": [tmp],
        "score": [tmp / "q.mp4", "-r", tmp],
        "plan": [tmp, "-m", tmp],
        "evaluate": [tmp, "-m", tmp],
        "frames": [tmp / "q.mp4"],
        "status": [tmp],
        "env": [],
        "generate": ["a prompt", "-m", tmp],
        "report": [tmp / "a.json"],
        "curate": [tmp / "a.json", "--manifest", tmp / "m.json", "-o", tmp / "o.json", "--top", "10"],
    }.get(command, [])


def test_quiet_and_verbose_are_accepted_after_the_subcommand(tmp_path: Path) -> None:
    for command in COMMANDS:
        help_text = invoke(command, "--help").stdout
        assert "-q, --quiet" in help_text and "-v, --verbose" in help_text, command
    r = invoke("status", tmp_path, "-q", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["run"] == str(tmp_path)


def test_help_shows_flags_as_flags() -> None:
    for command in [None, *COMMANDS]:
        text = invoke(*([command] if command else []), "--help").stdout
        for line in text.splitlines():
            if any(f in line for f in ("--quiet", "--verbose", "--overwrite", "--dry-run", "--retry-failed")):
                assert "<bool>" not in line and "<int>" not in line, (command, line)


def test_status_prints_json_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    r = invoke("status", tmp_path)  # CliRunner's stdout is not a TTY
    assert r.exit_code == 0 and json.loads(r.stdout)["run"] == str(tmp_path)
    r = invoke("status", tmp_path, "--format", "jsonl")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 1 and json.loads(r.stdout)["run"]


def test_model_paths_that_are_not_a_wan_pipeline_get_one_line(
    tiny_model_dir: Path, demo_data: Path, tmp_path: Path
) -> None:
    base = ["encode", demo_data / "manifest.json", "--videos", demo_data / "videos", "-r", tmp_path / "run"]
    r = invoke(*base, "-m", tiny_model_dir / "transformer")
    assert r.exit_code == EXIT_USAGE and f"pass --model {tiny_model_dir}" in r.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    r = invoke(*base, "-m", other)
    assert r.exit_code == EXIT_USAGE and "StableDiffusionPipeline pipeline, not Wan2.1" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke(*base, "-m", empty)
    assert r.exit_code == EXIT_USAGE and "no model_index.json" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "run").exists()


def test_score_exit_codes_ids_as_strings_and_jsonl_aggregates(
    featurized_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    rows = json.loads((demo_data / "manifest.json").read_text())
    good = [demo_data / "videos" / f"{r['vid']}.mp4" for r in rows[:2]]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({str(p): "a prompt" for p in [*good, tmp_path / "gone.mp4"]}))
    base = ["score", "-r", run, "--prompts", prompts, "--device", "cpu", "-k", "3"]

    r = invoke(*base, *good, "--format", "json")
    assert r.exit_code == 0, r.output
    for res in json.loads(r.stdout)["queries"][0]["results"]:
        assert res["clip_id_str"] == str(res["clip_id"])

    # some queries failed: one code, whether 1 of 1 or 1 of 3
    for queries in ([tmp_path / "gone.mp4"], [*good, tmp_path / "gone.mp4"]):
        r = invoke(*base, *queries, "--format", "json")
        assert r.exit_code == EXIT_PARTIAL, (len(queries), r.output)
        assert [q["status"] for q in json.loads(r.stdout)["queries"]][-1] == "error"

    r = invoke(*base, *good, "--format", "jsonl", "--aggregate", "mean")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and len(lines) == 3 and lines[-1]["aggregate"]["method"] == "mean"
    assert all(line["index"] for line in lines)


def test_quiet_leaves_only_data_and_errors(featurized_run: Path, demo_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    q = demo_data / "videos" / "demo-00001.mp4"
    r = invoke("score", q, "-r", run, "-p", "x", "--device", "cpu", "--format", "json", "-q")
    assert r.exit_code == 0 and r.stderr == "" and json.loads(r.stdout)["queries"], r.output
    r = invoke(
        "score", tmp_path / "gone.mp4", "-r", run, "-p", "x", "--device", "cpu", "-q", "--format", "json"
    )
    assert r.exit_code == EXIT_PARTIAL and "could not be scored" in r.stderr  # an error: still shown
