"""FAISS index: exact flat search == brute-force numpy, k handling, IVF/PQ factories, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carv_attrib.search.index import build_index, load_index, save_index, search

N, D, M = 1000, 16, 7


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.choice(10**12, size=N, replace=False).astype(np.int64)  # sparse, large clip ids
    # Clustered vectors, as projected gradients tend to be, so IVF lists are meaningful.
    centers = rng.normal(size=(10, D)) * 3
    vecs = (centers[rng.integers(0, 10, N)] + rng.normal(size=(N, D))).astype(np.float32)
    queries = rng.normal(size=(M, D)).astype(np.float32) * 3
    return ids, vecs, queries


def _brute(ids, vecs, queries, k):
    scores = queries.astype(np.float64) @ vecs.astype(np.float64).T  # (M, N)
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def test_flat_search_equals_brute_force(data):
    ids, vecs, queries = data
    index = build_index(ids, vecs)
    assert index.ntotal == N and index.d == D
    scores, hits = search(index, queries, k=10)
    assert scores.dtype == np.float32 and hits.dtype == np.int64 and scores.shape == hits.shape == (M, 10)
    ref_scores, ref_ids = _brute(ids, vecs, queries, 10)
    np.testing.assert_array_equal(hits, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)


def test_k_none_returns_all_and_large_k_is_clipped(data):
    ids, vecs, queries = data
    index = build_index(torch.from_numpy(ids), torch.from_numpy(vecs))  # torch input accepted
    scores, hits = search(index, queries, k=None)
    assert hits.shape == (M, N)
    assert all(set(row) == set(ids.tolist()) for row in hits)
    assert (np.diff(scores, axis=1) <= 1e-5).all()  # best first
    ref_scores, _ = _brute(ids, vecs, queries, N)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)
    assert search(index, queries, k=N + 50)[1].shape == (M, N)
    assert search(index, queries, k=0)[1].shape == (M, 0)


def test_ivf_is_exact_when_probing_every_list(data):
    ids, vecs, queries = data
    index = build_index(ids, vecs, factory="IVF8,Flat", train_sample=500, seed=1)
    scores, hits = search(index, queries, k=10, nprobe=8)
    ref_scores, ref_ids = _brute(ids, vecs, queries, 10)
    np.testing.assert_array_equal(hits, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)
    _, few = search(index, queries, k=10, nprobe=1)  # approximate, still well-formed
    assert few.shape == (M, 10)


def test_ivf_pq_recall(data):
    ids, vecs, queries = data
    index = build_index(ids, vecs, factory="IVF4,PQ8")  # 8 sub-quantizers of 1 byte
    _, hits = search(index, queries, k=10, nprobe=4)
    _, ref_ids = _brute(ids, vecs, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hits, ref_ids, strict=True)])
    assert recall >= 0.7, recall  # 0.87 measured


@pytest.mark.parametrize("factory", [None, "IVF8,Flat"])
def test_save_load_round_trip(data, tmp_path, factory):
    ids, vecs, queries = data
    index = build_index(ids, vecs, factory=factory)
    path = tmp_path / "index" / "index.faiss"
    save_index(index, path)
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    again = load_index(path)
    a, b = search(index, queries, k=20, nprobe=8), search(again, queries, k=20, nprobe=8)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(FileNotFoundError):
        load_index(tmp_path / "nope.faiss")


def test_validation(data):
    ids, vecs, queries = data
    with pytest.raises(ValueError, match="unique"):
        build_index(np.zeros(N, np.int64), vecs)
    with pytest.raises(ValueError, match="ids must have shape"):
        build_index(ids[:-1], vecs)
    bad = vecs.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        build_index(ids, bad)
    with pytest.raises(ValueError, match="2-D"):
        build_index(ids, vecs[0])
    index = build_index(ids, vecs)
    with pytest.raises(ValueError, match="dimension 15 but the index has dimension 16"):
        search(index, queries[:, :15])
    with pytest.raises(ValueError, match="use_gpu=True"):
        build_index(ids, vecs, use_gpu=True)
    with pytest.raises(ValueError, match="more vectors"):
        build_index(ids[:5], vecs[:5], factory="IVF64,Flat")
