"""Resume without retyping (issue 24, item 4), from the CLI: `encode -r RUN`, `featurize RUN` reuse
what RUN/run.json recorded; `--config FILE` sets options; a typed flag wins; a contradiction with
what the run holds is still refused; a required option found nowhere is one line, exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.store.run import RunDir


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def run(featurized_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(featurized_run, tmp_path / "run")
    return tmp_path / "run"


def test_encode_and_featurize_resume_from_run_json(run: Path) -> None:
    r = _cli("encode", "-r", run, "--format", "json")
    assert r.exit_code == 0, r.output
    assert '"encoded": 0' in r.stdout  # the same options: nothing to do
    line = next(x for x in r.stderr.splitlines() if x.startswith("options from"))
    assert (
        f"{run}/run.json" in line and "--frames 9" in line and "--size 32x32" in line and "MANIFEST" in line
    )
    r = _cli("featurize", run, "--format", "json")  # the fixture featurized through the library
    assert r.exit_code == 2 and "records no `featurize`" in r.output
    model = RunDir(run).latents_record().model.source
    r = _cli("featurize", run, "-m", model, "--draws", "4", "--batch-clips", "3", "--format", "json")
    assert r.exit_code == 0, r.output
    r = _cli("featurize", run, "--format", "json")
    assert r.exit_code == 0, r.output
    assert '"computed": 0' in r.stdout and "--draws 4" in r.stderr and f"--model {model}" in r.stderr


def test_a_typed_flag_wins_and_a_contradiction_is_refused(run: Path, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[encode]\nframes = 5\n")
    r = _cli("encode", "-r", run, "--config", conf)
    assert r.exit_code == 2 and "frames: 9 -> 5" in r.output  # the run holds 9-frame latents
    r = _cli("encode", "-r", run, "--config", conf, "--frames", "9", "--format", "json")
    assert r.exit_code == 0, r.output


def test_config_file_alone_starts_a_run(tmp_path: Path, demo_data: Path, tiny_model_dir: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'model = "{tiny_model_dir}"\n[encode]\nmanifest = "{demo_data / "manifest.json"}"\n'
        f'videos = "{demo_data / "videos"}"\nframes = 5\nsize = "32x32"\n--dry-run = true\n'.replace(
            "--dry-run", "dry-run"
        )
    )
    r = _cli("encode", "-r", tmp_path / "new", "--config", conf, "--format", "json")
    assert r.exit_code == 0, r.output
    assert '"dry_run": true' in r.stdout


def test_required_option_found_nowhere(tmp_path: Path) -> None:
    r = _cli("encode", "-r", tmp_path / "new")
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [
        f"error: missing MANIFEST, --model: give it on the command line or in --config FILE; "
        f"{tmp_path / 'new'}/run.json records no `encode` to take them from"
    ]
