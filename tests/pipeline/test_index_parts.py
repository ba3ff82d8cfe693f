"""`carv-attrib index --executor ray` and `--index-shards S` (`carv_attrib.pipeline.index_parts`):
the index filled in parts by Ray tasks and merged is byte for byte the local build (the FAISS file,
the re-ranking vectors, the preconditioner); an index kept as shards searches like the one index (ids
and scores), fanned out; a `file://` URI addresses the run. On a generated run of 600 clips in 6
feature shards (16 dims), and the tiny featurized run for `score`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.errors import UsageError
from carv_attrib.pipeline.index import IndexConfig, build_run_index, run_index
from carv_attrib.pipeline.index_parts import split_groups
from carv_attrib.pipeline.ray_exec import DIE_ONCE_ENV
from carv_attrib.search.index import (
    RayShardedIndex,
    ShardedIndex,
    index_ids,
    load_index,
    load_sharded,
    merge_topk,
    search,
)
from carv_attrib.store.features import feature_matrix
from carv_attrib.store.uri import local_run, read_bytes, split_uri, write_bytes
from tests.pipeline.test_index_memory import make_run

N, D, SHARD = 600, 16, 100
INDEX_FILES = ("index.faiss", "vectors.bin", "vector_ids.npy", "vector_norms.npy", "vectors.meta")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parts") / "run"
    make_run(root, N, D, shard=SHARD)
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def fresh(src: Path, tmp_path: Path, name: str) -> Path:
    run = tmp_path / name
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("index", ".index*"))
    return run


def index_bytes_of(run: Path) -> dict[str, bytes]:
    d = run / "index"
    out = {n: (d / n).read_bytes() for n in INDEX_FILES if (d / n).exists()}
    for p in sorted((d / "preconditioner").rglob("*")):
        if p.is_file():
            out[f"preconditioner/{p.name}"] = p.read_bytes()
    for p in sorted((d / "shards").glob("*.faiss")):
        out[f"shards/{p.name}"] = p.read_bytes()
    return out


def test_split_groups_are_contiguous_balanced_and_never_empty() -> None:
    sel = {s: list(range(10)) for s in range(10)}
    for n in (1, 2, 3, 4, 10, 12):
        groups = split_groups(sel, n)
        assert len(groups) == min(n, 10) and all(groups)
        assert [s for g in groups for s in g] == list(range(10)), "the local build's order"
    assert [list(g) for g in split_groups({0: [0] * 100, 1: [0], 2: [0]}, 3)] == [[0], [1], [2]]


@pytest.mark.parametrize(
    "factory,precondition",
    [(None, "cosine"), ("IVF4,Flat", "cosine"), ("IVF4,SQ8", "trak")],
)
def test_ray_parts_merge_into_the_local_build_byte_for_byte(
    synthetic_run: Path, tmp_path: Path, ray_cluster, factory: str | None, precondition: str
) -> None:
    local = fresh(synthetic_run, tmp_path, "local")
    build_run_index(IndexConfig(run=local, index_factory=factory, precondition=precondition))
    want = index_bytes_of(local)
    assert "index.faiss" in want and (factory is None or "vectors.bin" in want)
    for parts in (2, 3):
        by_ray = fresh(synthetic_run, tmp_path, f"ray{parts}")
        info = build_run_index(
            IndexConfig(
                run=by_ray, index_factory=factory, precondition=precondition, executor="ray", parts=parts
            )
        )
        assert info.build == {"executor": "ray", "parts": parts} and info.shards == 1
        assert index_bytes_of(by_ray) == want, f"{parts} parts"
        assert not list((by_ray / "index").rglob("part-*")), "the part files are removed"


def test_ray_parts_of_a_sketched_index_are_the_local_bytes(
    synthetic_run: Path, tmp_path: Path, ray_cluster
) -> None:
    """--index-dim: the SRHT-sketched preconditioner travels to the parts (pickled once, in Ray's
    object store) and sketches every block as the local build does."""
    kw = {"index_factory": "IVF4,SQ8", "precondition": "normalize", "index_dim": 8}
    local = fresh(synthetic_run, tmp_path, "local")
    build_run_index(IndexConfig(run=local, **kw))
    by_ray = fresh(synthetic_run, tmp_path, "ray")
    info = build_run_index(IndexConfig(run=by_ray, executor="ray", parts=2, **kw))
    assert info.sketch is not None and info.dim == D
    assert index_bytes_of(by_ray) == index_bytes_of(local)


def shard_and_single(synthetic_run: Path, tmp_path: Path, factory: str | None, s: int):
    single = fresh(synthetic_run, tmp_path, "single")
    build_run_index(IndexConfig(run=single, index_factory=factory, precondition="identity"))
    sharded = fresh(synthetic_run, tmp_path, "sharded")
    info = build_run_index(
        IndexConfig(run=sharded, index_factory=factory, precondition="identity", index_shards=s)
    )
    paths = sorted((sharded / "index" / "shards").glob("*.faiss"))
    assert info.shards == s and len(paths) == s and not (sharded / "index" / "index.faiss").exists()
    return single, sharded, load_index(single / "index" / "index.faiss"), load_sharded(paths)


@pytest.mark.parametrize("factory", [None, "IVF4,Flat", "IVF4,SQ8"])
def test_fanned_out_shards_search_like_the_one_index(
    synthetic_run: Path, tmp_path: Path, factory: str | None
) -> None:
    single, sharded, one, shards = shard_and_single(synthetic_run, tmp_path, factory, 3)
    assert isinstance(shards, ShardedIndex) and shards.ntotal == one.ntotal == N
    assert sorted(int(s.ntotal) for s in shards.shards) == [200, 200, 200]
    _, feats = feature_matrix(single)
    q = np.random.default_rng(1).standard_normal((7, D)).astype(np.float32)  # < 20: no BLAS batching
    for k, nprobe in ((10, 1), (10, 2), (50, 4), (None, None), (400, 1)):  # (400, 1): widened
        s1, i1 = search(one, q, k, nprobe)
        s2, i2 = search(shards, q, k, nprobe)
        np.testing.assert_array_equal(i2, i1, err_msg=f"k={k} nprobe={nprobe}")
        np.testing.assert_array_equal(s2, s1, err_msg=f"k={k} nprobe={nprobe}")
    s1, i1 = search(one, q, 400, 1, fill=False)  # unwidened: the same short lists, -1 padded
    s2, i2 = search(shards, q, 400, 1, fill=False)
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_array_equal(np.where(i1 >= 0, s2, 0), np.where(i1 >= 0, s1, 0))
    if factory is None:  # exact: the vectors come back from the shard holding them
        ids, _ = feature_matrix(single)
        np.testing.assert_array_equal(shards.reconstruct(int(ids[450])), one.reconstruct(int(ids[450])))
        pick = ids[[450, 3, 599, 201, 3]]  # across shards, out of order, a repeat: one request per shard
        want = np.stack([one.reconstruct(int(i)) for i in pick])
        np.testing.assert_array_equal(shards.reconstruct_batch(pick), want)
        with pytest.raises(KeyError):
            shards.reconstruct_batch(np.array([int(ids.max()) + 1]))
    # the re-ranking vectors are one store over all shards, the same bytes
    a, b = index_bytes_of(single), index_bytes_of(sharded)
    assert {k: v for k, v in a.items() if k != "index.faiss"} == {
        k: v for k, v in b.items() if not k.startswith("shards/")
    }


def test_a_part_whose_worker_dies_is_retried_into_the_same_bytes(
    synthetic_run: Path, tmp_path: Path, ray_cluster, monkeypatch
) -> None:
    local = fresh(synthetic_run, tmp_path, "local")
    build_run_index(IndexConfig(run=local, index_factory="IVF4,Flat"))
    marker = tmp_path / "died"
    monkeypatch.setenv(DIE_ONCE_ENV, str(marker))  # the first part to add a shard dies (os._exit), once
    by_ray = fresh(synthetic_run, tmp_path, "ray")
    build_run_index(IndexConfig(run=by_ray, index_factory="IVF4,Flat", executor="ray", parts=2))
    assert marker.exists(), "a worker died and Ray retried its part"
    assert index_bytes_of(by_ray) == index_bytes_of(local)


def test_index_through_the_cli(synthetic_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from carv_attrib.cli.app import app

    run = fresh(synthetic_run, tmp_path, "run")
    invoke = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = invoke(
        "index",
        run.resolve().as_uri(),
        "--index-factory",
        "IVF4,Flat",
        "--index-shards",
        "3",
        "--format",
        "json",
    )
    assert r.exit_code == 0, r.output
    info = json.loads((run / "index" / "index_info.json").read_text())
    assert info["shards"] == 3 and info["build"] == {"executor": "local", "parts": 3}
    for args, msg in (
        (("--index-factory", "HNSW8", "--index-shards", "2"), "cannot be split into parts"),
        (("--index-shards", "9"), "the run has 6 feature shards"),
        (("--parts", "2"), "give it with --executor ray"),
    ):
        r = invoke("index", run, *args)
        last = r.output.strip().splitlines()[-1]  # after the "options from run.json" note of a resume
        assert r.exit_code == 2 and last.startswith("error: ") and msg in last, r.output


def test_ray_built_shards_are_the_local_shards(synthetic_run: Path, tmp_path: Path, ray_cluster) -> None:
    local = fresh(synthetic_run, tmp_path, "local")
    build_run_index(IndexConfig(run=local, index_factory="IVF4,Flat", index_shards=2))
    by_ray = fresh(synthetic_run, tmp_path, "ray")
    info = build_run_index(IndexConfig(run=by_ray, index_factory="IVF4,Flat", index_shards=2, executor="ray"))
    assert info.build == {"executor": "ray", "parts": 2}
    assert index_bytes_of(by_ray) == index_bytes_of(local)


def test_a_missing_or_changed_shard_is_refused_when_loaded(synthetic_run: Path, tmp_path: Path) -> None:
    from carv_attrib.errors import DamagedFileError
    from carv_attrib.pipeline.score import load_index_dir
    from carv_attrib.store.run import RunDir

    run = fresh(synthetic_run, tmp_path, "run")
    build_run_index(IndexConfig(run=run, index_factory="IVF4,Flat", index_shards=3))
    info, loaded = RunDir(run).index_snapshot(load_index_dir)
    assert isinstance(loaded.index, ShardedIndex) and loaded.index.ntotal == N and info.shards == 3
    shard = run / "index" / "shards" / "00001.faiss"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(DamagedFileError, match="00001.faiss"):
        RunDir(run).index_snapshot(load_index_dir)


def test_merge_topk_breaks_ties_by_clip_id() -> None:
    s, i = merge_topk(
        [np.array([[3.0, 1.0, 0.0]], np.float32), np.array([[3.0, 2.0, -1.0]], np.float32)],
        [np.array([[9, 4, -1]]), np.array([[2, 7, -1]])],
        4,
    )
    assert i.tolist() == [[2, 9, 7, 4]] and s.tolist() == [[3.0, 3.0, 2.0, 1.0]]


def test_file_uri_run_builds_the_same_index(synthetic_run: Path, tmp_path: Path) -> None:
    by_path = fresh(synthetic_run, tmp_path, "path")
    build_run_index(IndexConfig(run=by_path, index_factory="IVF4,Flat", index_shards=2))
    by_uri = fresh(synthetic_run, tmp_path, "uri")
    uri = by_uri.resolve().as_uri()  # file:///...
    assert uri.startswith("file:///")
    info = run_index(IndexConfig(run=uri, index_factory="IVF4,Flat", index_shards=2))
    assert info.count == N and index_bytes_of(by_uri) == index_bytes_of(by_path)
    assert json.loads((by_uri / "run.json").read_text())  # the invocation recorded in the run
    assert local_run(Path(uri)) == by_uri.resolve(), "file:/abs, as pathlib leaves a URI, is understood"
    fs, path = split_uri(uri)
    write_bytes(fs, f"{path}/x/y.bin", b"abc")
    assert read_bytes(fs, f"{path}/x/y.bin") == b"abc" and not (by_uri / "x" / "y.bin.tmp").exists()
    with pytest.raises(UsageError, match="s3:// run directory is not supported"):
        build_run_index(IndexConfig(run="s3://bucket/run"))


def test_what_cannot_be_split_is_refused_before_any_pass(synthetic_run: Path, tmp_path: Path) -> None:
    run = fresh(synthetic_run, tmp_path, "run")
    for kw, msg in (
        ({"index_factory": "HNSW8", "index_shards": 2}, "cannot be split into parts"),
        ({"index_factory": "IVF4,PQ4x4fs", "index_shards": 2}, "cannot be split into parts"),
        ({"index_shards": 7}, "the run has 6 feature shards"),
        ({"index_shards": 0}, "--index-shards"),
        ({"parts": 2}, "give it with --executor ray"),
        ({"parts": 2, "executor": "ray", "index_shards": 3}, "each index shard is one part"),
        ({"executor": "spark"}, "--executor spark"),
    ):
        with pytest.raises(UsageError, match=msg):
            build_run_index(IndexConfig(run=run, **kw))
    assert not (run / "index").exists()


def test_an_index_kept_as_shards_needs_one_shards_memory(
    synthetic_run: Path, tmp_path: Path, monkeypatch
) -> None:
    import carv_attrib.search.index as ai

    run = fresh(synthetic_run, tmp_path, "run")
    whole = ai.index_bytes(N, D, None)
    monkeypatch.setattr(ai, "available_memory", lambda: whole // 2)
    with pytest.raises(UsageError, match="GiB are available"):
        build_run_index(IndexConfig(run=run, precondition="identity"))
    info = build_run_index(IndexConfig(run=run, precondition="identity", index_shards=3))  # 200 each
    assert info.count == N and info.shards == 3


def test_ray_not_installed_is_one_line(synthetic_run: Path, tmp_path: Path, monkeypatch) -> None:
    run = fresh(synthetic_run, tmp_path, "run")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UsageError, match=r"--executor ray needs Ray: pip install"):
        build_run_index(IndexConfig(run=run, executor="ray", parts=2))
    assert not (run / "index").exists()


def test_ray_actors_search_like_the_threads(synthetic_run: Path, tmp_path: Path, ray_cluster) -> None:
    for factory in (None, "IVF4,Flat"):
        _, sharded, one, shards = shard_and_single(synthetic_run, tmp_path / str(factory), factory, 3)
        actors = RayShardedIndex(sorted((sharded / "index" / "shards").glob("*.faiss")), ray_cluster)
        try:
            assert actors.ntotal == N and actors.d == D and actors.nlist == shards.nlist
            np.testing.assert_array_equal(index_ids(actors), index_ids(shards))
            q = np.random.default_rng(2).standard_normal((5, D)).astype(np.float32)
            for k, nprobe in ((10, 1), (None, None), (400, 1)):
                s1, i1 = search(one, q, k, nprobe)
                s2, i2 = search(actors, q, k, nprobe)
                np.testing.assert_array_equal(i2, i1)
                np.testing.assert_array_equal(s2, s1)
            cid = int(index_ids(one)[123])
            if factory is None:
                np.testing.assert_array_equal(actors.reconstruct(cid), one.reconstruct(cid))
                pick = index_ids(one)[[5, 123, 480]]
                np.testing.assert_array_equal(
                    actors.reconstruct_batch(pick), np.stack([one.reconstruct(int(i)) for i in pick])
                )
            else:
                with pytest.raises(RuntimeError):  # IVF without a direct map: as FAISS itself
                    actors.reconstruct(cid)
        finally:
            actors.close()


def test_score_over_index_shards_equals_score_over_one_index(
    encoded_run: Path, tiny_model_dir: Path, demo_data: Path, tmp_path: Path, ray_cluster
) -> None:
    from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
    from carv_attrib.pipeline.score import ScoreConfig, run_score

    featurized = tmp_path / "featurized"  # 3 feature shards of at most 3 clips
    shutil.copytree(encoded_run, featurized)
    run_featurize(
        FeaturizeConfig(
            run=featurized, model=str(tiny_model_dir), draws=4, device="cpu", batch_clips=3, shard_size=3
        )
    )
    vid = "demo-00004"
    caption = {r["vid"]: r["caption"] for r in json.loads((demo_data / "manifest.json").read_text())}[vid]
    docs = {}

    def score(run: Path, **kw) -> list:
        doc = run_score(
            ScoreConfig(
                run=run,
                queries=[demo_data / "videos" / f"{vid}.mp4"],
                prompt=caption,
                top_k=3,
                device="cpu",
                **kw,
            )
        )
        return [(r["clip_id"], r["score"], r["percentile"]) for r in doc["queries"][0]["results"]]

    for s in (1, 3):
        run = tmp_path / f"s{s}"
        shutil.copytree(featurized, run)
        build_run_index(
            IndexConfig(run=run, precondition="cosine", index_factory="IVF2,Flat", index_shards=s)
        )
        docs[s] = score(run)
    assert docs[3] == docs[1] and docs[1][0][1] == pytest.approx(1.0, abs=1e-4)
    assert score(tmp_path / "s3", executor="ray") == docs[1], "one Ray actor per shard: the same results"
    with pytest.raises(UsageError, match="searches an index kept as shards"):
        score(tmp_path / "s1", executor="ray")
    # a stray shard file (hand-copied) is refused, not searched: the shards are the recorded ones
    stray = tmp_path / "s3" / "index" / "shards"
    shutil.copy(stray / "00000.faiss", stray / "00007.faiss")
    with pytest.raises(UsageError, match=r"records 3 shard\(s\) but the folder differs \(extra: 00007.faiss"):
        score(tmp_path / "s3")
