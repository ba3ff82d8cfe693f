"""Preconditioners applied to train features when the index is built.

Score of query q against train clip i (FAISS inner product):

    score(q, i) = ⟨prepare_query(φ_q), ψ_i⟩,     ψ_i = prepare_train(φ_i)

* `identity`: ψ = φ, queries raw. Gradient dot product (TracIn / Grad-Dot, Motive).
* `trak`:     ψ_i = (ΦᵀΦ + λI)⁻¹ φ_i, queries raw, so score = φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_i: the TRAK
              kernel (anchors-attribution.md §1) without traker's global 1/mean|inv| rescale.
              λ = lambda_rel · tr(ΦᵀΦ)/min(n, d): lambda_rel times the mean *non-zero*
              eigenvalue (ΦᵀΦ has rank ≤ min(n, d); with n < d, tr/d would make λ a tiny
              fraction of every eigenvalue actually present), so one value fits any feature scale
              and any n; both lambda_rel and the absolute λ are stored.
* `cosine`:   unit-normalise both sides (ReTrac / D-TRAK style, against the timestep norm bias).
* `normalize`: ψ_i = φ_i / ‖φ_i‖^α (α = 0.5), queries unit-normalised: score = cos(φ_q, φ_i)·‖φ_i‖^(1−α),
              the geometric middle between grad-dot (α = 0) and cosine (α = 1). It keeps part of a
              clip's gradient norm (which carries attribution signal where the model fits its data
              well) while damping the few huge-norm clips that dominate grad-dot. The LDS world suite
              (README, Benchmarks) found it the only preconditioner at or above the fixed reference on
              every world; scores are no longer bounded by 1.

Several checkpoints: the feature is the concatenation of one block per checkpoint
(`blocks` = the block sizes). `trak` then uses a block-diagonal preconditioner (one Gram per
block, one λ per block), `cosine` normalises each block separately, and every score is the sum
over checkpoints of the per-checkpoint scores (TRAK ensemble / TracIn sum).

Features are numpy arrays or torch tensors (n, d); outputs are float32 numpy. The Gram and its
inverse are float64. Rows with NaN/Inf are refused: filter failed clips first.

Usage::

    acc = GramAccumulator(dim=d)
    for block in feature_blocks:                     # streaming, (n_b, d) each
        acc.update(block)
    pre = acc.finalize(lambda_rel=1e-2)              # TrakPreconditioner
    psi = pre.prepare_train(train_feats)             # (n, d) -> index
    q = pre.prepare_query(query_feats)               # (m, d) -> search
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch  # float64 Cholesky; torch is a core dependency, scipy is not

from carv_attrib.atomic import atomic_path
from carv_attrib.choices import PRECONDITIONERS

DEFAULT_LAMBDA_REL = 1e-2
DEFAULT_NORMALIZE_ALPHA = 0.5
_META = "precondition.json"


def _as_features(feats: Any, dim: int, what: str = "features") -> np.ndarray:
    """(n, dim) numpy view/copy of `feats` (numpy or torch), checked for shape and finiteness."""
    if hasattr(feats, "detach"):  # a torch tensor, without importing torch here
        feats = feats.detach().cpu().numpy()
    arr = np.asarray(feats)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{what} rows {rows[:10].tolist()}{'…' if rows.size > 10 else ''} contain NaN/Inf; "
            "drop failed clips before preconditioning"
        )
    return arr


def _check_blocks(dim: int, blocks: Sequence[int] | None) -> list[int]:
    blocks = [int(dim)] if blocks is None else [int(b) for b in blocks]
    if any(b < 1 for b in blocks) or sum(blocks) != dim:
        raise ValueError(f"block sizes {blocks} must be positive and sum to the feature dim {dim}")
    return blocks


def _block_slices(blocks: Sequence[int]) -> list[slice]:
    ends = np.cumsum([0, *blocks])
    return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def _check_side(side: str) -> None:
    if side not in ("train", "query"):
        raise ValueError(f"side must be 'train' or 'query', got {side!r}")


def _atomic_write(path: Path, write: Any) -> None:
    """`write(tmp_path)`, then rename: a crash never leaves a file that reads as complete."""
    with atomic_path(path) as tmp:  # removed on failure; a full disk is DiskFullError naming `path`
        write(tmp)


class Preconditioner:
    """Identity preconditioner and the interface the others share."""

    kind = "identity"

    def __init__(self, dim: int, blocks: Sequence[int] | None = None) -> None:
        self.dim = int(dim)
        self.blocks = _check_blocks(self.dim, blocks)

    def prepare_train(self, feats: Any) -> np.ndarray:
        """ψ (n, d) float32 to put in the index."""
        return _as_features(feats, self.dim, "train features").astype(np.float32)

    def prepare_query(self, feats: Any) -> np.ndarray:
        """(m, d) float32 to search the index with."""
        return _as_features(feats, self.dim, "query features").astype(np.float32)

    def prepare_train_parts(self, parts: Any, total: Any) -> np.ndarray:
        """Parts (P, d) of one train feature whose sum is `total` (d,) → (P, d) float64 that sum to
        prepare_train(total): every preconditioner here is linear once the clip's own norm is fixed
        (cosine divides each part by the norm of the *total's* block). `score --explain` splits a score
        over timestep strata with it."""
        return _as_features(parts, self.dim, "feature parts").astype(np.float64)

    def linearize(self, deltas: Any, total: Any, side: str) -> np.ndarray:
        """J(total) δ for each row δ of `deltas` (P, d): the first-order change of
        prepare_train(total) (side "train") or prepare_query(total) (side "query") when the feature
        moves by δ, float64 (P, d). The delta method of `search.uncertainty` reads it; identity here."""
        _check_side(side)
        return _as_features(deltas, self.dim, "feature changes").astype(np.float64)

    def raw_from_train(self, psi: Any) -> np.ndarray:
        """(n, d) float64 features φ whose prepare_train is ψ (n, d): the inverse map, where the norm
        is lost (cosine) the unit-norm φ (every linearisation here is then the same). The cheap
        standard error's mirrored clip side reads it (`search.uncertainty.mirrored_clip_terms`)."""
        return _as_features(psi, self.dim, "train vectors").astype(np.float64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (no arrays)."""
        return {"kind": self.kind, "dim": self.dim, "blocks": self.blocks}

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `precondition.json` (and any arrays) into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2)
        _atomic_write(d / _META, lambda p: p.write_text(text))


class CosinePreconditioner(Preconditioner):
    """Unit-normalise each checkpoint block of both train and query features."""

    kind = "cosine"

    def _normalise(self, feats: Any, what: str) -> np.ndarray:
        arr = _as_features(feats, self.dim, what).astype(np.float64)
        out = np.empty(arr.shape, dtype=np.float32)
        for sl in _block_slices(self.blocks):
            norms = np.linalg.norm(arr[:, sl], axis=1, keepdims=True)  # (n, 1)
            # An all-zero block stays zero (cosine 0) rather than turning into NaN.
            out[:, sl] = arr[:, sl] / np.where(norms > 0, norms, 1.0)
        return out

    def prepare_train(self, feats: Any) -> np.ndarray:
        return self._normalise(feats, "train features")

    def prepare_train_parts(self, parts: Any, total: Any) -> np.ndarray:
        arr = _as_features(parts, self.dim, "feature parts").astype(np.float64)
        tot = _as_features(np.asarray(total).reshape(1, -1), self.dim, "train feature").astype(np.float64)[0]
        for sl in _block_slices(self.blocks):
            norm = float(np.linalg.norm(tot[sl]))
            arr[:, sl] /= norm if norm > 0 else 1.0
        return arr

    def prepare_query(self, feats: Any) -> np.ndarray:
        return self._normalise(feats, "query features")

    def _power(self, side: str) -> float:
        return 1.0

    def linearize(self, deltas: Any, total: Any, side: str) -> np.ndarray:
        """d(φ/‖φ‖^a) = (δ − a·u⟨u, δ⟩)/‖φ‖^a per block, u = φ/‖φ‖ (a = 1 here; normalize's train
        side a = alpha): the radial part of a change is (partly) divided away."""
        _check_side(side)
        power = 1.0 if side == "query" else self._power(side)
        arr = _as_features(deltas, self.dim, "feature changes").astype(np.float64)
        tot = _as_features(np.asarray(total).reshape(1, -1), self.dim, "feature").astype(np.float64)[0]
        for sl in _block_slices(self.blocks):
            norm = float(np.linalg.norm(tot[sl]))
            if norm == 0:  # a zero block stays zero whatever moves it (prepare_* keep it at 0)
                arr[:, sl] = 0.0
                continue
            u = tot[sl] / norm  # (d_b,)
            arr[:, sl] = (arr[:, sl] - power * np.outer(arr[:, sl] @ u, u)) / norm**power
        return arr


class NormalizePreconditioner(CosinePreconditioner):
    """Train blocks divided by ‖φ_b‖^alpha, query blocks by ‖φ_b‖ (per checkpoint block, like cosine).

    alpha ∈ [0, 1]: 0 is grad-dot (up to a per-query scale, which no ranking sees), 1 is cosine.
    Source: the `normalize` kind of `carv_attrib.lds.gradspace.scores_from_gram`, which the LDS
    study scored (tests/search/test_precondition.py checks the two agree)."""

    kind = "normalize"

    def __init__(self, dim: int, blocks: Sequence[int] | None = None, alpha: float = DEFAULT_NORMALIZE_ALPHA):
        super().__init__(dim, blocks)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"normalize alpha {alpha}: must lie in [0, 1]")
        self.alpha = float(alpha)

    def _scale(self, arr: np.ndarray, power: float) -> np.ndarray:
        out = np.empty(arr.shape, dtype=np.float64)
        for sl in _block_slices(self.blocks):
            norms = np.linalg.norm(arr[:, sl], axis=1, keepdims=True)  # (n, 1)
            out[:, sl] = arr[:, sl] / np.where(norms > 0, norms, 1.0) ** power  # a zero block stays zero
        return out

    def prepare_train(self, feats: Any) -> np.ndarray:
        arr = _as_features(feats, self.dim, "train features").astype(np.float64)
        return self._scale(arr, self.alpha).astype(np.float32)

    def prepare_train_parts(self, parts: Any, total: Any) -> np.ndarray:
        arr = _as_features(parts, self.dim, "feature parts").astype(np.float64)
        tot = _as_features(np.asarray(total).reshape(1, -1), self.dim, "train feature").astype(np.float64)[0]
        for sl in _block_slices(self.blocks):
            norm = float(np.linalg.norm(tot[sl]))
            arr[:, sl] /= (norm if norm > 0 else 1.0) ** self.alpha  # the total's norm: parts still add up
        return arr

    def _power(self, side: str) -> float:
        return self.alpha

    def raw_from_train(self, psi: Any) -> np.ndarray:
        """φ = ψ·‖ψ‖^(α/(1−α)) per block (‖ψ‖ = ‖φ‖^(1−α)); α = 1 keeps the unit-norm ψ, as cosine."""
        arr = _as_features(psi, self.dim, "train vectors").astype(np.float64)
        if self.alpha >= 1.0:
            return arr
        for sl in _block_slices(self.blocks):
            norms = np.linalg.norm(arr[:, sl], axis=1, keepdims=True)  # (n, 1)
            arr[:, sl] *= norms ** (self.alpha / (1.0 - self.alpha))
        return arr

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "alpha": self.alpha}


class TrakPreconditioner(Preconditioner):
    """ψ_i = (ΦᵀΦ + λI)⁻¹ φ_i per checkpoint block; queries raw. Build with `GramAccumulator`."""

    kind = "trak"

    def __init__(
        self,
        inverses: Sequence[np.ndarray],
        lambda_rel: float,
        lambdas: Sequence[float],
        num_train: int,
    ) -> None:
        blocks = [int(inv.shape[0]) for inv in inverses]
        super().__init__(sum(blocks), blocks)
        self.inverses = [np.asarray(inv, dtype=np.float64) for inv in inverses]  # (d_b, d_b) each
        self.lambda_rel = float(lambda_rel)
        self.lambdas = [float(x) for x in lambdas]
        self.num_train = int(num_train)

    def prepare_train(self, feats: Any) -> np.ndarray:
        arr = _as_features(feats, self.dim, "train features").astype(np.float64)
        out = np.empty(arr.shape, dtype=np.float32)
        for sl, inv in zip(_block_slices(self.blocks), self.inverses, strict=True):
            out[:, sl] = arr[:, sl] @ inv  # (n, d_b); inv is symmetric
        return out

    def prepare_train_parts(self, parts: Any, total: Any) -> np.ndarray:
        arr = _as_features(parts, self.dim, "feature parts").astype(np.float64)
        for sl, inv in zip(_block_slices(self.blocks), self.inverses, strict=True):
            arr[:, sl] = arr[:, sl] @ inv  # (P, d_b): linear, so the parts still add up
        return arr

    def raw_from_train(self, psi: Any) -> np.ndarray:
        """φ = (ΦᵀΦ + λI) ψ per block: each stored inverse inverted back once (d_b³ flops) and kept."""
        arr = _as_features(psi, self.dim, "train vectors").astype(np.float64)
        if getattr(self, "_grams", None) is None:  # ΦᵀΦ + λI per block, inverted back once and kept
            self._grams = [np.linalg.inv(inv) for inv in self.inverses]
        for sl, gram in zip(_block_slices(self.blocks), self._grams, strict=True):
            arr[:, sl] = arr[:, sl] @ gram  # (n, d_b); symmetric
        return arr

    def linearize(self, deltas: Any, total: Any, side: str) -> np.ndarray:
        """Linear: train changes times each block's inverse, query changes raw."""
        _check_side(side)
        arr = _as_features(deltas, self.dim, "feature changes").astype(np.float64)
        if side == "train":
            for sl, inv in zip(_block_slices(self.blocks), self.inverses, strict=True):
                arr[:, sl] = arr[:, sl] @ inv  # (P, d_b)
        return arr

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "lambda_rel": self.lambda_rel,
            "lambdas": self.lambdas,
            "num_train": self.num_train,
        }

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for b, inv in enumerate(self.inverses):
            _atomic_write(d / f"trak_inverse_{b}.npy", lambda p, inv=inv: _save_npy(p, inv))
        super().save(d)  # the JSON last: its presence means the arrays are complete


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npy" to the tmp name
        np.save(f, arr)


class GramAccumulator:
    """Streams feature blocks into the per-checkpoint Grams ΦᵀΦ (float64), then inverts them."""

    def __init__(self, dim: int, blocks: Sequence[int] | None = None) -> None:
        self.dim = int(dim)
        self.blocks = _check_blocks(self.dim, blocks)
        self.grams = [np.zeros((b, b), dtype=np.float64) for b in self.blocks]
        self.n = 0

    def update(self, feats: Any) -> None:
        """Add a block of train features (n_b, d): Gram_b += Φ_bᵀ Φ_b for every checkpoint block."""
        arr = _as_features(feats, self.dim, "train features").astype(np.float64)
        for sl, gram in zip(_block_slices(self.blocks), self.grams, strict=True):
            gram += arr[:, sl].T @ arr[:, sl]
        self.n += arr.shape[0]

    def finalize(self, lambda_rel: float = DEFAULT_LAMBDA_REL) -> TrakPreconditioner:
        """(Gram_b + λ_b I)⁻¹ per block, λ_b = lambda_rel · tr(Gram_b)/min(n, d_b) (the mean non-zero
        eigenvalue), via Cholesky."""

        if self.n == 0:
            raise ValueError("no train features were added to the Gram accumulator")
        if lambda_rel < 0:
            raise ValueError(f"lambda_rel must be >= 0, got {lambda_rel}")
        inverses, lambdas = [], []
        for b, gram in enumerate(self.grams):
            d_b = gram.shape[0]
            lam = float(lambda_rel) * float(np.trace(gram)) / min(self.n, d_b)
            a = torch.from_numpy(gram + lam * np.eye(d_b))
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) != 0:
                raise ValueError(
                    f"Gram of checkpoint block {b} (d={d_b}, n={self.n}) is singular with "
                    f"lambda_rel={lambda_rel}; use lambda_rel > 0, or fewer feature dims than clips"
                )
            inverses.append(torch.cholesky_inverse(chol).numpy())
            lambdas.append(lam)
        return TrakPreconditioner(inverses, lambda_rel, lambdas, self.n)


def _fit_trak(feats: Any, dim: int, blocks: Sequence[int] | None, lambda_rel: float) -> Preconditioner:
    if feats is None:
        raise ValueError("the trak preconditioner needs the train features")
    acc = GramAccumulator(dim, blocks)
    is_one_array = hasattr(feats, "shape") and len(feats.shape) == 2
    for block in [feats] if is_one_array else feats:
        acc.update(block)
    return acc.finalize(lambda_rel)


def _load_trak(meta: dict[str, Any], d: Path) -> Preconditioner:
    inverses = [np.load(d / f"trak_inverse_{b}.npy") for b in range(len(meta["blocks"]))]
    pre = TrakPreconditioner(inverses, meta["lambda_rel"], meta["lambdas"], meta["num_train"])
    if pre.blocks != meta["blocks"]:
        raise ValueError(f"{d}: inverse shapes {pre.blocks} do not match the blocks {meta['blocks']}")
    return pre


@dataclass(frozen=True)
class PreconditionerKind:
    """One preconditioner kind: `fit(feats, dim, blocks, lambda_rel)` builds it for train features
    (those without data ignore `feats`), `load(meta, directory)` rebuilds a saved one from its meta."""

    fit: Callable[[Any, int, Sequence[int] | None, float], Preconditioner]
    load: Callable[[dict[str, Any], Path], Preconditioner]


PRECONDITIONER_KINDS: dict[str, PreconditionerKind] = {
    "identity": PreconditionerKind(
        lambda feats, dim, blocks, lam: Preconditioner(dim, blocks),
        lambda meta, d: Preconditioner(meta["dim"], meta["blocks"]),
    ),
    "trak": PreconditionerKind(_fit_trak, _load_trak),
    "cosine": PreconditionerKind(
        lambda feats, dim, blocks, lam: CosinePreconditioner(dim, blocks),
        lambda meta, d: CosinePreconditioner(meta["dim"], meta["blocks"]),
    ),
    "normalize": PreconditionerKind(
        lambda feats, dim, blocks, lam: NormalizePreconditioner(dim, blocks),
        lambda meta, d: NormalizePreconditioner(meta["dim"], meta["blocks"], meta["alpha"]),
    ),
}
assert tuple(PRECONDITIONER_KINDS) == PRECONDITIONERS, (
    "choices.PRECONDITIONERS and PRECONDITIONER_KINDS must agree"
)


def fit_preconditioner(
    kind: str,
    feats: Any | Iterable[Any] | None = None,
    *,
    dim: int,
    blocks: Sequence[int] | None = None,
    lambda_rel: float = DEFAULT_LAMBDA_REL,
) -> Preconditioner:
    """The preconditioner `kind` for train features `feats`: one (n, d) array or an iterable of them.

    `identity`, `cosine` and `normalize` need no data; `trak` streams `feats` into a `GramAccumulator`.
    ValueError for a kind outside `PRECONDITIONER_KINDS`.
    """
    if kind not in PRECONDITIONER_KINDS:
        raise ValueError(f"unknown preconditioner {kind!r}; expected one of {', '.join(PRECONDITIONERS)}")
    return PRECONDITIONER_KINDS[kind].fit(feats, dim, blocks, lambda_rel)


def load_preconditioner(directory: str | os.PathLike[str]) -> Preconditioner:
    """The preconditioner saved by `.save(directory)`."""
    d = Path(directory)
    meta_path = d / _META
    if not meta_path.exists():
        raise FileNotFoundError(f"no {_META} in {d}: not a saved preconditioner (or an interrupted save)")
    meta = json.loads(meta_path.read_text())
    kind = meta.get("kind")
    if kind not in PRECONDITIONER_KINDS:
        raise ValueError(
            f"{meta_path}: unknown preconditioner {kind!r}; expected one of {', '.join(PRECONDITIONERS)}"
        )
    return PRECONDITIONER_KINDS[kind].load(meta, d)
