"""config/finetune.py: FinetuneConfig's checks refuse bad values (exit 2) naming the flag, before torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from carv_attrib.config import FinetuneConfig
from carv_attrib.errors import UsageError


def _cfg(tmp_path: Path, **kw: object) -> FinetuneConfig:
    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True, exist_ok=True)
    return FinetuneConfig(**({"run": tmp_path / "run", "model": str(model), "out": tmp_path / "ft"} | kw))  # type: ignore[arg-type]


def test_defaults_validate(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path).validate()
    assert (cfg.steps, cfg.batch_clips, cfg.draws, cfg.optimizer, cfg.density, cfg.lora) == (
        300, 8, 2, "adamw", "uniform", None
    )  # fmt: skip


@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"steps": 0}, "--steps"),
        ({"batch_clips": 0}, "--batch-clips"),
        ({"draws": 0}, "--draws"),
        ({"checkpoint_every": 0}, "--checkpoint-every"),
        ({"clips_per_forward": 0}, "--clips-per-forward"),
        ({"lr": 0.0}, "--lr"),
        ({"optimizer": "lion"}, "--optimizer"),
        ({"lora": 0}, "--lora"),
        ({"lora_alpha": 8.0}, "--lora-alpha"),
        ({"lora": 4, "lora_alpha": -1.0}, "--lora-alpha"),
    ],
)
def test_bad_values_name_their_flag(tmp_path: Path, kw: dict, flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        _cfg(tmp_path, **kw).validate()


@pytest.mark.parametrize("where", ["", "transformer", "transformer/sub", "new"])
def test_out_in_or_at_model_is_refused(tmp_path: Path, where: str) -> None:
    model = tmp_path / "model"
    with pytest.raises(UsageError, match="never writes into the model"):
        _cfg(tmp_path, out=model / where if where else model).validate()


def test_out_beside_model_or_a_hub_id_is_fine(tmp_path: Path) -> None:
    _cfg(tmp_path, out=tmp_path / "model-ft").validate()
    _cfg(tmp_path, model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers").validate()
