"""An interrupted featurize keeps the clips it finished: a shard is committed on Ctrl-C, on SIGTERM and
every --commit-every seconds, not only every --shard-size clips (issue 24: Ctrl-C at 8/30 used to
recompute all 30)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from carv_attrib.errors import UsageError
from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
from carv_attrib.store.features import feature_matrix
from carv_attrib.store.shards import ShardStore
from tests.pipeline.test_featurize import copy_latents


def _cfg(run: Path, model: Path, **kw: Any) -> FeaturizeConfig:
    return FeaturizeConfig(run=run, model=str(model), draws=4, device="cpu", batch_clips=3, **kw)


def _same_features(a: Path, b: Path) -> None:
    ids_a, fa = feature_matrix(a)
    ids_b, fb = feature_matrix(b)
    assert sorted(ids_a.tolist()) == sorted(ids_b.tolist())
    # the rerun's batches hold other clips than the uninterrupted run's: the per-clip feature is the
    # same sum, reduced in another order, so float32 round-off (a few ulps of the largest entry)
    np.testing.assert_allclose(
        fa[np.argsort(ids_a)],
        fb[np.argsort(ids_b)],
        rtol=0,
        atol=64 * np.finfo(np.float32).eps * np.abs(fb).max(),
    )


def test_ctrl_c_commits_the_finished_clips_and_the_rerun_computes_only_the_rest(
    encoded_run: Path, featurized_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = copy_latents(encoded_run, tmp_path / "run")
    seen = []

    def progress(kind: str, info: Any) -> None:
        if kind == "clip":
            seen.append(info)
            if len(seen) == 4:  # the second batch of 3 is in flight
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_featurize(_cfg(run, tiny_model_dir), progress)  # shard_size 64: no shard would be due yet
    store = ShardStore(run, "features")
    assert len(store.done_shards()) == 1
    ids, _ = feature_matrix(run)
    assert len(ids) == 3  # the first batch kept; the one in flight is recomputed
    s = run_featurize(_cfg(run, tiny_model_dir))
    assert s.computed == 8 - 3 and s.changes["unchanged"] == 3
    _same_features(run, featurized_run)


def test_commit_every_seconds_writes_small_shards(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = copy_latents(encoded_run, tmp_path / "run")
    # a tiny interval: every batch is due, so 8 clips in batches of 3 make 3 shards (3, 3, 2)
    s = run_featurize(_cfg(run, tiny_model_dir, commit_every=1e-9))
    assert s.shards_written == 3
    assert [ShardStore(run, "features").read_shard(i).num_rows for i in range(3)] == [3, 3, 2]


def test_commit_every_must_be_positive(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--commit-every"):
        _cfg(tmp_path, tiny_model_dir, commit_every=0).validate()


FEATURIZE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
    import carv_attrib.pipeline.featurize as f
    real = f._feature_batches
    def slow(*a, **k):  # a batch every ~0.5 s: time for the parent to send SIGTERM mid-run
        for batch in real(*a, **k):
            yield batch
            print("batch", flush=True)  # after the yield: the stage holds this batch's rows
            import time; time.sleep(0.5)
    f._feature_batches = slow
    try:
        run_featurize(FeaturizeConfig(run=Path(sys.argv[1]), model=sys.argv[2], draws=4, device="cpu",
                                      batch_clips=3))
    except KeyboardInterrupt:
        sys.exit(130)
    """
)


def test_sigterm_commits_like_ctrl_c(
    encoded_run: Path, featurized_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = copy_latents(encoded_run, tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", FEATURIZE, str(run), str(tiny_model_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 300  # generous: model load on a loaded 2-core machine
    while proc.stdout.readline().strip() != "batch":
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, proc.stderr.read() if proc.stderr else ""
    ids, _ = feature_matrix(run)
    assert 3 <= len(ids) < 8
    assert run_featurize(_cfg(run, tiny_model_dir)).computed == 8 - len(ids)
    _same_features(run, featurized_run)
