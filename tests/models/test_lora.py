"""models/lora.py: adapters in the diffusers LoRA format, loadable by WanPipeline.load_lora_weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from carv_attrib.errors import ModelLoadError, UsageError
from carv_attrib.models.lora import (
    LORA_META,
    LORA_WEIGHTS,
    add_lora,
    load_lora,
    lora_layers,
    merge_lora,
    save_lora,
)
from carv_attrib.models.wan import load_transformer


def _inputs(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    d = transformer.config.text_dim
    return {
        "hidden_states": torch.randn(1, 16, 2, 4, 4, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 8, d, generator=g),
    }


def _out(transformer: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**_inputs(transformer), return_dict=False)[0]


def _perturbed(tiny_model_dir: Path, rank: int = 2) -> torch.nn.Module:
    tr = load_transformer(str(tiny_model_dir))
    add_lora(tr, rank=rank, seed=1)
    with torch.no_grad():  # B = 0 at initialisation: give the adapter an effect to round-trip
        for name, prm in tr.named_parameters():
            if "lora_B" in name:
                prm.copy_(0.05 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(len(name))))
    return tr


def test_fresh_adapter_leaves_model_unchanged_and_only_lora_trainable(tiny_model_dir: Path) -> None:
    base = load_transformer(str(tiny_model_dir))
    ref = _out(base)
    cfg = add_lora(base, rank=2)
    assert cfg["rank"] == 2 and cfg["alpha"] == 2.0
    assert torch.equal(_out(base), ref)
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    layers = lora_layers(base)
    assert len(layers) == len(trainable)  # one Linear (no bias) per lora_A / lora_B
    assert {m.weight.shape[0] for n, m in layers if ".lora_A." in n} == {2}


def test_save_load_round_trip_and_diffusers_pipeline_loads_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    tr = _perturbed(tiny_model_dir)
    want = _out(tr)
    out = save_lora(tr, tmp_path / "lora", meta={"base": "tiny"})
    assert (out / LORA_WEIGHTS).is_file()
    assert json.loads((out / LORA_META).read_text())["base"] == "tiny"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    fresh = load_transformer(str(tiny_model_dir))
    ident = load_lora(fresh, out)
    assert ident["base"] == "tiny" and len(ident["weights_sha256"]) == 64
    torch.testing.assert_close(_out(fresh), want)  # same weights, same ops: float32 round-off only

    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_model_dir))
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(_out(pipe.transformer), want)


def test_merge_equals_adapter(tiny_model_dir: Path) -> None:
    tr = _perturbed(tiny_model_dir)
    want = _out(tr)
    merged = merge_lora(tr)
    assert not lora_layers(merged)
    # W + sBA folded once: the difference is float32 rounding of a sum of `rank` products
    torch.testing.assert_close(_out(merged), want)


def test_refusals(tiny_model_dir: Path, tmp_path: Path) -> None:
    tr = load_transformer(str(tiny_model_dir))
    with pytest.raises(UsageError, match="not a LoRA directory"):
        load_lora(tr, tmp_path)
    with pytest.raises(UsageError, match="positive"):
        add_lora(tr, rank=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    from safetensors.torch import save_file

    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 3)}, str(bad / LORA_WEIGHTS))
    with pytest.raises(ModelLoadError, match="do not load"):
        load_lora(load_transformer(str(tiny_model_dir)), bad)
