"""pipeline/finetune.py streams the latent cache (`--cache-mb`) and takes `--dtype`: the weights do not
depend on how many clips are held, memory held stays under the bound, a run changed during the
finetune is refused, and bfloat16 mixed precision is recorded, resumes bitwise and keeps fp32 weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from carv_attrib.config import FinetuneConfig
from carv_attrib.errors import UsageError
from carv_attrib.models.train import MixedPrecision
from carv_attrib.pipeline.finetune import read_record, run_finetune
from tests.pipeline.test_finetune import WEIGHTS
from tests.pipeline.test_finetune import _cfg as finetune_cfg


def _cfg(run: Path, model: Path, out: Path, **kw: object) -> FinetuneConfig:
    """test_finetune's config at 5 steps (enough batches to evict from a small cache)."""
    return finetune_cfg(run, model, out, **({"steps": 5} | kw))


def _same(a: Path, b: Path, name: str = WEIGHTS) -> bool:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def _clip_bytes(run: Path) -> int:
    """float32 bytes of one clip of the encoded run (all clips share one shape there)."""
    from carv_attrib.store.latents import iter_cached

    c = next(iter(iter_cached(run)))
    return 4 * (c.latent.numel() + c.text_emb.numel())


def test_the_weights_do_not_depend_on_the_cache_and_memory_stays_bounded(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    whole = run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "whole"))  # the default: all held
    assert whole.cache_peak_bytes == 8 * _clip_bytes(encoded_run)
    assert whole.shard_reads == 6  # 3 shards: their shapes, then their clips, once each
    one = _clip_bytes(encoded_run)
    for mb in (0.0, 4.5 * one / 2**20):  # nothing kept / room for four clips
        s = run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / f"c{mb}", cache_mb=mb))
        assert _same(tmp_path / f"c{mb}", tmp_path / "whole"), mb
        assert read_record(tmp_path / f"c{mb}")["losses"] == read_record(tmp_path / "whole")["losses"]  # type: ignore[index]
        assert s.cache_peak_bytes <= max(mb * 2**20, 3 * one), (mb, s.cache_peak_bytes)  # 3: --batch-clips
        assert s.shard_reads > whole.shard_reads  # streamed: steps read shards
        assert s.fingerprint == whole.fingerprint  # --cache-mb is no setting of the model


def test_a_run_changed_during_the_finetune_is_refused(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    shards = sorted((run / "latents").glob("part-*.parquet"))
    assert len(shards) == 3

    def swap_a_shard(event: str, info: dict) -> None:  # after step 1: shard 0 becomes shard 1's bytes
        if event == "step" and info["step"] == 1:
            shutil.copyfile(shards[1], shards[0])

    with pytest.raises(UsageError, match="changed during the finetune"):
        run_finetune(_cfg(run, tiny_model_dir, tmp_path / "ft", cache_mb=0, steps=30), swap_a_shard)
    assert read_record(tmp_path / "ft")["status"] == "training"  # type: ignore[index]


def test_bfloat16_is_recorded_resumes_bitwise_and_keeps_fp32_weights(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    fp32 = run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "fp32"))
    s = run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "bf16", dtype="bfloat16"))
    rec = read_record(tmp_path / "bf16")
    assert s.dtype == "bfloat16" and rec["settings"]["dtype"] == "bfloat16"  # type: ignore[index]
    assert (
        "autocast" in rec["settings"]["precision"]
        and "float32 master weights" in rec["settings"]["precision"]
    )  # type: ignore[index]
    assert s.fingerprint != fp32.fingerprint
    w = load_file(str(tmp_path / "bf16" / WEIGHTS))
    assert {t.dtype for t in w.values()} == {torch.float32}  # master weights
    assert not _same(tmp_path / "bf16", tmp_path / "fp32")
    # close to float32 (bf16 has 8 bits of mantissa), not equal
    a, b = rec["losses"], read_record(tmp_path / "fp32")["losses"]  # type: ignore[index]
    assert a != b and all(abs(x - y) < 2e-2 * abs(y) for x, y in zip(a, b))

    cut = tmp_path / "bf16-cut"
    cfg = _cfg(encoded_run, tiny_model_dir, cut, dtype="bfloat16", checkpoint_every=2)

    def stop(event: str, info: dict) -> None:
        if event == "step" and info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(cfg, stop)
    run_finetune(cfg)
    assert _same(cut, tmp_path / "bf16")
    with pytest.raises(UsageError, match="other settings"):  # float32 on a bfloat16 OUT
        run_finetune(_cfg(encoded_run, tiny_model_dir, cut))


def test_mixed_precision_runs_the_forward_in_bf16_and_returns_fp32() -> None:
    lin = torch.nn.Linear(4, 3)
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = MixedPrecision(lin)(torch.randn(2, 4))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    out.sum().backward()
    assert (
        lin.weight.grad is not None
        and lin.weight.grad.dtype == torch.float32
        and lin.weight.dtype == torch.float32
    )
