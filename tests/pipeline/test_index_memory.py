"""Indexing streams: on a generated 10^5-row run (400 MB of float32 features) `build_run_index` with
an IVF-PQ factory grows the process's peak memory by less than half the features' size (the live
view, one shard, the bounded training sample and the PQ codes), measured in a fresh interpreter.
Also: an index factory that the run's vectors cannot train is refused before any pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from carv_attrib.errors import UsageError
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.store.manifest import ClipTable
from carv_attrib.store.run import RunDir
from carv_attrib.store.sources import SourcedClips, SourceId

N, D, SHARD = 100_000, 1024, 2_000  # 8 MB shards, as at 64 clips x 30,000 dims

LAT_CONFIG = {
    "frames": 5, "height": 32, "width": 32, "fps": 8.0, "pad_short": False, "dtype": "float32",
    "latent_dtype": "float32", "model": {"components": {}, "fingerprint": "m"},
}  # fmt: skip


def make_run(root: Path, n: int, d: int, shard: int = SHARD) -> int:
    """A run of n clips with random d-dim features, written `shard` rows a shard; returns feature bytes."""
    run = RunDir(root)
    ids = np.arange(1, n + 1, dtype=np.int64) * 7919
    keys = [f"k{i}" for i in range(n)]
    clips = ClipTable(ids.tolist(), [f"v{i}" for i in range(n)], ["c"] * n, ["/x.mp4"] * n)
    SourcedClips(clips, [SourceId(None, None, None)] * n, keys).write(run.manifest_table)
    lat_fp = run.latents.prepare(LAT_CONFIG)
    feat_cfg = {
        "latents": lat_fp, "transformers": ["t"], "projector": {"dim": d}, "draws": {"k": 1},
        "output_fn": "sqnorm", "timestep": "t", "dtype": "float32",
    }  # fmt: skip
    run.features.prepare(feat_cfg)
    rng = np.random.default_rng(0)
    for s, lo in enumerate(range(0, n, shard)):
        hi = min(n, lo + shard)
        sha = [f"l{i}" for i in range(lo, hi)]
        lat = pa.table(
            {
                "clip_id": ids[lo:hi],
                "source_key": keys[lo:hi],
                "status": ["ok"] * (hi - lo),
                "latent_sha": sha,
            }
        )
        run.latents.write_shard(s, lat, {"shard": s, "clips": hi - lo}, {})
        x = rng.standard_normal((hi - lo, d), dtype=np.float32)
        feat = pa.table(
            {
                "clip_id": ids[lo:hi], "latent_sha": sha, "status": ["ok"] * (hi - lo),
                "feature": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d),
            }
        )  # fmt: skip
        run.features.write_shard(s, feat, {"shard": s, "clips": hi - lo}, {"blocks": [d]})
    return n * d * 4


BUILD = """
import json, resource, sys
import carv_attrib.search.index as ai
from carv_attrib.pipeline.index import IndexConfig, build_run_index
ai.TRAIN_SAMPLE_BYTES = 16 << 20  # the budget scaled with the test (2 GiB at a million clips)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
info = build_run_index(IndexConfig(run=sys.argv[1], index_factory="IVF64,PQ128x4fs", vector_dtype="none"))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after, "count": info.count}))
"""


@pytest.mark.slow
def test_indexing_a_1e5_row_run_never_holds_its_features(tmp_path: Path) -> None:
    feature_bytes = make_run(tmp_path / "run", N, D)
    out = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["count"] == N
    grown = m["after"] - m["before"]
    assert grown < feature_bytes / 2, (
        f"peak memory grew {grown / 2**20:.0f} MiB for {feature_bytes / 2**20:.0f} MiB of features"
    )


def test_a_factory_the_run_cannot_train_is_refused_before_any_pass(tmp_path: Path) -> None:
    make_run(tmp_path / "run", 50, 16)
    with pytest.raises(UsageError, match="50 vectors cannot train it"):
        build_run_index(IndexConfig(run=tmp_path / "run", index_factory="IVF256,Flat"))
    assert not (tmp_path / "run" / "index").exists()


def test_an_index_that_does_not_fit_in_memory_is_refused_before_any_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import carv_attrib.search.index as ai

    make_run(tmp_path / "run", 500, 64)
    monkeypatch.setattr(ai, "available_memory", lambda: 64 << 10)  # 64 KiB free
    with pytest.raises(UsageError, match=r"needs about .* GiB but .* GiB are available"):
        build_run_index(IndexConfig(run=tmp_path / "run"))
    assert not (tmp_path / "run" / "index").exists()
    monkeypatch.setattr(ai, "available_memory", lambda: 1 << 30)
    assert build_run_index(IndexConfig(run=tmp_path / "run", index_factory="IVF8,SQ8")).count == 500


def test_index_size_estimates_match_faiss(tmp_path: Path) -> None:
    """`index_bytes` against the serialised size of real indexes (10^4 vectors): within 10 %."""
    import faiss

    import carv_attrib.search.index as ai

    x = np.random.default_rng(0).standard_normal((10_000, 64), dtype=np.float32)
    for factory in (None, "IVF64,SQ8", "IVF64,PQ16x4fs", "HNSW16"):
        index = ai.new_index(64, factory, use_gpu=False)
        if not index.is_trained:
            ai.train_index(index, x, factory)
        ai.add_vectors(index, np.arange(len(x)), x)
        real = len(faiss.serialize_index(index))
        assert abs(ai.index_bytes(len(x), 64, factory) - real) <= 0.1 * real, (factory, real)


TRAK_BUILD = """
import json, resource, sys
from carv_attrib.pipeline.index import IndexConfig, build_run_index
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
info = build_run_index(IndexConfig(run=sys.argv[1], precondition="trak"))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after, "count": info.count, "pre": info.preconditioner}))
"""


def test_trak_above_the_clip_count_is_factored_and_never_holds_a_dense_inverse(tmp_path: Path) -> None:
    """256 clips x 20,480 dims: the dense inverse alone is 3.2 GiB (three such at its fit); the
    factored form holds the float64 features (40 MiB, turned into the factor in place) and 256x256
    matrices. The Flat index (20 MiB) and a shard in flight come on top."""
    n, d = 256, 20_480
    feature_bytes = make_run(tmp_path / "run", n, d)
    out = subprocess.run(
        [sys.executable, "-c", TRAK_BUILD, str(tmp_path / "run")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["count"] == n and m["pre"]["forms"] == ["factored"] and m["pre"]["ranks"] == [n]
    grown = m["after"] - m["before"]
    assert grown < 8 * feature_bytes, f"peak memory grew {grown / 2**20:.0f} MiB"  # dense: > 6 GiB
    files = sorted(p.name for p in (tmp_path / "run" / "index" / "preconditioner").iterdir())
    assert files == ["precondition.json", "trak_eigvals_0.npy", "trak_factor_0.npy"]


def test_the_trak_preconditioner_counts_in_the_memory_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import carv_attrib.search.index as ai
    from carv_attrib.pipeline.index import precheck_index
    from carv_attrib.search.precondition import trak_bytes

    make_run(tmp_path / "run", 300, 256)  # dense: 300 clips >= 256 dims
    flat = ai.index_bytes(300, 256, None)
    trak = trak_bytes(300, [256])
    assert trak["forms"] == ["dense"] and trak["fit_peak"] > flat
    monkeypatch.setattr(ai, "available_memory", lambda: flat + trak["stored"] // 2)  # the index alone fits
    with pytest.raises(UsageError, match=r"with Flat and the trak preconditioner \(dense\) needs about"):
        build_run_index(IndexConfig(run=tmp_path / "run", precondition="trak"))
    with pytest.raises(UsageError, match="trak preconditioner"):
        precheck_index(IndexConfig(run=tmp_path / "run", precondition="trak"), 256, 300)
    assert build_run_index(IndexConfig(run=tmp_path / "run")).count == 300  # identity: fits
    monkeypatch.setattr(ai, "available_memory", lambda: trak["fit_peak"] + flat)
    info = build_run_index(IndexConfig(run=tmp_path / "run", precondition="trak"))
    assert info.preconditioner["forms"] == ["dense"]


def test_a_factored_trak_index_holds_the_dense_ones_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same run indexed with the factored form (blocks above a lowered DENSE_MAX_DIM) and the dense
    one: the indexed vectors agree to float32 rounding, index_info records the form, and the index
    directory loads back (score's `load_index_dir`) with the factored preconditioner."""
    import carv_attrib.search.precondition as P
    from carv_attrib.pipeline.score import load_index_dir

    make_run(tmp_path / "run", 40, 64)
    run = RunDir(tmp_path / "run")

    def vectors() -> np.ndarray:
        index = load_index_dir(run.index_dir).index
        ids = np.arange(1, 41, dtype=np.int64) * 7919
        return np.stack([index.reconstruct(int(i)) for i in ids])

    dense = build_run_index(IndexConfig(run=tmp_path / "run", precondition="trak"))
    assert dense.preconditioner["forms"] == ["dense"]
    v_dense = vectors()
    monkeypatch.setattr(P, "DENSE_MAX_DIM", 16)
    fact = build_run_index(IndexConfig(run=tmp_path / "run", precondition="trak"))
    assert fact.preconditioner["forms"] == ["factored"] and fact.preconditioner["ranks"] == [40]
    assert load_index_dir(run.index_dir).pre.forms == ["factored"]
    v_fact = vectors()
    # two float32 roundings of ψ, plus the float64 gap of the two forms (≤ 8·max(n, d)·eps·κ·‖φ‖/λ)
    pre = load_index_dir(run.index_dir).pre
    lam = pre.lambdas[0]
    kappa = (float(pre.factors[0].s.max()) + lam) / lam
    phi_norm = float(np.linalg.norm(pre.raw_from_train(v_fact), axis=1).max())
    atol = 2 * float(np.finfo(np.float32).eps) * np.abs(v_dense).max()
    atol += 8 * 64 * float(np.finfo(np.float64).eps) * kappa * phi_norm / lam
    np.testing.assert_allclose(v_fact, v_dense, rtol=0, atol=atol)
