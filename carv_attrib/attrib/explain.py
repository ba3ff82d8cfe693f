"""Why a clip ranks high: the split of an attribution score over the model's layers and blocks.

A score is an inner product of two preconditioned feature vectors, s = ⟨ψ_q, ψ_i⟩, and a kron
feature is the concatenation of per-layer blocks (k_out·k_in entries per Linear layer, in the
projector's layer order, one run of layers per checkpoint). So s = Σ_layers ⟨ψ_q[l], ψ_i[l]⟩ exactly:
each layer's term says how much of the agreement between the query's and the clip's gradients lives in
that layer (LoGra's per-layer view; TRAK/TracIn scores decompose the same way). Terms can be negative.

    split = layer_split(psi_q, psi_i, layer_slices(info.projector, info.blocks))
    by_block(split)   # {"blocks.0": ..., "blocks.1": ...}: the transformer block of each layer summed
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np


def layer_slices(projector: dict[str, Any], blocks: list[int]) -> list[tuple[str, slice]]:
    """[(layer name, its slice of the feature)] for a kron projector spec repeated per checkpoint
    block (names prefixed "ckpt<j>/" when there are several); ValueError for a dense projector."""
    if projector.get("kind") != "kron" or "layers" not in projector:
        raise ValueError(
            "--explain needs per-layer (kron) features; this index was built with a dense projector"
        )
    out, start = [], 0
    for j in range(len(blocks)):
        prefix = f"ckpt{j}/" if len(blocks) > 1 else ""
        for ly in projector["layers"]:
            n = ly["k_out"] * ly["k_in"]
            out.append((prefix + ly["name"], slice(start, start + n)))
            start += n
        if start != sum(blocks[: j + 1]):
            raise ValueError(f"projector layers cover {start} dims, the index blocks {sum(blocks[: j + 1])}")
    return out


def layer_split(psi_q: np.ndarray, psi_i: np.ndarray, slices: list[tuple[str, slice]]) -> dict[str, float]:
    """{layer: ⟨ψ_q[l], ψ_i[l]⟩} for one query (D,) and one clip (D,), float64 sums (they add up to
    the score to float32 rounding)."""
    prod = psi_q.astype(np.float64) * psi_i.astype(np.float64)
    return {name: float(prod[sl].sum()) for name, sl in slices}


def by_block(split: dict[str, float]) -> dict[str, float]:
    """The layer terms summed per transformer block ("blocks.N"; other layers under their own name)."""
    out: dict[str, float] = {}
    for name, v in split.items():
        m = re.match(r"^((?:ckpt\d+/)?blocks\.\d+)\.", name)
        key = m.group(1) if m else name
        out[key] = out.get(key, 0.0) + v
    return out


def explain_result(split: dict[str, float], top: int = 5) -> dict[str, Any]:
    """The JSON of one result's explanation: per-block sums, the `top` layers by |term|, the total."""
    layers = sorted(split.items(), key=lambda kv: -abs(kv[1]))[:top]
    return {
        "total": sum(split.values()),
        "by_block": by_block(split),
        "top_layers": [{"layer": k, "score": v} for k, v in layers],
    }
