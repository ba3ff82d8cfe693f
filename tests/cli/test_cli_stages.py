from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.config import DEFAULT_PRECONDITION

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_featurize_index_score_through_the_cli(
    encoded_run: Path, tiny_model_dir: Path, demo_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    r = invoke("featurize", run, "-m", tiny_model_dir, "-K", "2", "--device", "cpu", "--format", "json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["ok"] == 8 and summary["index"]["preconditioner"] == DEFAULT_PRECONDITION
    r = invoke("featurize", run, "-m", tiny_model_dir, "-K", "3", "--device", "cpu")
    assert r.exit_code == 2 and "draws.draws: 2 -> 3" in r.output
    r = invoke("index", run, "--precondition", "trak", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["preconditioner"]["kind"] == "trak"
    q = demo_data / "videos" / "demo-00003.mp4"
    caption = {d["vid"]: d["caption"] for d in json.loads((demo_data / "manifest.json").read_text())}[
        "demo-00003"
    ]
    r = invoke(
        "score",
        q,
        "--run",
        run,
        "--prompt",
        caption,
        "-k",
        "3",
        "--format",
        "json",
        "--json",
        tmp_path / "a.json",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc == json.loads((tmp_path / "a.json").read_text())
    assert doc["queries"][0]["results"][0]["vid"] == "demo-00003" and len(doc["queries"][0]["results"]) == 3
    r = invoke(
        "score", q, "--run", run, "--prompt", caption, "-k", "all", "--format", "jsonl", "--device", "cpu"
    )
    assert r.exit_code == 0 and len(json.loads(r.stdout.splitlines()[0])["results"]) == 8
    r = invoke("score", q, "--run", run, "--prompt", caption, "--format", "human", "--device", "cpu")
    assert r.exit_code == 0 and "demo-00003" in r.stdout and "rank" in r.stdout
    r = invoke("score", q, "--run", run, "--prompt", caption, "-k", "zero")
    assert r.exit_code == 2
    r = invoke(
        "score",
        tmp_path / "missing.mp4",
        "--run",
        run,
        "--prompt",
        "x",
        "--format",
        "json",
        "--device",
        "cpu",
    )
    assert r.exit_code == 3 and json.loads(r.stdout)["queries"][0]["status"] == "error"
    r = invoke("status", run)
    assert r.exit_code == 0 and "features" in r.stdout


def test_featurize_kron_dims_and_matrix_options(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    r = invoke("featurize", run, "-m", tiny_model_dir, "--kron-dims", "4", "--device", "cpu")
    assert r.exit_code == 2 and "expected OUTxIN" in r.output
    r = invoke(
        "featurize", run, "-m", tiny_model_dir, "--kron-dims", "2x2", "--proj-dim", "64", "--device", "cpu"
    )
    assert r.exit_code == 2 and "not both" in r.output
    r = invoke(
        "featurize", run, "-m", tiny_model_dir, "-K", "1", "--kron-dims", "4x2", "--matrix", "rademacher",
        "--device", "cpu", "--format", "json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    info = json.loads((run / "index" / "index_info.json").read_text())
    spec = info["projector"]
    n_layers = len(spec["layers"])
    assert spec["matrix"] == "rademacher" and info["dim"] == n_layers * 4 * 2


def test_plan_cli(encoded_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    r = invoke(
        "plan",
        encoded_run,
        "-m",
        tiny_model_dir,
        "-o",
        tmp_path / "p.json",
        "--pilot-clips",
        "2",
        "--bins",
        "3",
        "-K",
        "2",
        "--replicates",
        "2",
        "--output-fn",
        "sqnorm",
        "--device",
        "cpu",
        "--format",
        "human",
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.json").exists()
    hint = next(line for line in r.output.splitlines() if line.startswith("recommended"))
    assert "--output-fn sqnorm" in hint and ("--plan" in hint) == ("stratified-is" in hint)


def test_demo_end_to_end(tmp_path: Path) -> None:
    r = invoke(
        "demo",
        tmp_path / "demo",
        "--clips",
        "4",
        "--train-steps",
        "2",
        "-K",
        "2",
        "--frames",
        "9",
        "--size",
        "32x32",
        "-k",
        "3",
        "--plan-pilot",
        "2",
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "demo" / "plan.json").exists()
    doc = json.loads((tmp_path / "demo" / "attribution.json").read_text())
    assert doc["index"]["estimator"]["proposal"] is not None, "the demo featurizes with the plan's proposal"
    assert doc["queries"][0]["status"] == "ok" and len(doc["queries"][0]["results"]) == 3
    assert (tmp_path / "demo" / "generated.mp4").stat().st_size > 0
    assert "rank" in r.stdout
    # trained by `finetune` into DIR/finetune, then installed as the demo pipeline's transformer
    ft = tmp_path / "demo" / "finetune"
    assert json.loads((ft / "carv_finetune.json").read_text())["status"] == "done"
    weights = "diffusion_pytorch_model.safetensors"
    assert (ft / weights).read_bytes() == (tmp_path / "demo" / "model" / "transformer" / weights).read_bytes()


def test_featurize_rebuild_keeps_the_index_choices(
    featurized_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    assert invoke("index", run, "--precondition", "trak").exit_code == 0
    r = invoke(
        "featurize", run, "-m", tiny_model_dir, "-K", "4", "-B", "3", "--device", "cpu", "--format", "json"
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["index"]["preconditioner"] == "trak"
    assert json.loads(r.stdout)["index"]["kept"] == {"--precondition": "trak"}
    r = invoke(
        "featurize",
        run,
        "-m",
        tiny_model_dir,
        "-K",
        "4",
        "-B",
        "3",
        "--device",
        "cpu",
        "--precondition",
        "cosine",
    )
    assert r.exit_code == 0 and "kept" not in r.stderr
    assert json.loads((run / "index" / "index_info.json").read_text())["preconditioner"]["kind"] == "cosine"


def test_prompts_file_alone_lists_the_queries_relative_to_itself(
    featurized_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    import shutil

    (tmp_path / "q").mkdir()
    for name in ("demo-00001.mp4", "demo-00002.mp4"):
        shutil.copy(demo_data / "videos" / name, tmp_path / "q" / name)
    prompts = tmp_path / "q" / "prompts.json"
    prompts.write_text(json.dumps({"demo-00001.mp4": "a", "./demo-00002.mp4": "b"}))
    r = invoke(
        "score",
        "--run",
        featurized_run,
        "--prompts",
        prompts,
        "--device",
        "cpu",
        "-k",
        "1",
        "--format",
        "json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [Path(q["path"]).name for q in doc["queries"]] == ["demo-00001.mp4", "demo-00002.mp4"]
    assert [q["prompt"] for q in doc["queries"]] == ["a", "b"]
    # a QUERY argument matches the file's entry after resolution, whatever the spelling
    r = invoke(
        "score",
        tmp_path / "q" / "." / "demo-00002.mp4",
        "--run",
        featurized_run,
        "--prompts",
        prompts,
        "--device",
        "cpu",
        "--format",
        "json",
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["queries"][0]["prompt"] == "b"
