"""`carv-attrib evaluate`: refusals name the minimum; a ground-truth file needs no training; the
retraining path writes JSON and PNG."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.config import EvaluateConfig
from carv_attrib.errors import UsageError
from carv_attrib.pipeline.evaluate import run_evaluate
from carv_attrib.store.latents import iter_cached

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_too_few_clips_names_the_minimum(encoded_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    r = invoke("evaluate", encoded_run, "-m", tiny_model_dir, "--queries", "2", "-o", tmp_path / "e.json")
    assert r.exit_code == 2 and "at least 10 ok clips" in r.stderr  # 8 to train on + 2 queries; the run has 8


@pytest.mark.parametrize(
    ("option", "value", "text"),
    [
        ("--subsets", "4", "--subsets 4: must be >= 8"),
        ("--queries", "1", "--queries 1: must be >= 2"),
        ("--variant", "nope", "choose from"),
    ],
)
def test_bad_options_are_refused_before_any_work(
    encoded_run, tiny_model_dir, tmp_path, option, value, text
) -> None:
    r = invoke("evaluate", encoded_run, "-m", tiny_model_dir, option, value, "-o", tmp_path / "e.json")
    assert r.exit_code == 2 and text in r.stderr, r.output
    assert not (tmp_path / "e.json").exists() and not (encoded_run / "evaluate").exists()


def _ground_truth(run: Path, path: Path) -> Path:
    clips = list(iter_cached(run))
    vids = [c.vid for c in clips]
    rng = np.random.default_rng(0)
    train = vids[2:]
    subsets = [sorted(rng.choice(train, 3, replace=False).tolist()) for _ in range(8)]
    path.write_text(
        json.dumps({"queries": vids[:2], "subsets": subsets, "gt_values": rng.normal(size=(8, 2)).tolist()})
    )
    return path


def test_ground_truth_file_scores_without_training(
    featurized_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    cfg = EvaluateConfig(
        run=run, model=str(tiny_model_dir), ground_truth=_ground_truth(run, tmp_path / "gt.json"), variant=["default"],
        replicates=2, out=tmp_path / "e.json",
    )  # fmt: skip
    with pytest.raises(UsageError, match="at least 8 subsets, 2 queries and 8 training clips"):
        run_evaluate(cfg)  # 8 clips: 2 queries leave 6 to train on
    assert not (run / "evaluate").exists()


def test_retraining_writes_json_and_plot(tmp_path: Path, tiny_model_dir: Path, demo_data: Path) -> None:
    from carv_attrib.config import EncodeConfig
    from carv_attrib.lds.synthetic import make_demo_data
    from carv_attrib.pipeline.encode import run_encode

    manifest = make_demo_data(tmp_path / "d", clips=10, seed=4)
    run_encode(
        EncodeConfig(
            manifest=manifest,
            videos=tmp_path / "d" / "videos",
            model=str(tiny_model_dir),
            run=tmp_path / "run",
            frames=5,
            size="32x32",
            workers=0,
            device="cpu",
        )
    )
    r = invoke(
        "evaluate", tmp_path / "run", "-m", tiny_model_dir, "--queries", "2", "--subsets", "8", "--steps", "2",
        "--gt-draws", "4", "--replicates", "2", "--workers", "1", "--variant", "default", "--variant", "exact-crn-8",
        "-o", tmp_path / "e.json", "--plot", tmp_path / "e.png", "--format", "json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["protocol"] | {"subsets": 8, "queries": 2, "train_clips": 8} == doc["protocol"]
    assert set(doc["settings"]) == {"default", "exact-crn-8"} and (tmp_path / "e.png").stat().st_size > 0
    # never silent for minutes: a line per training, per setting and per replicate (issue 24)
    assert "setting 1/2" in r.stderr and "replicate 2/2 in" in r.stderr and "trainings" in r.stderr
    ci = doc["settings"]["default"]["lds"]["ci95"]
    assert ci[0] <= doc["settings"]["default"]["lds"]["mean"] <= ci[1]


def test_ground_truth_subsets_may_not_list_queries(
    featurized_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    vids = [c.vid for c in iter_cached(featurized_run)]
    path = tmp_path / "gt.json"
    path.write_text(
        json.dumps({"queries": vids[:2], "subsets": [vids[:3]] * 8, "gt_values": [[0.0, 0.0]] * 8})
    )
    cfg = EvaluateConfig(
        run=featurized_run, model=str(tiny_model_dir), ground_truth=path, out=tmp_path / "e.json"
    )
    with pytest.raises(UsageError, match="a subset lists a query"):
        run_evaluate(cfg)


def test_bad_density_and_nprobe_are_usage_errors(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    r = invoke(
        "evaluate", encoded_run, "-m", tiny_model_dir, "--density", "lognormal", "-o", tmp_path / "e.json"
    )
    assert r.exit_code == 2 and "--density lognormal" in r.stderr
    r = invoke("score", tmp_path / "q.mp4", "--run", encoded_run, "--prompt", "x", "--nprobe", "0")
    assert r.exit_code == 2 and "--nprobe 0" in r.stderr
