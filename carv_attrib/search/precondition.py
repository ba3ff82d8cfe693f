"""Preconditioners applied to train features when the index is built.

Score of query q against train clip i (FAISS inner product):

    score(q, i) = ⟨prepare_query(φ_q), ψ_i⟩,     ψ_i = prepare_train(φ_i)

* `identity`: ψ = φ, queries raw. Gradient dot product (TracIn / Grad-Dot, Motive).
* `trak`:     ψ_i = (ΦᵀΦ + λI)⁻¹ φ_i, queries raw, so score = φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_i: the TRAK
              kernel (anchors-attribution.md §1) without traker's global 1/mean|inv| rescale.
              λ = lambda_rel · tr(ΦᵀΦ)/min(n, d): lambda_rel times the mean *non-zero*
              eigenvalue (ΦᵀΦ has rank ≤ min(n, d); with n < d, tr/d would make λ a tiny
              fraction of every eigenvalue actually present), so one value fits any feature scale
              and any n; both lambda_rel and the absolute λ are stored. A block of d_b dims over
              n < d_b clips (d_b > DENSE_MAX_DIM) keeps its inverse factored, from the n×n kernel
              ΦΦᵀ (Woodbury, `_FactoredInverse`: 8·n·d_b bytes, not 8·d_b², 44 GiB at the real
              Wan2.1-1.3B D = 76,800); the others dense (`trak_form`, recorded as `forms`).
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

Features are numpy arrays or torch tensors (n, d); outputs are float32 numpy. The Gram (or
kernel) and the inverse (or its factor) are float64. Rows with NaN/Inf are refused: filter failed clips first.

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


TRAK_FORMS = ("dense", "factored")
DENSE_MAX_DIM = 2048  # blocks up to this size stay dense (≤ 32 MiB) whatever n is
FACTOR_CHUNK_BYTES = 64 << 20  # float64 column chunk of the in-place Uᵀ Φ product
_EPS = float(np.finfo(np.float64).eps)


def trak_form(n: int, d_b: int, form: str = "auto") -> str:
    """The form a TRAK block of d_b dims over n clips is kept in: "factored" when n < d_b and
    d_b > DENSE_MAX_DIM (the n×n Woodbury form, 8·n·d_b bytes instead of 8·d_b²), else "dense";
    `form` "dense"/"factored" forces one."""
    if form not in ("auto", *TRAK_FORMS):
        raise ValueError(f"trak form {form!r}: expected auto, dense or factored")
    if form != "auto":
        return form
    return "factored" if n < d_b and d_b > DENSE_MAX_DIM else "dense"


def trak_bytes(n: int, blocks: Sequence[int], form: str = "auto", shard: int = 64) -> dict[str, Any]:
    """Memory of fitting a TRAK preconditioner on n clips, of preparing them, and bytes it stores, per
    `trak_form`: dense block: Gram + its shifted copy + Cholesky factor at the peak (3·8·d²), 8·d²
    stored; factored block: the float64 features (8·n·d, turned into the factor in place) + kernel,
    eigenvectors and LAPACK's eigh workspace (≈ 3·8·n²) + one column chunk, 8·n·d + 8·n stored
    (rank r ≤ n: less for duplicate clips). Blocks are fitted one after another, the stored arrays of
    the finished ones kept: fit_peak = Σ stored before + the largest single-block peak, + a `shard`
    of rows in flight (its float64 copy and slice, 2·8·shard·D). prepare_peak: the stored arrays +
    a shard through `prepare_train` (float64 copy, two float64 temporaries, float32 out ≈ 3.5·8·shard·D).
    peak = max(fit_peak, prepare_peak)."""
    forms = [trak_form(n, int(d), form) for d in blocks]
    stored, peak, done = [], 0, 0
    for d, f in zip(blocks, forms, strict=True):
        d = int(d)
        if f == "dense":
            fit, keep = 3 * 8 * d * d, 8 * d * d
        else:
            fit = 8 * n * d + 3 * 8 * n * n + min(FACTOR_CHUNK_BYTES, 8 * n * d)
            keep = 8 * n * d + 8 * n
        peak = max(peak, done + fit)
        done += keep
        stored.append(keep)
    rows = min(int(shard), int(n)) * sum(int(d) for d in blocks)
    fit_peak = peak + 2 * 8 * rows
    prepare_peak = sum(stored) + 28 * rows
    return {
        "forms": forms,
        "fit_peak": int(fit_peak),
        "prepare_peak": int(prepare_peak),
        "peak": int(max(fit_peak, prepare_peak)),
        "stored": int(sum(stored)),
    }


class _DenseInverse:
    """(ΦᵀΦ + λI)⁻¹ of one block as a dense (d, d) float64 matrix."""

    form = "dense"

    def __init__(self, inv: np.ndarray) -> None:
        self.inv = np.asarray(inv, dtype=np.float64)
        self.dim = int(self.inv.shape[0])
        self.rank = self.dim
        self._gram: np.ndarray | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x @ self.inv  # (n, d); inv is symmetric

    def apply_gram(self, x: np.ndarray) -> np.ndarray:
        """x (ΦᵀΦ + λI): the stored inverse inverted back once (d³ flops) and kept."""
        if self._gram is None:
            self._gram = np.linalg.inv(self.inv)
        return x @ self._gram

    def dense(self) -> np.ndarray:
        return self.inv

    @property
    def nbytes(self) -> int:
        return int(self.inv.nbytes)

    def save(self, d: Path, b: int) -> None:
        _atomic_write(d / f"trak_inverse_{b}.npy", lambda p: _save_npy(p, self.inv))


class _FactoredInverse:
    """(ΦᵀΦ + λI)⁻¹ of one block kept as the eigendecomposition of its kernel: ΦΦᵀ = U diag(s) Uᵀ
    (n×n), W = ΦᵀU = V diag(√s) with V the orthonormal eigenvectors of ΦᵀΦ, stored as
    `wt` = Wᵀ (r, d) float64 with its eigenvalues `s` (r,). Then ΦᵀΦ = W Wᵀ and (Woodbury)

        (ΦᵀΦ + λI)⁻¹ x = x/λ + V diag(1/(s+λ) − 1/λ) Vᵀx = x/λ − W diag(1/(λ(s+λ))) Wᵀx,

    which never divides by a small s (numerically zero eigenvalues, dropped, move it by ≤ s/λ)."""

    form = "factored"

    def __init__(self, wt: np.ndarray, s: np.ndarray, lam: float) -> None:
        if not lam > 0:
            raise ValueError("the factored TRAK form needs λ > 0")
        self.wt = wt if wt.dtype == np.float64 else np.asarray(wt, dtype=np.float64)  # (r, d)
        self.s = np.asarray(s, dtype=np.float64)  # (r,)
        if self.wt.ndim != 2 or self.s.shape != (self.wt.shape[0],):
            raise ValueError(f"trak factor {self.wt.shape} and eigenvalues {self.s.shape} do not match")
        self.lam = float(lam)
        self.coef = 1.0 / (self.lam * (self.s + self.lam))  # (r,)
        self.dim = int(self.wt.shape[1])
        self.rank = int(self.wt.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x / self.lam - ((x @ self.wt.T) * self.coef) @ self.wt  # (n, d); O(n·d·r)

    def apply_gram(self, x: np.ndarray) -> np.ndarray:
        return self.lam * x + (x @ self.wt.T) @ self.wt  # x (W Wᵀ + λI)

    def dense(self) -> np.ndarray:
        """The (d, d) inverse (8·d² bytes: for small blocks and tests)."""
        out = -(self.wt.T * self.coef) @ self.wt
        out[np.diag_indices(self.dim)] += 1.0 / self.lam
        return out

    @property
    def nbytes(self) -> int:
        return int(self.wt.nbytes + self.s.nbytes)

    def save(self, d: Path, b: int) -> None:
        _atomic_write(d / f"trak_factor_{b}.npy", lambda p: _save_npy(p, self.wt))
        _atomic_write(d / f"trak_eigvals_{b}.npy", lambda p: _save_npy(p, self.s))

    @classmethod
    def fit(cls, rows: np.ndarray, lam: float) -> _FactoredInverse:
        """From the block's float64 features `rows` (n, d), overwritten by the factor (no second
        n×d copy): kernel K = ΦΦᵀ, eigh, then Wᵀ = UᵀΦ one column chunk at a time."""
        n, d = rows.shape
        s, u = np.linalg.eigh(rows @ rows.T)  # ascending; (n,), (n, n)
        s, u = np.clip(s[::-1], 0.0, None), u[:, ::-1]
        keep = s > (s[0] * n * _EPS if s.size else 0.0)  # numerical zeros: ≤ n·eps·s_max
        s, u = s[keep], np.ascontiguousarray(u[:, keep])
        r = int(s.size)
        step = max(1, FACTOR_CHUNK_BYTES // (8 * n))
        for c in range(0, d, step):
            block = u.T @ rows[:, c : c + step]  # (r, step): reads every row of the chunk first
            rows[:r, c : c + step] = block
        wt = rows[:r] if r == n else rows[:r].copy()  # rank-deficient: the spare rows freed
        return cls(wt, s, lam)


def _block_inverse(arr: np.ndarray | _DenseInverse | _FactoredInverse) -> _DenseInverse | _FactoredInverse:
    return arr if isinstance(arr, (_DenseInverse, _FactoredInverse)) else _DenseInverse(arr)


class TrakPreconditioner(Preconditioner):
    """ψ_i = (ΦᵀΦ + λI)⁻¹ φ_i per checkpoint block; queries raw. Build with `GramAccumulator`.

    Each block's inverse is kept dense (d_b, d_b) or factored (the n×n Woodbury form, `trak_form`);
    `forms` says which. Every method is the same linear map in either form."""

    kind = "trak"

    def __init__(
        self,
        inverses: Sequence[np.ndarray | _DenseInverse | _FactoredInverse],
        lambda_rel: float,
        lambdas: Sequence[float],
        num_train: int,
    ) -> None:
        self.factors = [_block_inverse(inv) for inv in inverses]
        blocks = [f.dim for f in self.factors]
        super().__init__(sum(blocks), blocks)
        self.lambda_rel = float(lambda_rel)
        self.lambdas = [float(x) for x in lambdas]
        self.num_train = int(num_train)

    @property
    def forms(self) -> list[str]:
        return [f.form for f in self.factors]

    @property
    def inverses(self) -> list[np.ndarray]:
        """The dense (d_b, d_b) inverse per block (a factored one materialised: 8·d_b² bytes)."""
        return [f.dense() for f in self.factors]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays kept (and saved)."""
        return sum(f.nbytes for f in self.factors)

    def _map(self, arr: np.ndarray, how: str) -> np.ndarray:
        for sl, f in zip(_block_slices(self.blocks), self.factors, strict=True):
            arr[:, sl] = getattr(f, how)(arr[:, sl])
        return arr

    def prepare_train(self, feats: Any) -> np.ndarray:
        arr = _as_features(feats, self.dim, "train features").astype(np.float64)
        out = np.empty(arr.shape, dtype=np.float32)
        for sl, f in zip(_block_slices(self.blocks), self.factors, strict=True):
            out[:, sl] = f.apply(arr[:, sl])  # (n, d_b)
        return out

    def prepare_train_parts(self, parts: Any, total: Any) -> np.ndarray:
        arr = _as_features(parts, self.dim, "feature parts").astype(np.float64)
        return self._map(arr, "apply")  # (P, d): linear, so the parts still add up

    def raw_from_train(self, psi: Any) -> np.ndarray:
        """φ = (ΦᵀΦ + λI) ψ per block (dense: the stored inverse inverted back once and kept;
        factored: λψ + W Wᵀψ)."""
        arr = _as_features(psi, self.dim, "train vectors").astype(np.float64)
        return self._map(arr, "apply_gram")

    def linearize(self, deltas: Any, total: Any, side: str) -> np.ndarray:
        """Linear: train changes times each block's inverse, query changes raw."""
        _check_side(side)
        arr = _as_features(deltas, self.dim, "feature changes").astype(np.float64)
        return self._map(arr, "apply") if side == "train" else arr

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "lambda_rel": self.lambda_rel,
            "lambdas": self.lambdas,
            "num_train": self.num_train,
            "forms": self.forms,
            "ranks": [f.rank for f in self.factors],
        }

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for b, f in enumerate(self.factors):
            f.save(d, b)
        super().save(d)  # the JSON last: its presence means the arrays are complete


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npy" to the tmp name
        np.save(f, arr)


class _RowStore:
    """A block's float64 train rows, in one preallocated (capacity, d) buffer when the row count is
    known (no copy at the end), else in chunks joined once."""

    def __init__(self, d: int, capacity: int | None) -> None:
        self.buf = np.empty((capacity or 0, d), dtype=np.float64)
        self.n = 0
        self.extra: list[np.ndarray] = []

    def add(self, x: np.ndarray) -> None:
        k = min(len(x), len(self.buf) - self.n)
        self.buf[self.n : self.n + k] = x[:k]
        self.n += k
        if k < len(x):
            self.extra.append(np.array(x[k:], dtype=np.float64))

    def rows(self) -> np.ndarray:
        if self.extra:
            self.buf = np.concatenate([self.buf[: self.n], *self.extra])
            self.n, self.extra = len(self.buf), []
        return self.buf[: self.n]


class GramAccumulator:
    """Streams feature blocks into what each checkpoint block's TRAK inverse needs, then inverts.

    A dense block accumulates its Gram ΦᵀΦ (float64, d_b²); a block that may end factored
    (`trak_form`) keeps its rows instead (float64, n·d_b) and, in "auto", turns them into the Gram
    once it holds d_b of them (then dense wins): it never holds more than min(n, d_b)·d_b floats.
    `capacity`: the row count when known (the index build knows it), so the form is chosen up front
    and the rows land in one buffer that the factor later overwrites."""

    def __init__(
        self, dim: int, blocks: Sequence[int] | None = None, capacity: int | None = None, form: str = "auto"
    ) -> None:
        self.dim = int(dim)
        self.blocks = _check_blocks(self.dim, blocks)
        trak_form(1, 1, form)  # validates `form`
        self.form = form
        self._grams: list[np.ndarray | None] = []
        self._rows: list[_RowStore | None] = []
        for d_b in self.blocks:
            rows = form == "factored" or (
                form == "auto" and d_b > DENSE_MAX_DIM and (capacity is None or capacity < d_b)
            )
            self._rows.append(_RowStore(d_b, capacity) if rows else None)
            self._grams.append(None if rows else np.zeros((d_b, d_b), dtype=np.float64))
        self.n = 0

    @property
    def grams(self) -> list[np.ndarray]:
        """ΦᵀΦ per block (computed from the rows where rows are kept: 8·d_b² bytes)."""
        return [
            g if g is not None else r.rows().T @ r.rows()
            for g, r in zip(self._grams, self._rows, strict=True)
        ]

    def update(self, feats: Any) -> None:
        """Add a block of train features (n_b, d): Gram_b += Φ_bᵀ Φ_b, or the rows kept."""
        arr = _as_features(feats, self.dim, "train features").astype(np.float64)
        self.n += arr.shape[0]
        for b, sl in enumerate(_block_slices(self.blocks)):
            if (gram := self._grams[b]) is not None:
                gram += arr[:, sl].T @ arr[:, sl]
                continue
            store = self._rows[b]
            if store is None:
                raise ValueError("rows added after finalize: this accumulator's rows became the factor")
            store.add(arr[:, sl])
            if self.form == "auto" and self.n >= self.blocks[b]:  # dense from now on
                rows = store.rows()
                self._grams[b], self._rows[b] = rows.T @ rows, None

    def finalize(self, lambda_rel: float = DEFAULT_LAMBDA_REL) -> TrakPreconditioner:
        """(Gram_b + λ_b I)⁻¹ per block, λ_b = lambda_rel · tr(Gram_b)/min(n, d_b) (the mean non-zero
        eigenvalue): dense via Cholesky, factored via the eigendecomposition of the n×n kernel
        (`_FactoredInverse`; it consumes the rows kept, so finalize a factored accumulator once)."""

        if self.n == 0:
            raise ValueError("no train features were added to the Gram accumulator")
        if lambda_rel < 0:
            raise ValueError(f"lambda_rel must be >= 0, got {lambda_rel}")
        factors: list[_DenseInverse | _FactoredInverse] = []
        lambdas = []
        for b, (gram, store) in enumerate(zip(self._grams, self._rows, strict=True)):
            d_b = self.blocks[b]
            if gram is None:
                if store is None:
                    raise ValueError(
                        "this accumulator's factored blocks were already finalized (their rows became the factor)"
                    )
                rows = store.rows()
                lam = float(lambda_rel) * float(np.einsum("ij,ij->", rows, rows)) / min(self.n, d_b)
                if not lam > 0:
                    raise ValueError(
                        f"Gram of checkpoint block {b} (d={d_b}, n={self.n}) is singular with "
                        f"lambda_rel={lambda_rel}; use lambda_rel > 0"
                    )
                self._rows[b] = None  # its buffer becomes the factor
                factors.append(_FactoredInverse.fit(rows, lam))
                lambdas.append(lam)
                continue
            lam = float(lambda_rel) * float(np.trace(gram)) / min(self.n, d_b)
            a = torch.from_numpy(gram.copy())
            a.diagonal().add_(lam)
            chol, info = torch.linalg.cholesky_ex(a)
            del a
            if int(info) != 0:
                raise ValueError(
                    f"Gram of checkpoint block {b} (d={d_b}, n={self.n}) is singular with "
                    f"lambda_rel={lambda_rel}; use lambda_rel > 0, or fewer feature dims than clips"
                )
            factors.append(_DenseInverse(torch.cholesky_inverse(chol).numpy()))
            lambdas.append(lam)
        return TrakPreconditioner(factors, lambda_rel, lambdas, self.n)


def _fit_trak(
    feats: Any,
    dim: int,
    blocks: Sequence[int] | None,
    lambda_rel: float,
    num_rows: int | None = None,
    form: str = "auto",
) -> Preconditioner:
    if feats is None:
        raise ValueError("the trak preconditioner needs the train features")
    is_one_array = hasattr(feats, "shape") and len(feats.shape) == 2
    acc = GramAccumulator(dim, blocks, capacity=int(feats.shape[0]) if is_one_array else num_rows, form=form)
    for block in [feats] if is_one_array else feats:
        acc.update(block)
    return acc.finalize(lambda_rel)


def _load_trak(meta: dict[str, Any], d: Path) -> Preconditioner:
    forms = meta.get("forms") or ["dense"] * len(meta["blocks"])  # indexes before the factored form
    factors: list[_DenseInverse | _FactoredInverse] = []
    for b, form in enumerate(forms):
        if form == "dense":
            factors.append(_DenseInverse(np.load(d / f"trak_inverse_{b}.npy")))
        elif form == "factored":
            wt = np.load(d / f"trak_factor_{b}.npy", mmap_mode="r")  # read pages as they are used
            factors.append(_FactoredInverse(wt, np.load(d / f"trak_eigvals_{b}.npy"), meta["lambdas"][b]))
        else:
            raise ValueError(f"{d}: unknown trak form {form!r} of block {b}; expected one of {TRAK_FORMS}")
    pre = TrakPreconditioner(factors, meta["lambda_rel"], meta["lambdas"], meta["num_train"])
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
    num_rows: int | None = None,
    form: str = "auto",
) -> Preconditioner:
    """The preconditioner `kind` for train features `feats`: one (n, d) array or an iterable of them.

    `identity`, `cosine` and `normalize` need no data; `trak` streams `feats` into a `GramAccumulator`
    (`num_rows`: the row count of an iterable when known; `form`: auto, dense or factored, `trak_form`).
    ValueError for a kind outside `PRECONDITIONER_KINDS`.
    """
    if kind not in PRECONDITIONER_KINDS:
        raise ValueError(f"unknown preconditioner {kind!r}; expected one of {', '.join(PRECONDITIONERS)}")
    if kind == "trak":
        return _fit_trak(feats, dim, blocks, lambda_rel, num_rows=num_rows, form=form)
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
