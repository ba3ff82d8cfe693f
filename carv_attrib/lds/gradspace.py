"""Attribution features from full per-clip gradients: layer sets, the tool's projections, Grams, scores.

One matrix of full gradients G (n, P) (`carv_attrib.lds.reference.exact_gradients`, all
parameters in `named_parameters` order) serves every layer set, projection and preconditioner a
study compares, so that each draw rule's backward passes are paid once:

- layer sets (`LAYER_SETS`): "blocks" = the Linear layers inside `blocks.*` (featurize's default
  `--layers`), "all-linear" = every `nn.Linear` (`--layers '*'`), "all" = every parameter (the Linear
  layers, then the patch embedding, norms' affine terms and modulation tables as raw entries);
- projections (`FeatureSpec.projection`): "none" (the unprojected gradient of the layer set), "kron"
  (the tool's per-layer LoGra projection φ = P_outᵀ [∇W | ∇b] P_in with the very matrices of
  `attrib.projection.layer_matrices`, so it equals `KronProjector`'s features for the same draws),
  "dense" (`DenseProjector`'s chunked JL matrix over the same [W | b] entries);
- scores (`scores_from_gram`): every preconditioner of `attrib.precondition` depends on the features
  only through their Gram matrix, so scores come from the (n + Q) Gram, whatever P is. TRAK uses the
  Woodbury identity Φ(ΦᵀΦ + λI)⁻¹ = (ΦΦᵀ + λI)⁻¹Φ, i.e. S = (K + λI)⁻¹ K_tq with K = ΦΦᵀ.

    blocks = linear_blocks(transformer, ["blocks.*"])
    F = features(G, transformer, FeatureSpec(layers="blocks", projection="kron"), seed=0)  # (n, 5120)
    S = scores_from_gram(gram(F), n_train=64, kind="cosine")                              # (64, Q)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from carv_attrib.attrib.projection import (
    DenseProjector,
    augmented_shape,
    layer_matrices,
    select_linear_layers,
)

LAYER_SETS = {"blocks": ("blocks.*",), "all-linear": ("*",), "all": ("*",)}
PROJECTIONS = ("none", "kron", "dense")
GRAM_PRECONDITIONERS = ("identity", "cosine", "trak", "normalize")


@dataclass(frozen=True)
class LinearBlock:
    """A Linear layer's [W | b] inside the flat gradient: index (out, in_aug) of flat positions."""

    name: str
    out: int
    in_aug: int
    index: np.ndarray


def _offsets(transformer: nn.Module) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{parameter name: (offset in the flat gradient, shape)} in `named_parameters` order."""
    out, off = {}, 0
    for name, p in transformer.named_parameters():
        out[name] = (off, tuple(p.shape))
        off += p.numel()
    return out


def linear_blocks(transformer: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[LinearBlock]:
    """The Linear layers matching `patterns` (featurize's order, `select_linear_layers`) as blocks of
    flat-gradient positions, [W | b] row-major (the bias is the last column, as in `flat_grad`)."""
    offsets = _offsets(transformer)
    blocks = []
    for name, layer in select_linear_layers(transformer, list(patterns)):
        out, in_aug = augmented_shape(layer)
        w_off, _ = offsets[f"{name}.weight"]
        index = np.empty((out, in_aug), dtype=np.int64)
        index[:, : layer.in_features] = w_off + np.arange(out * layer.in_features).reshape(out, -1)
        if layer.bias is not None:
            index[:, -1] = offsets[f"{name}.bias"][0] + np.arange(out)
        blocks.append(LinearBlock(name, out, in_aug, index))
    return blocks


def other_positions(transformer: nn.Module) -> np.ndarray:
    """Flat positions of every parameter outside all `nn.Linear` modules (patch embedding, norms,
    modulation tables), in `named_parameters` order."""
    linear = {n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    pos = []
    for name, (off, shape) in _offsets(transformer).items():
        if name.rsplit(".", 1)[0] not in linear:
            pos.append(np.arange(off, off + math.prod(shape)))
    return np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class FeatureSpec:
    """A layer set and a projection of it. kron: (k_out, k_in) per Linear layer; dense: `dim` total.
    With layers "all", the non-Linear parameters are appended raw (they are small beside the Linear
    layers: 1.6 % of the lite worlds' transformer)."""

    layers: str = "blocks"
    projection: str = "none"
    k_out: int = 16
    k_in: int = 16
    matrix: str = "gaussian"
    dim: int | None = None

    def __post_init__(self) -> None:
        if self.layers not in LAYER_SETS:
            raise ValueError(f"unknown layer set {self.layers!r}; use one of {', '.join(LAYER_SETS)}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.projection!r}; use one of {', '.join(PROJECTIONS)}")

    @property
    def key(self) -> str:
        if self.projection == "none":
            return f"{self.layers}/none"
        if self.projection == "kron":
            return f"{self.layers}/kron-{self.k_out}x{self.k_in}-{self.matrix}"
        return f"{self.layers}/dense-{self.dim}-{self.matrix}"


def _layer_grads(G: np.ndarray, block: LinearBlock) -> np.ndarray:
    return G[:, block.index]  # (n, out, in_aug)


def kron_features(
    G: np.ndarray, blocks: list[LinearBlock], seed: int, k_out: int, k_in: int, matrix: str = "gaussian"
) -> np.ndarray:
    """(n, Σ k_out·k_in) float64: per layer P_outᵀ [∇W | ∇b] P_in flattened row-major, concatenated
    in layer order: `KronProjector`'s features of the same gradients (same seed, same matrices)."""
    out = []
    for b in blocks:
        p_in, p_out = layer_matrices(seed, b.name, b.in_aug, b.out, k_in, k_out, matrix)
        g = _layer_grads(G, b).astype(np.float64)  # (n, out, in_aug)
        phi = (p_out.double().numpy().T @ g) @ p_in.double().numpy()  # (n, k_out, k_in), two BLAS calls
        out.append(phi.reshape(G.shape[0], -1))  # (n, k_out·k_in)
    return np.concatenate(out, axis=1)


def raw_features(G: np.ndarray, blocks: list[LinearBlock]) -> np.ndarray:
    """(n, Σ out·in_aug) float32: the layers' [∇W | ∇b] flattened, `flat_grad`'s order."""
    return np.concatenate([_layer_grads(G, b).reshape(G.shape[0], -1) for b in blocks], axis=1)


def features(G: np.ndarray, transformer: nn.Module, spec: FeatureSpec, seed: int = 0) -> np.ndarray:
    """(n, D) features of the gradients G (n, P) under `spec` (projection matrices seeded by `seed`)."""
    if spec.layers == "all" and spec.projection == "none":
        return G
    blocks = linear_blocks(transformer, LAYER_SETS[spec.layers])
    if spec.projection == "none":
        feats: np.ndarray = raw_features(G, blocks)
    elif spec.projection == "kron":
        feats = kron_features(G, blocks, seed, spec.k_out, spec.k_in, spec.matrix)
    else:
        modules = dict(transformer.named_modules())
        proj = DenseProjector(
            [(b.name, modules[b.name]) for b in blocks], seed=seed, dim=spec.dim or 1280, kind=spec.matrix
        )
        feats = proj.project(torch.from_numpy(raw_features(G, blocks))).double().numpy()
    if spec.layers == "all":
        feats = np.concatenate([feats, G[:, other_positions(transformer)]], axis=1)
    return feats


def gram(F: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """(n, n) float64 F diag(scale) Fᵀ (scale (D,) ≥ 0, e.g. Adam's 1/(sqrt(v̂)+ε); None: F Fᵀ)."""
    F64 = np.asarray(F, dtype=np.float64)
    return (F64 * scale[None, :]) @ F64.T if scale is not None else F64 @ F64.T


def scores_from_gram(
    K: np.ndarray,
    n_train: int,
    kind: str = "identity",
    *,
    lambda_rel: float = 1e-2,
    dim: int | None = None,
    alpha: float = 1.0,
) -> np.ndarray:
    """(n_train, Q) float64 scores of the queries (rows/columns n_train: of K) against the training
    clips (rows :n_train), from the Gram K (n_train + Q, n_train + Q) of their features:

    - identity: K_tq (grad-dot);  cosine: K_tq / (‖φ_i‖ ‖φ_q‖);
    - normalize: K_tq / (‖φ_i‖^α ‖φ_q‖) (α = 1 is cosine, α = 0 grad-dot up to a per-query scale);
    - trak: (K_tt + λI)⁻¹ K_tq with λ = lambda_rel · tr(K_tt) / min(n_train, dim), the tool's λ rule
      (`attrib.precondition`; dim = the feature dimension, None: n_train).

    Equal to `attrib.precondition`'s prepare_train(Φ) @ prepare_query(Φ_q)ᵀ for identity, cosine and
    trak (tests/lds/test_gradspace.py)."""
    K = np.asarray(K, dtype=np.float64)
    n = n_train
    Ktq = K[:n, n:]
    norms = np.sqrt(np.clip(np.diag(K), 0.0, None))
    nt, nq = np.maximum(norms[:n], 1e-300), np.maximum(norms[n:], 1e-300)
    if kind == "identity":
        return Ktq
    if kind == "cosine":
        return Ktq / nt[:, None] / nq[None, :]
    if kind == "normalize":
        return Ktq / nt[:, None] ** alpha / nq[None, :]
    if kind == "trak":
        Ktt = K[:n, :n]
        lam = lambda_rel * float(np.trace(Ktt)) / min(n, dim or n)
        return np.linalg.solve(Ktt + lam * np.eye(n), Ktq)
    raise ValueError(f"unknown preconditioner {kind!r}; use one of {', '.join(GRAM_PRECONDITIONERS)}")


def describe(spec: FeatureSpec, transformer: nn.Module) -> dict[str, Any]:
    """{key, dim, grad_dim}: the feature size and the size of the gradient it stands for."""
    blocks = linear_blocks(transformer, LAYER_SETS[spec.layers])
    grad_dim = sum(b.out * b.in_aug for b in blocks)
    extra = other_positions(transformer).size if spec.layers == "all" else 0
    dim = {
        "none": grad_dim,
        "kron": len(blocks) * spec.k_out * spec.k_in,
        "dense": spec.dim or 1280,
    }[spec.projection]
    return {"key": spec.key, "dim": dim + extra, "grad_dim": grad_dim + extra}
