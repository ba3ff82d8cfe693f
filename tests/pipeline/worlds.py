"""A world that tests edit: a videos folder and a VidGen-style manifest, the stages run on them at
batch 1, and comparisons of two runs (`tests/pipeline/test_incremental.py`, `test_ray.py`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from carv_attrib.pipeline.encode import EncodeConfig, run_encode
from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.search.index import load_index
from carv_attrib.store.features import feature_matrix
from carv_attrib.store.run import RunDir


class World:
    """A videos folder and a VidGen-style manifest that tests edit, plus the stages run on them."""

    def __init__(self, root: Path, demo_data: Path, model: Path):
        self.root, self.model = root, model
        self.videos = root / "videos"
        shutil.copytree(demo_data / "videos", self.videos)
        self.pool = sorted(p.stem for p in self.videos.glob("*.mp4"))
        self.rows: list[dict[str, str]] = [
            r for r in json.loads((demo_data / "manifest.json").read_text()) if r["vid"] in self.pool
        ]
        self.manifest = root / "manifest.json"
        self.write()

    def write(self) -> None:
        self.manifest.write_text(json.dumps(self.rows))

    def encode(self, run: Path, progress: Callable | None = None, **kw: Any) -> Any:
        options = dict(frames=9, size="32x32", fps=8, shard_size=2, batch_size=1, workers=0, device="cpu")
        cfg = EncodeConfig(
            manifest=self.manifest, videos=self.videos, model=str(self.model), run=run, **(options | kw)
        )
        return run_encode(cfg, progress) if progress else run_encode(cfg)

    def featurize(
        self, run: Path, progress: Callable | None = None, index_check: Callable | None = None, **kw: Any
    ) -> Any:
        cfg = FeaturizeConfig(
            run=run, model=str(self.model), draws=2, device="cpu", batch_clips=1, shard_size=2, **kw
        )
        return run_featurize(cfg, progress or (lambda e, i: None), index_check)

    def index(self, run: Path, **kw: Any) -> Any:
        return build_run_index(IndexConfig(run=run, **kw))

    def all_stages(self, run: Path) -> None:
        self.encode(run)
        self.featurize(run)
        self.index(run)


def features_by_id(run: Path) -> dict[int, np.ndarray]:
    ids, feats = feature_matrix(run)
    assert len(set(ids.tolist())) == len(ids), "one live feature per clip"
    return dict(zip(ids.tolist(), feats))


def index_contents(run: Path) -> dict[int, np.ndarray]:
    index = load_index(RunDir(run).faiss_path)
    ids = faiss.vector_to_array(index.id_map)
    return {int(i): index.reconstruct(int(i)) for i in ids}


def assert_same_run(run: Path, scratch: Path) -> None:
    """Identical live features and index contents, bitwise (same batch-1 computation per clip)."""
    a, b = features_by_id(run), features_by_id(scratch)
    assert sorted(a) == sorted(b)
    for cid in b:
        np.testing.assert_array_equal(a[cid], b[cid])
    ia, ib = index_contents(run), index_contents(scratch)
    assert sorted(ia) == sorted(ib)
    for cid in ib:
        np.testing.assert_array_equal(ia[cid], ib[cid])
    assert RunDir(run).index_info().count == RunDir(scratch).index_info().count  # and it is fresh


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under path with its size and mtime: what "changes nothing on disk" compares."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }
