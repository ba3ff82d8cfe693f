"""The newcomer's flow as one library chain: encode (the fixture) → finetune --lora → featurize --lora →
score. The attribution follows the fine-tuning set: adapters trained on two different halves of the
clips rank the training clips for the same query differently (issue 24)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.config import FinetuneConfig
from carv_attrib.errors import ConfigMismatchError
from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
from carv_attrib.pipeline.finetune import run_finetune
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.pipeline.score import ScoreConfig, run_score
from carv_attrib.store.latents import iter_cached


def _ranking(
    run: Path, adapter: Path, model: Path, query: Path, prompt: str, root: Path
) -> tuple[list[int], dict[int, float]]:
    r = root / f"run-{adapter.name}"
    shutil.copytree(run, r)
    run_featurize(
        FeaturizeConfig(run=r, model=str(model), draws=4, device="cpu", batch_clips=4, lora=adapter)
    )
    build_run_index(IndexConfig(run=r, precondition="normalize"))
    doc = run_score(ScoreConfig(run=r, queries=[query], prompt=prompt, top_k=8, device="cpu", workers=0))
    results = doc["queries"][0]["results"]
    return [res["clip_id"] for res in results], {res["clip_id"]: res["score"] for res in results}


def test_the_ranking_follows_the_fine_tuning_set(
    encoded_run: Path, tiny_model_dir: Path, demo_data: Path, tmp_path: Path
) -> None:
    ids = [c.clip_id for c in iter_cached(encoded_run)]
    adapters = {}
    for name, subset in (("first", ids[:4]), ("second", ids[4:])):
        out = tmp_path / name
        run_finetune(
            FinetuneConfig(
                run=encoded_run, model=str(tiny_model_dir), out=out, lora=4, steps=30, lr=5e-3,
                batch_clips=4, device="cpu", clip_ids=subset,
            )
        )  # fmt: skip
        adapters[name] = out
    caps = {r["vid"]: r["caption"] for r in json.loads((demo_data / "manifest.json").read_text())}
    query, prompt = demo_data / "videos" / "demo-00005.mp4", caps["demo-00005"]
    a, sa = _ranking(encoded_run, adapters["first"], tiny_model_dir, query, prompt, tmp_path)
    b, sb = _ranking(encoded_run, adapters["second"], tiny_model_dir, query, prompt, tmp_path)
    assert sorted(a) == sorted(b) == sorted(ids)  # every clip ranked under both adapters
    assert a != b, "the same ranking whatever the adapter was trained on"
    # the scores moved by far more than float32 round-off of the same computation would move them
    diff = max(abs(sa[c] - sb[c]) for c in ids)
    assert diff > 1e3 * np.finfo(np.float32).eps * max(abs(v) for v in sa.values()), diff


def test_score_defaults_to_the_fine_tuned_pipeline_featurize_used(
    encoded_run: Path, tiny_model_dir: Path, demo_data: Path, tmp_path: Path
) -> None:
    """RUN was encoded with MODEL, featurized with a fine-tuned copy (same VAE and text encoder, new
    transformer): `score` without --model takes the featurized one, not the encoder's (which the
    index would refuse)."""
    from typer.testing import CliRunner

    from carv_attrib.cli.app import app

    ft = tmp_path / "ft"
    run_finetune(FinetuneConfig(run=encoded_run, model=str(tiny_model_dir), out=tmp_path / "t", steps=2,
                                lr=2e-3, batch_clips=2, device="cpu"))  # fmt: skip
    shutil.copytree(tiny_model_dir, ft)
    shutil.rmtree(ft / "transformer")
    shutil.copytree(tmp_path / "t", ft / "transformer", ignore=shutil.ignore_patterns("checkpoints"))
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    r = CliRunner().invoke(app, ["featurize", str(run), "-m", str(ft), "-K", "2", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    caps = {x["vid"]: x["caption"] for x in json.loads((demo_data / "manifest.json").read_text())}
    doc = run_score(
        ScoreConfig(run=run, queries=[demo_data / "videos" / "demo-00002.mp4"], prompt=caps["demo-00002"],
                    top_k=2, device="cpu", workers=0)
    )  # fmt: skip
    assert doc["queries"][0]["status"] == "ok" and len(doc["queries"][0]["results"]) == 2
    with pytest.raises(ConfigMismatchError, match="not the transformer the index was built with"):
        run_score(ScoreConfig(run=run, queries=[demo_data / "videos" / "demo-00002.mp4"], prompt="a",
                              model=str(tiny_model_dir), device="cpu", workers=0))  # fmt: skip
