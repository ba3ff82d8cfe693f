"""Session fixtures: a tiny Wan2.1 pipeline saved to disk, demo clips, one encoded run.

Everything is built offline from the real diffusers/transformers classes; no test touches the
network (HF_HUB_OFFLINE=1) or the user's cache (CARV_ATTRIB_CACHE points into tmp).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """The test models are tiny: extra intra-op threads only add synchronisation, and when the
    2 cores are shared (a subprocess under test, another job) they oversubscribe them (measured on
    the tiny model: one forward+backward 0.02 s -> 1.4 s)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["CARV_ATTRIB_CACHE"] = str(tmp_path_factory.mktemp("carv-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from carv_attrib.models.tiny import make_model

    out = tmp_path_factory.mktemp("models") / "tiny-wan"
    make_model(str(out), size="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 demo clips (96x80, 24 frames at 8 fps) and DIR/manifest.json."""
    from carv_attrib.lds.synthetic import make_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    make_demo_data(out, clips=8, seed=0)
    return out


@pytest.fixture(scope="session")
def encoded_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, demo_data: Path) -> Path:
    """The demo clips encoded at 9 frames, 32x32, in shards of 3 (read-only for tests)."""
    from carv_attrib.pipeline.encode import EncodeConfig, run_encode

    run = tmp_path_factory.mktemp("runs") / "encoded"
    run_encode(
        EncodeConfig(
            manifest=demo_data / "manifest.json",
            videos=demo_data / "videos",
            model=str(tiny_model_dir),
            run=run,
            frames=9,
            size="32x32",
            fps=8,
            shard_size=3,
            workers=1,
            device="cpu",
        )
    )
    return run


@pytest.fixture(scope="session")
def featurized_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, encoded_run: Path) -> Path:
    """A copy of `encoded_run` featurized with K=4 stratified-is draws and a cosine index."""
    import shutil

    from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
    from carv_attrib.pipeline.index import IndexConfig, build_run_index

    run = tmp_path_factory.mktemp("runs") / "featurized"
    shutil.copytree(encoded_run, run)
    run_featurize(FeaturizeConfig(run=run, model=str(tiny_model_dir), draws=4, device="cpu", batch_clips=3))
    build_run_index(IndexConfig(run=run, precondition="cosine"))
    return run
