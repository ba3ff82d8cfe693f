"""`carv-attrib finetune` through the CLI: JSON summary, exit 2 refusals in one line (OUT inside MODEL,
bad options, a foreign OUT), Ctrl-C -> 130 with a checkpoint, and the same command resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carv_attrib.cli.app import app

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _args(run: Path, model: Path, out: Path, *more: object) -> list[object]:
    return [
        "finetune",
        run,
        "-m",
        model,
        "-o",
        out,
        "--steps",
        3,
        "-B",
        2,
        "--lr",
        2e-3,
        "--device",
        "cpu",
        *more,
    ]


def test_finetune_json_summary_and_an_up_to_date_rerun(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ft"
    r = invoke(*_args(encoded_run, tiny_model_dir, out, "--format", "json"))
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["kind"], s["steps"], s["trained_steps"], s["clips"]) == ("transformer", 3, 3, 8)
    assert (out / "config.json").is_file() and (out / "carv_finetune.json").is_file()
    r = invoke(*_args(encoded_run, tiny_model_dir, out, "--format", "json"))
    assert r.exit_code == 0 and json.loads(r.stdout)["already_done"] is True


@pytest.mark.parametrize(
    "extra, message",
    [
        ((), "never writes into the model"),
        (("--lora-alpha", 4), None),
        (("--steps", 0), None),
    ],
)
def test_refusals_exit_2_in_one_line(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path, extra: tuple, message: str | None
) -> None:
    out = tiny_model_dir / "transformer" if message else tmp_path / "ft"
    r = invoke(*_args(encoded_run, tiny_model_dir, out, *extra))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    if message:
        assert message in " ".join(r.output.split())
    assert not (tmp_path / "ft").exists()


def test_a_foreign_out_is_refused_then_taken_with_overwrite(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x.txt").write_text("x")
    r = invoke(*_args(encoded_run, tiny_model_dir, out))
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = invoke(*_args(encoded_run, tiny_model_dir, out, "--overwrite", "--format", "json"))
    assert r.exit_code == 0, r.output


def test_ctrl_c_exits_130_and_the_same_command_resumes(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import carv_attrib.pipeline.finetune as ft

    real, calls = ft.minibatch_backward, []

    def interrupted(*a, **kw):  # Ctrl-C in the middle of the third step's forward/backward
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    out = tmp_path / "ft"
    monkeypatch.setattr(ft, "minibatch_backward", interrupted)
    r = invoke(*_args(encoded_run, tiny_model_dir, out))
    assert r.exit_code == 130 and "rerun the same command to resume" in r.output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002.pt"]
    monkeypatch.setattr(ft, "minibatch_backward", real)
    r = invoke(*_args(encoded_run, tiny_model_dir, out, "--format", "json"))
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["resumed_from"], s["trained_steps"], s["steps"]) == (2, 1, 3)

    whole = tmp_path / "whole"
    assert invoke(*_args(encoded_run, tiny_model_dir, whole)).exit_code == 0
    assert (whole / "diffusion_pytorch_model.safetensors").read_bytes() == (
        out / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_featurize_attributes_the_finetuned_transformer(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "ft"
    assert invoke(*_args(encoded_run, tiny_model_dir, out)).exit_code == 0
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    r = invoke(
        "featurize",
        run,
        "-m",
        tiny_model_dir,
        "--checkpoint",
        out,
        "-K",
        2,
        "--device",
        "cpu",
        "--format",
        "json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ok"] == 8
    info = json.loads((run / "index" / "index_info.json").read_text())
    assert str(out.resolve()) in json.dumps(info)  # the index records the fine-tuned checkpoint
