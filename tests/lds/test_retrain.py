"""lds/retrain.py: a LoRA retraining follows `finetune --lora`'s recipe step for step (bitwise the
adapter finetune writes for the same clips), and a LoraTrainJob is cached by its gt.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from carv_attrib.config import FinetuneConfig
from carv_attrib.lds.retrain import LoraTrainJob, run_trainings, train_lora
from carv_attrib.models.lora import LORA_WEIGHTS, lora_state_dict
from carv_attrib.models.wan import load_transformer
from carv_attrib.pipeline.finetune import read_record, run_finetune
from carv_attrib.store.latents import iter_cached


def test_train_lora_is_finetunes_recipe(encoded_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    run_finetune(
        FinetuneConfig(
            run=encoded_run, model=str(tiny_model_dir), out=out, steps=3, lora=2, lora_alpha=3.0, lr=5e-3,
            batch_clips=3, draws=2, seed=7, device="cpu",
        )
    )  # fmt: skip
    st = read_record(out)["settings"]  # type: ignore[index]
    t = load_transformer(str(tiny_model_dir))
    losses = train_lora(
        t, list(iter_cached(encoded_run)), rank=st["lora"]["rank"], alpha=st["lora"]["alpha"],
        targets=st["lora"]["targets"], steps=3, batch_clips=st["batch_clips"], draws=st["draws"], lr=st["lr"],
        optimizer=st["optimizer"], density=st["density"], seed=st["seed"],
    )  # fmt: skip
    assert losses == read_record(out)["losses"]  # type: ignore[index]
    mine = {f"transformer.{k}": v for k, v in lora_state_dict(t).items()}
    saved = load_file(str(out / LORA_WEIGHTS))
    assert sorted(mine) == sorted(saved)
    assert all(torch.equal(mine[k], saved[k]) for k in saved)


def test_lora_job_is_cached(encoded_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    ids = [c.clip_id for c in iter_cached(encoded_run)]
    job = LoraTrainJob(
        name="subset-000", out=str(tmp_path / "a"), model=str(tiny_model_dir), run=str(encoded_run),
        train_ids=ids[:4], query_ids=ids[6:], rank=2, alpha=2.0, targets=["to_q", "to_v"], steps=2,
        batch_clips=2, draws=1, lr=5e-3, gt_draws=3,
    )  # fmt: skip
    lines: list[str] = []
    first = run_trainings([job], workers=1, say=lines.append)["subset-000"]
    assert len(first["query_loss"]) == 2 and (tmp_path / "a" / LORA_WEIGHTS).is_file()
    meta = json.loads((tmp_path / "a" / "carv_lora.json").read_text())
    assert meta["retrained"]["train_ids"] == ids[:4]
    assert any(line.startswith("trainings 1/1 (") for line in lines)
    lines.clear()
    assert run_trainings([job], workers=1, say=lines.append)["subset-000"] == first
    assert lines == ["trainings: 1 of 1 cached"]
