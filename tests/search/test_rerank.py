"""search/rerank.py: the exact vectors beside an approximate index, and re-ranking from them; and
`score` on an approximate index (re-ranked) agreeing with the exact index."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.pipeline.score import ScoreConfig, run_score
from carv_attrib.search.rerank import VectorStore, rerank


def _blocks(rng: np.random.Generator, n: int, d: int, block: int):
    ids = rng.choice(2**62, size=n, replace=False).astype(np.int64)  # unsorted, sparse: like clip ids
    x = rng.standard_normal((n, d)).astype(np.float32)
    return ids, x, [(ids[i : i + block], x[i : i + block]) for i in range(0, n, block)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_store_returns_each_ids_vector_rounded_through_its_dtype(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    ids, x, blocks = _blocks(rng, 50, 12, 7)
    assert VectorStore.write(tmp_path, iter(blocks), 12, dtype) == 50
    store = VectorStore(tmp_path)
    pick = ids[[3, 41, 0, 17]]
    v = x[[3, 41, 0, 17]]
    n = np.linalg.norm(v, axis=1)
    expect = (v / n[:, None]).astype(dtype).astype(np.float32) * n[:, None]  # unit rows + float32 norms
    np.testing.assert_array_equal(store.rows(pick), expect)  # bitwise: the same storage round trip
    scale = VectorStore.write(tmp_path, iter([(ids[:2], 1e-9 * x[:2]), (ids[2:4], 1e6 * x[2:4])]), 12, dtype)
    rows = VectorStore(tmp_path).rows(ids[:4])
    ref = np.concatenate([1e-9 * x[:2], 1e6 * x[2:4]])
    eps = np.finfo(np.dtype(dtype)).eps  # relative precision at any scale: no float16 under/overflow
    assert scale == 4 and np.all(np.abs(rows - ref) <= 2 * eps * np.abs(ref).max(axis=1, keepdims=True))
    with pytest.raises(KeyError):
        store.rows(np.array([-5], dtype=np.int64))


def test_rerank_of_all_candidates_is_the_exact_top_k(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ids, x, blocks = _blocks(rng, 200, 16, 64)
    VectorStore.write(tmp_path, iter(blocks), 16, "float32")
    q = rng.standard_normal((3, 16)).astype(np.float32)
    cand = np.tile(rng.permutation(ids), (3, 1))
    cand[2, 150:] = -1  # a query with fewer candidates: only those 150 compete
    s, i = rerank(VectorStore(tmp_path), q, cand, k=10)
    exact = q @ x.T  # (3, 200)
    for r in range(2):
        top = np.argsort(-exact[r], kind="stable")[:10]
        assert i[r].tolist() == ids[top].tolist()
        # the same products by another BLAS call: agree to d·eps32 relative to |x||q|
        tol = 16 * np.finfo(np.float32).eps * np.linalg.norm(q[r]) * np.linalg.norm(x, axis=1).max()
        np.testing.assert_allclose(s[r], exact[r][top], rtol=0, atol=tol)
    allowed = set(cand[2][cand[2] >= 0].tolist())
    assert set(i[2].tolist()) <= allowed


def test_score_on_an_approximate_index_reranks_to_the_exact_top_k(
    featurized_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    """SQ8 codes reorder near-ties; with re-ranking from the stored float32 vectors the top-k is the
    Flat index's, up to the float16/float32 storage of the vectors."""
    exact_run, approx_run = tmp_path / "exact", tmp_path / "approx"
    shutil.copytree(featurized_run, exact_run)
    shutil.copytree(featurized_run, approx_run)
    build_run_index(IndexConfig(run=exact_run))
    info = build_run_index(IndexConfig(run=approx_run, index_factory="IVF2,SQ8", vector_dtype="float32"))
    assert info.rerank_vectors == "float32" and (approx_run / "index" / "vectors.bin").exists()
    query = sorted((demo_data / "videos").glob("*.mp4"))[2]
    docs = [
        run_score(ScoreConfig(run=r, queries=[query], prompt="a clip", top_k=4, workers=0, device="cpu"))
        for r in (exact_run, approx_run)
    ]
    a, b = (d["queries"][0]["results"] for d in docs)
    assert [x["clip_id"] for x in a] == [x["clip_id"] for x in b]
    # cosine scores (unit vectors) of D-dim float32 dot products by two BLAS calls: |Δ| <= D·eps32
    tol = info.dim * np.finfo(np.float32).eps
    np.testing.assert_allclose([x["score"] for x in a], [x["score"] for x in b], rtol=0, atol=tol)
