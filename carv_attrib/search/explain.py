"""Why a clip ranks high: the split of an attribution score over the model's layers and blocks.

A score is an inner product of two preconditioned feature vectors, s = ⟨ψ_q, ψ_i⟩, and a kron
feature is the concatenation of per-layer blocks (k_out·k_in entries per Linear layer, in the
projector's layer order, one run of layers per checkpoint). So s = Σ_layers ⟨ψ_q[l], ψ_i[l]⟩ exactly:
each layer's term says how much of the agreement between the query's and the clip's gradients lives in
that layer (LoGra's per-layer view; TRAK/TracIn scores decompose the same way). Terms can be negative.

    split = layer_split(psi_q, psi_i, layer_slices(info.projector, info.blocks))
    by_block(split)   # {"blocks.0": ..., "blocks.1": ...}: the transformer block of each layer summed
    by_kind(split)    # {"self_attention": ..., "cross_attention": ..., "feed_forward": ..., "other": ...}

Over timesteps: a clip's feature is the CARV average φ_i = (1/K) Σ_k w_k φ_ik over its K draws
(`carv_attrib.attrib.gradients`), and each preconditioner is linear once the clip's norm is fixed
(`Preconditioner.prepare_train_parts`), so s = Σ_k ⟨ψ_q, ψ(w_k φ_ik / K)⟩ exactly: one term per
draw, i.e. per stratum of the stratified schemes (draw k lies in stratum [k/K, (k+1)/K) of the
proposal's CDF). `stratum_split` sums the terms per stratum and labels each with its σ interval.
Under iid draws the bands are the density's K equal-mass intervals, each holding 0, 1 or more draws.

An index built with `--index-dim D'` (`search.sketch`) ranks by ⟨Sψ_q, Sψ_i⟩, and S mixes the layers, so
no split of the sketched score is per layer. `score --explain` then splits the *uncompressed* score
⟨ψ_q, ψ_i⟩ instead: ψ_i from the clip's stored per-layer feature (RUN/features) preconditioned as the
index was, ψ_q the query's unsketched vector. Both splits stay exact (they add up to
"uncompressed_score", by_stratum_residual is measured against it), and "sketch_error" = score −
uncompressed_score says how far the sketch moved the score that ranked the clip.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.timesteps import density, sampler


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


# The parts of diffusers' WanTransformerBlock (`diffusers.models.transformers.transformer_wan`), by the
# module name a Linear has inside it: attn1 attends the video tokens to each other, attn2 attends them
# to the UMT5 caption tokens (and, in the image-to-video model, through add_k_proj/add_v_proj to the
# CLIP image tokens), ffn is the per-token MLP. An optional "ckpt<j>/" prefix names the checkpoint.
KINDS = ("self_attention", "cross_attention", "feed_forward", "other")
_KIND_OF_PART = {"attn1": "self_attention", "attn2": "cross_attention", "ffn": "feed_forward"}
_BLOCK_PART = re.compile(r"^(?:ckpt\d+/)?blocks\.\d+\.(attn1|attn2|ffn)\.")


def layer_kind(name: str) -> str:
    """The kind of one projected layer, from its name in diffusers' WanTransformer3DModel:
    "self_attention" (`blocks.N.attn1.*`: video tokens attending to video tokens: what the clip looks
    like and how it moves), "cross_attention" (`blocks.N.attn2.*`: video tokens attending to the text
    embedding: where the caption enters), "feed_forward" (`blocks.N.ffn.*`), or "other" (the time and
    text embedders, `proj_out`, any layer outside a block)."""
    m = _BLOCK_PART.match(name)
    return _KIND_OF_PART[m.group(1)] if m else "other"


def by_kind(split: dict[str, float]) -> dict[str, float]:
    """The layer terms summed per layer kind (`layer_kind`), every kind of KINDS present (0.0 when no
    layer of that kind was projected), float64 sums: they add up to `sum(split.values())` up to the
    rounding of regrouping n float64 terms (≤ n·2⁻⁵² of Σ|term|)."""
    out = dict.fromkeys(KINDS, 0.0)
    for name, v in split.items():
        out[layer_kind(name)] += v
    return out


def explain_result(split: dict[str, float], top: int = 5) -> dict[str, Any]:
    """The JSON of one result's explanation: per-block and per-kind sums, the `top` layers by |term|,
    the total."""
    layers = sorted(split.items(), key=lambda kv: -abs(kv[1]))[:top]
    return {
        "total": sum(split.values()),
        "by_block": by_block(split),
        "by_kind": by_kind(split),
        "top_layers": [{"layer": k, "score": v} for k, v in layers],
    }


def strata_edges(rule: DrawRule) -> np.ndarray:
    """(K+1,) float64 σ edges of the rule's K strata: F⁻¹(j/K) for j = 0..K, with F the proposal's
    CDF under stratified-is (the density's otherwise; under iid the density's equal-mass bands)."""
    dist = sampler(rule.scheme).stratum_density(density(rule.density), rule.proposal)
    u = torch.linspace(0.0, 1.0, rule.k + 1, dtype=torch.float64)
    edges = dist.icdf(u).numpy().astype(np.float64)
    edges[0], edges[-1] = 0.0, 1.0  # icdf may leave the ends at 1e-300 or 1 - 1e-16
    return edges


def stratum_of(rule: DrawRule, sigma: np.ndarray) -> np.ndarray:
    """(K,) int stratum of each of a clip's K draws: draw k itself under the stratified schemes (it
    was drawn inside stratum k), the equal-mass band holding σ_k under iid."""
    if sampler(rule.scheme).stratified:
        return np.arange(rule.k)
    edges = strata_edges(rule)
    return np.clip(
        np.searchsorted(edges, np.asarray(sigma, dtype=np.float64), side="right") - 1, 0, rule.k - 1
    )


def stratum_split(
    psi_q: np.ndarray, psi_parts: np.ndarray, sigma: np.ndarray, rule: DrawRule
) -> list[dict[str, Any]]:
    """[{stratum, sigma_lo, sigma_hi, draws, score}] of one query (D,) against one clip's
    preconditioned per-draw parts (K, D) (they sum to the clip's ψ): the score's terms summed per
    stratum, float64, in σ order. Terms can be negative."""
    terms = psi_parts.astype(np.float64) @ psi_q.astype(np.float64)  # (K,)
    which = stratum_of(rule, sigma)
    edges = strata_edges(rule)
    out = []
    for j in range(rule.k):
        mask = which == j
        out.append(
            {
                "stratum": j,
                "sigma_lo": float(edges[j]),
                "sigma_hi": float(edges[j + 1]),
                "draws": int(mask.sum()),
                "score": float(terms[mask].sum()),
            }
        )
    return out
