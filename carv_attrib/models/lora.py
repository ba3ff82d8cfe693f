"""LoRA adapters on a Wan transformer, in the diffusers LoRA format.

A LoRA directory is what `WanPipeline.save_lora_weights` writes and `WanPipeline.load_lora_weights`
reads: `pytorch_lora_weights.safetensors` with keys `transformer.<module>.lora_A.weight` (r, in) and
`transformer.<module>.lora_B.weight` (out, r), plus the peft `LoraConfig` as safetensors metadata (so
rank, alpha and target modules travel with the weights). carv-attrib adds `carv_lora.json` beside it:
the base model's identity and how the adapter was trained (provenance; absent in adapters trained
elsewhere, which load all the same).

The adapted layer computes W x + (alpha / r) · B A x (peft `LoraLayer`, Hu et al. 2021,
arXiv 2106.09685). Attribution through an adapter differentiates only A and B: a feature of
r·(in + out) numbers per layer, small enough to keep exact.

    transformer = load_transformer("models/tiny-wan")
    add_lora(transformer, rank=4)                     # fresh adapter: B = 0, the model is unchanged
    save_lora(transformer, "lora/", extra={"steps": 100})
    transformer = load_transformer("models/tiny-wan")
    load_lora(transformer, "lora/")                   # the adapter on the base model, trainable off
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carv_attrib.atomic import atomic_path
from carv_attrib.errors import ModelLoadError, UsageError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name
LORA_META = "carv_lora.json"
ADAPTER = "default"
# The attention projections of every block (self- and cross-attention): the targets of most Wan2.1
# LoRA recipes (diffusers' examples, musubi-tuner); the FFN can be added with `targets`.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def is_lora_dir(path: str | Path) -> bool:
    return (Path(path) / LORA_WEIGHTS).is_file()


def add_lora(
    transformer: Any,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> dict[str, Any]:
    """Attach a fresh peft LoRA adapter (A ~ kaiming-uniform seeded by `seed`, B = 0, so the model's
    output is unchanged) and leave only its parameters trainable. alpha defaults to rank (scale 1).
    Returns the adapter's config as a plain dict (rank, alpha, targets)."""
    from peft import LoraConfig

    if rank < 1:
        raise UsageError(f"--lora {rank}: the rank must be a positive integer")
    cfg = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        target_modules=list(targets),
        init_lora_weights=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(cfg, adapter_name=ADAPTER)
    for name, prm in transformer.named_parameters():
        prm.requires_grad_("lora_" in name)
    return {"rank": int(rank), "alpha": float(cfg.lora_alpha), "targets": list(targets)}


def lora_state_dict(transformer: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights under diffusers' key names (`transformer.` prefix added by the saver)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER)


def save_lora(transformer: Any, out: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the adapter of `transformer` to OUT (diffusers format, loadable by
    `WanPipeline.load_lora_weights(OUT)`), plus `carv_lora.json` with `meta`. Each file is written
    under a temporary name and renamed, so a killed save leaves the previous adapter."""
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict  # noqa: F401  (peft must be importable)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(transformer).items()}
    peft_cfg = transformer.peft_config[ADAPTER].to_dict()
    peft_cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_cfg.items()}
    with atomic_path(out / LORA_WEIGHTS) as tmp:
        WanPipeline.save_lora_weights(
            str(tmp.parent),
            transformer_lora_layers=state,
            weight_name=tmp.name,
            transformer_lora_adapter_metadata=peft_cfg,
        )
    record = dict(meta or {})
    record["weights_sha256"] = file_sha256(out / LORA_WEIGHTS)
    with atomic_path(out / LORA_META) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_lora(transformer: Any, lora: str | Path) -> dict[str, Any]:
    """Load the adapter at LORA onto `transformer` (its base model), as `WanPipeline.load_lora_weights`
    does, and return its identity (`lora_identity`). UsageError (exit 2) when LORA is not a diffusers
    LoRA directory; ModelLoadError when its weights do not fit this transformer (another base)."""
    from diffusers import WanPipeline

    path = Path(lora)
    if not is_lora_dir(path):
        raise UsageError(
            f"--lora {lora}: not a LoRA directory (expected {LORA_WEIGHTS}, as WanPipeline.save_lora_weights "
            "or `carv-attrib finetune --lora RANK` writes it)"
        )
    try:
        state = WanPipeline.lora_state_dict(str(path), weight_name=LORA_WEIGHTS, return_lora_metadata=True)
        state, metadata = state if isinstance(state, tuple) else (state, None)
        transformer.load_lora_adapter(state, prefix="transformer", adapter_name=ADAPTER, metadata=metadata)
    except Exception as exc:
        raise ModelLoadError(
            f"--lora {lora}: its weights do not load onto this model's transformer "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); was it trained on another base model?"
        ) from exc
    missing = [k for k in state if "lora_" not in k]
    if missing:  # pragma: no cover - diffusers refuses these itself
        raise ModelLoadError(f"--lora {lora}: unexpected non-LoRA keys {missing[:3]}")
    transformer.eval()
    return lora_identity(path)


def lora_identity(lora: str | Path) -> dict[str, Any]:
    """What an index records of an adapter: its weights' sha256, rank/alpha/targets and, when
    carv-attrib trained it, the base model and training settings (carv_lora.json)."""
    path = Path(lora)
    ident: dict[str, Any] = {"path": str(path.resolve()), "weights_sha256": file_sha256(path / LORA_WEIGHTS)}
    meta_file = path / LORA_META
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        ident.update({k: v for k, v in meta.items() if k != "weights_sha256"})
    return ident


def lora_layers(transformer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The adapter's trainable Linear modules, in module order: (name, lora_A / lora_B Linear).
    Their gradients are the LoRA attribution feature (A: (r, in), B: (out, r) per adapted layer)."""
    out = []
    for name, mod in transformer.named_modules():
        parts = name.split(".")
        if isinstance(mod, nn.Linear) and len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B"):
            if parts[-1] == ADAPTER:
                out.append((name, mod))
    return out


def merge_lora(transformer: Any) -> Any:
    """Fold the adapter into the base weights (W + (alpha/r) B A) and drop it: the merged model
    whose full-parameter gradients the LoRA features are compared with."""
    transformer.fuse_lora()
    transformer.unload_lora()
    for prm in transformer.parameters():
        prm.requires_grad_(False)
    return transformer


def lora_config(transformer: Any) -> dict[str, Any]:
    """The loaded adapter's rank, alpha and target modules (its peft `LoraConfig`), as plain JSON."""
    cfg = transformer.peft_config[ADAPTER]
    targets = cfg.target_modules
    targets = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
    return {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha), "targets": targets}
