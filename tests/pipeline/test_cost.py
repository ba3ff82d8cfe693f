"""`cost`: every figure is a per-clip quantity the run measured, times N, with its source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.config import CostConfig
from carv_attrib.errors import UsageError
from carv_attrib.pipeline.cost import run_cost
from carv_attrib.search.index import index_bytes
from carv_attrib.store.run import RunDir


def _per_clip(run: Path, stage: str) -> float:
    store = getattr(RunDir(run), stage)
    stats = store.read_stats()
    return sum(s["wall_s"] for s in stats) / sum(s["clips"] for s in stats)


def test_figures_are_the_runs_per_clip_costs_times_n(featurized_run: Path) -> None:
    doc = run_cost(CostConfig(run=featurized_run, clips=1_000_000))
    assert doc["draws"] == 4 and doc["dim"] == RunDir(featurized_run).index_info(check_fresh=False).dim
    c_enc, c_feat = _per_clip(featurized_run, "latents"), _per_clip(featurized_run, "features")
    assert doc["timings"]["c_enc_s"] == pytest.approx(c_enc)
    assert doc["timings"]["c_draw_s"] == pytest.approx(c_feat / 4)
    assert doc["compute"]["encode_device_hours"] == pytest.approx(1e6 * c_enc / 3600)
    assert doc["compute"]["featurize_device_hours"] == pytest.approx(1e6 * c_feat / 3600)
    assert doc["storage"]["index_bytes"] == index_bytes(1_000_000, doc["dim"], doc["factory"])
    lat_files = sum(f.stat().st_size for f in (featurized_run / "latents").glob("part-*.parquet"))
    assert doc["storage"]["latents_bytes"] == pytest.approx(lat_files / 8 * 1e6)
    assert set(doc["index_options"]) >= {"Flat", "IVF4096,SQ8"} and not doc["missing"]
    # twice the draws: twice the featurize hours; half the dim: half the feature bytes
    doc2 = run_cost(CostConfig(run=featurized_run, clips=1_000_000, draws=8, dim=doc["dim"] // 2, devices=4))
    assert doc2["compute"]["featurize_device_hours"] == pytest.approx(
        2 * doc["compute"]["featurize_device_hours"]
    )
    assert doc2["storage"]["features_bytes"] == pytest.approx(doc["storage"]["features_bytes"] / 2)
    assert doc2["compute"]["wall_hours"] == pytest.approx(doc2["compute"]["total_device_hours"] / 4)


def test_timings_and_plan_files_replace_the_stage_stats(featurized_run: Path, tmp_path: Path) -> None:
    timings = tmp_path / "gpu.json"
    timings.write_text(json.dumps({"summary": {"encode_s_per_clip": 0.5, "featurize_s_per_draw": 0.25}}))
    doc = run_cost(CostConfig(run=featurized_run, clips=3600, timings=timings))
    assert doc["compute"]["encode_device_hours"] == pytest.approx(0.5)
    assert doc["compute"]["featurize_device_hours"] == pytest.approx(4 * 0.25)
    assert "--timings" in doc["timings"]["c_draw_source"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"costs": {"c_enc": 2.0, "c_draw": 1.0, "c_enc_source": "timed re-encode"}}))
    doc = run_cost(CostConfig(run=featurized_run, clips=3600, plan=plan))
    assert doc["timings"]["c_enc_s"] == 2.0 and doc["compute"]["featurize_device_hours"] == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not a JSON document"),
        ("{}", "neither encode_s_per_clip"),
        ('{"encode_s_per_clip": -1}', "positive"),
    ],
)
def test_bad_timings_are_one_line(featurized_run: Path, tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "t.json"
    bad.write_text(content)
    with pytest.raises(UsageError, match=message):
        run_cost(CostConfig(run=featurized_run, clips=10, timings=bad))


def test_an_encoded_only_run_says_what_it_cannot_size(encoded_run: Path) -> None:
    doc = run_cost(CostConfig(run=encoded_run, clips=100))
    assert doc["compute"]["featurize_device_hours"] is None and doc["compute"]["encode_device_hours"] > 0
    assert any("featurize" in m for m in doc["missing"]) and any("--dim" in m for m in doc["missing"])
    assert doc["storage"]["latents_bytes"] > 0


def test_cli(featurized_run: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["cost", str(featurized_run), "--clips", "1000000", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["clips"] == 1_000_000
    r = CliRunner().invoke(app, ["cost", str(featurized_run), "--clips", "0"])
    assert r.exit_code == 2 and "--clips" in r.stderr
    r = CliRunner().invoke(app, ["cost", str(tmp_path), "--clips", "5"])
    assert r.exit_code == 2 and "no latent cache" in r.stderr


def test_the_gpu_check_json_is_a_timings_file(featurized_run: Path) -> None:
    """bench/gpu_check.py's JSON (here its committed CPU dry run) is read as --timings: its bfloat16
    encode seconds per clip and featurize seconds per clip at its K, divided by K."""
    path = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_check_cpu_dryrun.json"
    check = json.loads(path.read_text())
    doc = run_cost(CostConfig(run=featurized_run, clips=3600, timings=path))
    k = check["config"]["draws_k"]
    assert doc["timings"]["c_enc_s"] == check["cases"]["encode:bfloat16"]["seconds_per_clip"]
    assert doc["timings"]["c_draw_s"] == pytest.approx(
        check["cases"]["featurize:bfloat16"]["featurize_s_per_clip"] / k
    )
