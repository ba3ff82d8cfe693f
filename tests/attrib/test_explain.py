"""attrib/explain.py: a score's split over layers and blocks adds up to the score; `score --explain`
attaches it to every result."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.attrib.explain import by_block, explain_result, layer_slices, layer_split
from carv_attrib.pipeline.score import ScoreConfig, run_score

SPEC = {
    "kind": "kron",
    "layers": [
        {"name": "blocks.0.attn1.to_q", "k_out": 2, "k_in": 3},
        {"name": "blocks.0.ffn.net.2", "k_out": 1, "k_in": 4},
        {"name": "blocks.1.attn2.to_v", "k_out": 2, "k_in": 2},
        {"name": "proj_out", "k_out": 1, "k_in": 2},
    ],
}


def test_layer_terms_add_up_to_the_score_and_group_by_block() -> None:
    d = 6 + 4 + 4 + 2
    rng = np.random.default_rng(0)
    q, x = rng.standard_normal((2, 2 * d)).astype(np.float32)  # two checkpoints' blocks
    slices = layer_slices(SPEC, [d, d])
    assert [n for n, _ in slices][:2] == ["ckpt0/blocks.0.attn1.to_q", "ckpt0/blocks.0.ffn.net.2"]
    split = layer_split(q, x, slices)
    assert sum(split.values()) == pytest.approx(float(q.astype(np.float64) @ x), rel=0, abs=2 * d * 2.0**-52)
    blocks = by_block(split)
    assert set(blocks) == {"ckpt0/blocks.0", "ckpt0/blocks.1", "ckpt0/proj_out", "ckpt1/blocks.0",
                           "ckpt1/blocks.1", "ckpt1/proj_out"}  # fmt: skip
    e = explain_result(split, top=3)
    assert len(e["top_layers"]) == 3 and abs(e["top_layers"][0]["score"]) == max(
        abs(v) for v in split.values()
    )
    with pytest.raises(ValueError, match="dense projector"):
        layer_slices({"kind": "dense", "dim": 8}, [8])


def test_score_explain_splits_every_result(featurized_run: Path, demo_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    query = sorted((demo_data / "videos").glob("*.mp4"))[1]
    doc = run_score(ScoreConfig(run=run, queries=[query], prompt="a clip", top_k=3, workers=0, device="cpu",
                                explain=True))  # fmt: skip
    dim = doc["index"]["dim"]
    for r in doc["queries"][0]["results"]:
        e = r["explain"]
        # float32 inner product of unit vectors vs float64 sums of the same products: |Δ| <= D·eps32
        assert e["total"] == pytest.approx(r["score"], rel=0, abs=dim * float(np.finfo(np.float32).eps))
        assert sum(e["by_block"].values()) == pytest.approx(e["total"], rel=0, abs=dim * 2.0**-52)
        assert all(k.startswith("blocks.") or "." not in k for k in e["by_block"])
