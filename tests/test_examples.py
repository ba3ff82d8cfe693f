"""examples/: they run as documented (small settings) and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sds_variance_prints_the_ecm_table(tiny_model_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sds_variance.py"), "--model", str(tiny_model_dir),
         "--k", "4", "--replicates", "4", "--frames", "5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "scheme" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["iid", "stratified", "stratified-is"]
    for r in rows:
        var, ratio, ecm = (float(x) for x in r.split("|")[3:6])
        # K = 4 averaged draws: E[ratio] = 4; summed over 512 latent entries with 3 dof each, its
        # relative standard error is ~4 %, so > 1 fails only on a real regression
        assert var > 0 and ratio > 1 and ecm > 0


def test_python_api_runs_as_a_script(tiny_model_dir: Path, demo_data: Path, tmp_path: Path) -> None:
    """README's Python API, as examples/python_api.py: encode, featurize + index, score from a script
    (the decode workers need its __main__ guard), each job recorded in the run's run.json."""
    import json

    query = demo_data / "videos" / "demo-00003.mp4"
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py"), str(tmp_path), "--model", str(tiny_model_dir),
         "--data", str(demo_data), "--query", str(query), "--prompt", "a red square", "--frames", "5",
         "--size", "32x32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "encoded 8/8 clips" and len([x for x in lines if "pctl" in x]) == 3
    log = json.loads((tmp_path / "api-run" / "run.json").read_text())
    assert [e["command"] for e in log["invocations"]] == ["encode", "featurize", "score"]
