"""The CLI imports no model library until a command needs one (issue 24, item 5): `--help`, a
command's `--help` and a usage error are said without importing torch, diffusers, transformers or
faiss (seconds on every call: measured 5-10 s for a usage error before, under 1 s after). Each case
runs in a fresh interpreter and reports which of them ended up in sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "faiss")

PROBE = f"""
import json, sys
from carv_attrib.cli.app import app
code = None
try:
    app(sys.argv[1:], prog_name="carv-attrib")
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def run_cli(*args: object) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"stderr": res.stderr}


def test_importing_the_cli_imports_no_model_library() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = f"import sys, carv_attrib.cli.app; print([m for m in {HEAVY!r} if m in sys.modules])"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.stdout.strip() == "[]", res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["score", "--help"],
        ["featurize", "--help"],
        ["score", "q.mp4", "--run", "nowhere", "--bogus"],  # click's usage error
        ["score", "q.mp4", "--run", "nowhere"],  # no prompt
        ["score", "q.mp4", "--run", "nowhere", "-p", "x", "--top-k", "0"],
        ["score", "--run", "nowhere", "--prompts", "p.json", "--explain", "--top-k", "all"],
        ["encode", "m.json", "--videos", ".", "-m", "nomodel", "--run", "r", "--frames", "10"],
        ["featurize", "nowhere", "-m", "nomodel", "--draws", "0"],
        ["plan", "nowhere", "-m", "nomodel", "--draws", "0"],
        ["index", "nowhere", "--nprobe", "0"],
    ],
)
def test_help_and_usage_errors_import_no_model_library(args: list[str], tmp_path: Path) -> None:
    out = run_cli(*args)
    _check(out, args)


def test_a_picture_query_is_refused_before_torch(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "pic.mp4", format="PNG")
    out = run_cli("score", tmp_path / "pic.mp4", "--run", tmp_path / "nowhere", "-p", "x")
    assert out["code"] == 2 and "still image" in out["stderr"]
    _check(out, [])


def _check(out: dict, args: list[str]) -> None:
    assert out["code"] in (0, 2), out["stderr"]
    if out["code"] == 2 and "--bogus" not in args:
        lines = out["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), out["stderr"]
    assert out["heavy"] == [], out
