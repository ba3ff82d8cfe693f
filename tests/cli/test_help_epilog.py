"""`carv-attrib --help` lists the commands in workflow order and ends with a typical run whose
commands and options exist (the same check test_docs makes of README's command lines)."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from carv_attrib.cli.app import COMMANDS, EPILOG, app


def test_commands_are_listed_in_workflow_order() -> None:
    order = list(COMMANDS)
    for before, after in (
        ("encode", "finetune"),
        ("finetune", "featurize"),
        ("encode", "plan"),
        ("plan", "featurize"),
        ("featurize", "score"),
        ("score", "report"),
    ):
        assert order.index(before) < order.index(after)


def test_the_typical_run_uses_existing_commands_and_options() -> None:
    runner = CliRunner()
    lines = [ln.strip() for ln in EPILOG.splitlines() if ln.strip().startswith("carv-attrib ")]
    assert len(lines) >= 7  # encode, plan, featurize, score, report (+ the optional stages: finetune, cost)
    for line in lines:
        command = line.split()[1]
        assert command in COMMANDS, line
        help_text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        for flag in re.findall(r"(?<!\w)(--?[a-z][a-z-]*)", line.split("(")[0]):
            assert flag in help_text, (line, flag)
    assert max(len(ln) for ln in EPILOG.splitlines()) <= 78  # fits an 80-column terminal, indented
