from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.errors import UsageError
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.search.index import load_index, search
from carv_attrib.search.precondition import fit_preconditioner, load_preconditioner
from carv_attrib.store.features import feature_matrix


def test_streamed_trak_index_equals_the_in_memory_fit(featurized_run: Path, tmp_path: Path) -> None:
    """Shards of 3 are streamed into the Gram and the index; the result is the whole-matrix fit."""
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    info = build_run_index(IndexConfig(run=run, precondition="trak", lambda_rel=1e-2))
    ids, feats = feature_matrix(run)  # (8,), (8, D)
    want = fit_preconditioner("trak", feats, dim=feats.shape[1], lambda_rel=1e-2)
    got = load_preconditioner(run / "index" / "preconditioner")
    np.testing.assert_allclose(got.prepare_train(feats), want.prepare_train(feats), rtol=1e-6, atol=1e-9)
    index = load_index(run / "index" / "index.faiss")
    scores, hits = search(index, want.prepare_query(feats[:2]), k=None)  # (2, 8)
    brute = feats[:2].astype(np.float64) @ want.prepare_train(feats).astype(np.float64).T  # (2, 8)
    for row in range(2):
        order = np.argsort(-brute[row])
        assert hits[row].tolist() == ids[order].tolist()
        np.testing.assert_allclose(scores[row], brute[row][order], rtol=1e-5, atol=1e-5 * np.abs(brute).max())
    assert info.count == 8 and info.factory == "Flat"


def test_approximate_index_is_trained_on_a_streamed_sample(featurized_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    build_run_index(IndexConfig(run=run, precondition="cosine", index_factory="IVF2,Flat"))
    ids, feats = feature_matrix(run)
    pre = fit_preconditioner("cosine", None, dim=feats.shape[1])
    scores, hits = search(
        load_index(run / "index" / "index.faiss"), pre.prepare_query(feats[:1]), k=None, nprobe=2
    )
    assert sorted(hits[0].tolist()) == sorted(ids.tolist())  # every list probed: exact
    with pytest.raises(UsageError, match="IVF64"):
        build_run_index(
            IndexConfig(run=run, precondition="cosine", index_factory="IVF64,Flat")
        )  # more lists than vectors
