"""A compressed index dimension (`carv-attrib index --index-dim D'`): a seeded, data-oblivious sketch
S: R^D → R^D' applied after the preconditioner, identically to train vectors and queries.

    score(q, i) ≈ ⟨S prepare_query(φ_q), S prepare_train(φ_i)⟩,   E_S ⟨Sa, Sb⟩ = ⟨a, b⟩

Kinds (`SKETCH_KINDS`):

* `srht` (default): subsampled randomized Hadamard transform. Sa = sqrt(1/D') · P H Σ a, with Σ
  random signs (D,), a zero-pad to n = the next power of two, H the unnormalised Walsh–Hadamard
  matrix (±1 entries, H Hᵀ = n I) and P a seeded subsample of D' of its n rows without replacement.
  E⟨Sa, Sb⟩ = (1/D')·(D'/n)·Σ_j (HΣa)_j (HΣb)_j = ⟨a, b⟩. O(n log n) per vector, no matrix stored.
* `countsketch`: each coordinate i added, with a seeded sign s_i, to one seeded bucket h(i) of D'.
  E⟨Sa, Sb⟩ = ⟨a, b⟩ (the cross terms have mean zero). O(D) per vector.

The error of one sketched inner product is about ‖a‖‖b‖/sqrt(D') (the Gaussian JL variance,
(⟨a,b⟩² + ‖a‖²‖b‖²)/D'; SRHT's subsample without replacement is a little below it). Both are
linear and need no data, so `build_run_index` streams shards through them as before; the sketch is
re-created from its spec (kind, D, D', seed) by `score`, which refuses a sketch whose recorded check
(`Sketch.check`: a digest of S applied to fixed probe vectors) it does not reproduce.

`SketchedPreconditioner` composes a preconditioner with a sketch: every linear method
(prepare_*, prepare_train_parts, linearize) is S after the preconditioner's own; the inverse
`raw_from_train` is not available (S loses information), so callers that need a clip's raw feature
read it from RUN/features (`store.features.stored_features`). `score --explain` splits the *uncompressed* score
⟨ψ_q, ψ_i⟩ from the stored per-layer features (`unsketched`), exactly, and reports how far the
sketched score that ranked the clip lies from it.

Why not PCA: at 10^6 clips and D = 76,800 a PCA needs a streamed covariance (D² = 47 GB in float64)
or a multi-pass randomized SVD with a D x D' basis (5 GB at D' = 16k) and scores that are biased
towards the directions of the training set; on the LDS worlds (n_train = 48 < D') a PCA is lossless
by construction (every training vector lies in its span), so they cannot measure it. See
bench/index_dim.py and the README's table for the sketches' LDS against D'.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carv_attrib.choices import SKETCH_KINDS

__all__ = ["SKETCH_KINDS", "Sketch", "SketchSpec", "sketch_for"]

DEFAULT_SKETCH = "srht"
DEFAULT_SKETCH_SEED = 0
SKETCH_FILE = "sketch.json"
_ROWS = 256  # rows sketched at a time (bounds the float64 working copy: 256 x D x 8 bytes)
_FWHT_ROWS = 2  # rows per Walsh–Hadamard transform (cache-sized: 2 x 131,072 x 8 bytes x 2 buffers)


@dataclass(frozen=True)
class SketchSpec:
    """What fixes a sketch: its kind, input dim D, output dim D' and seed."""

    kind: str
    dim: int
    out_dim: int
    seed: int = DEFAULT_SKETCH_SEED

    def __post_init__(self) -> None:
        if self.kind not in SKETCH_KINDS:
            raise ValueError(f"unknown sketch {self.kind!r}; expected one of {', '.join(SKETCH_KINDS)}")
        if not 1 <= int(self.out_dim) < int(self.dim):
            raise ValueError(
                f"--index-dim {self.out_dim}: must lie in [1, {int(self.dim) - 1}] (below the feature dim {self.dim})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": int(self.dim), "out_dim": int(self.out_dim), "seed": int(self.seed)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SketchSpec:
        return cls(str(d["kind"]), int(d["dim"]), int(d["out_dim"]), int(d.get("seed", DEFAULT_SKETCH_SEED)))


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def fwht(a: np.ndarray) -> np.ndarray:
    """The unnormalised Walsh–Hadamard transform of each row of `a` (m, n), n a power of two,
    float64 (m, n): log2(n) butterfly passes between two buffers (call it on a few rows at a time:
    one row of n = 131,072 stays in cache, and ran 5x faster per row than 64 rows together)."""
    m, n = a.shape
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    src = np.array(a, dtype=np.float64, copy=True)
    dst = np.empty_like(src)
    h = 1
    while h < n:
        v, w = src.reshape(m, n // (2 * h), 2, h), dst.reshape(m, n // (2 * h), 2, h)
        np.add(v[:, :, 0, :], v[:, :, 1, :], out=w[:, :, 0, :])
        np.subtract(v[:, :, 0, :], v[:, :, 1, :], out=w[:, :, 1, :])
        src, dst = dst, src
        h *= 2
    return src


class Sketch:
    """The linear map of a `SketchSpec`, re-created bit for bit from it (numpy's PCG64 streams)."""

    def __init__(self, spec: SketchSpec) -> None:
        self.spec = spec
        self.dim, self.out_dim = int(spec.dim), int(spec.out_dim)
        rng = np.random.default_rng([int(spec.seed), SKETCH_KINDS.index(spec.kind), self.dim, self.out_dim])
        self.signs = rng.choice(np.array([-1.0, 1.0]), size=self.dim)  # (D,)
        if spec.kind == "srht":
            self.padded = _next_pow2(self.dim)
            self.rows = np.sort(rng.choice(self.padded, size=self.out_dim, replace=False))  # (D',)
            self.scale = 1.0 / np.sqrt(self.out_dim)
        else:
            self.buckets = rng.integers(0, self.out_dim, size=self.dim)  # (D,)
            self._order = np.argsort(self.buckets, kind="stable")
            sorted_b = self.buckets[self._order]
            self._starts = np.flatnonzero(np.r_[True, sorted_b[1:] != sorted_b[:-1]])
            self._targets = sorted_b[self._starts]

    def _apply64(self, x: np.ndarray) -> np.ndarray:
        xs = x * self.signs  # (m, D) float64
        if self.spec.kind == "srht":
            out = np.empty((x.shape[0], self.out_dim), dtype=np.float64)
            pad = np.zeros((_FWHT_ROWS, self.padded), dtype=np.float64)
            for a in range(0, x.shape[0], _FWHT_ROWS):
                k = min(_FWHT_ROWS, x.shape[0] - a)
                pad[:k, : self.dim] = xs[a : a + k]
                out[a : a + k] = fwht(pad[:k])[:, self.rows] * self.scale
            return out
        out = np.zeros((x.shape[0], self.out_dim), dtype=np.float64)
        if x.shape[0]:
            out[:, self._targets] = np.add.reduceat(xs[:, self._order], self._starts, axis=1)
        return out

    def apply(self, x: Any, dtype: Any = np.float32) -> np.ndarray:
        """S applied to every row of `x` (m, D) → (m, D') in `dtype`, computed in float64, _ROWS
        rows at a time."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"the sketch takes vectors of shape (m, {self.dim}), got {arr.shape}")
        out = np.empty((arr.shape[0], self.out_dim), dtype=dtype)
        for a in range(0, arr.shape[0], _ROWS):
            out[a : a + _ROWS] = self._apply64(arr[a : a + _ROWS])
        return out

    def check(self) -> str:
        """A digest of S applied to fixed probe vectors: what `score` compares with the recorded one,
        so a sketch re-created otherwise (another numpy stream, another implementation) is refused."""
        probe = np.random.default_rng(12345).standard_normal((2, self.dim))
        y = np.round(self.apply(probe, np.float64), 6) + 0.0  # + 0.0: no negative zero
        return hashlib.sha256(y.tobytes()).hexdigest()[:16]

    def record(self) -> dict[str, Any]:
        """The spec and its check, as index_info.json records it ("sketch")."""
        return self.spec.to_dict() | {"check": self.check()}

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / SKETCH_FILE).write_text(json.dumps(self.record(), indent=2))


def sketch_from_record(
    record: dict[str, Any], dim: int | None = None, index_dim: int | None = None
) -> Sketch:
    """The sketch an index recorded, re-created; ValueError when it does not reproduce the recorded
    check, or does not fit the preconditioner's dim / the FAISS index's dim."""
    spec = SketchSpec.from_dict(record)
    if dim is not None and spec.dim != int(dim):
        raise ValueError(f"the index's sketch takes D = {spec.dim}, its preconditioner gives D = {dim}")
    if index_dim is not None and spec.out_dim != int(index_dim):
        raise ValueError(
            f"the index's sketch gives D' = {spec.out_dim}, its FAISS index holds d = {index_dim}"
        )
    sk = Sketch(spec)
    if record.get("check") is not None and sk.check() != record["check"]:
        raise ValueError(
            f"the sketch {spec.to_dict()} re-created here does not reproduce the index's (check "
            f"{sk.check()} against {record['check']}): another version built it; rebuild the index"
        )
    return sk


class SketchedPreconditioner:
    """A preconditioner followed by a sketch: ψ = S·pre(φ) on both sides (see the module doc)."""

    def __init__(self, base: Any, sketch: Sketch, raw: np.ndarray | None = None) -> None:
        if sketch.dim != base.dim:
            raise ValueError(f"sketch of D = {sketch.dim} after a preconditioner of D = {base.dim}")
        self.base, self.sketch = base, sketch
        self.kind, self.dim, self.blocks = base.kind, base.dim, base.blocks
        self.out_dim = sketch.out_dim
        self._raw = raw

    def prepare_train(self, feats: Any) -> np.ndarray:
        return self.sketch.apply(self.base.prepare_train(feats))

    def prepare_query(self, feats: Any) -> np.ndarray:
        return self.sketch.apply(self.base.prepare_query(feats))

    def prepare_train_parts(self, parts: Any, total: Any) -> np.ndarray:
        return self.sketch.apply(self.base.prepare_train_parts(parts, total), np.float64)

    def linearize(self, deltas: Any, total: Any, side: str) -> np.ndarray:
        return self.sketch.apply(self.base.linearize(deltas, total, side), np.float64)

    def with_raw(self, raw: np.ndarray) -> SketchedPreconditioner:
        """A copy whose `raw_from_train` gives `raw` (n, D): the clips' stored features, for callers
        (`uncertainty.mirrored_clip_terms`) that would otherwise invert ψ."""
        return SketchedPreconditioner(self.base, self.sketch, np.asarray(raw, dtype=np.float64))

    def raw_from_train(self, psi: Any) -> np.ndarray:
        if self._raw is None or len(self._raw) != len(psi):
            raise ValueError("a sketched index cannot give back raw features; read them from RUN/features")
        return self._raw

    def to_dict(self) -> dict[str, Any]:
        return self.base.to_dict()

    def save(self, directory: str | os.PathLike[str]) -> None:
        self.base.save(directory)


def unsketched(pre: Any) -> Any:
    """The preconditioner under a sketch (itself when there is none)."""
    return pre.base if isinstance(pre, SketchedPreconditioner) else pre


def sketch_for(
    index_dim: int | None, dim: int, kind: str = DEFAULT_SKETCH, seed: int = DEFAULT_SKETCH_SEED
) -> Sketch | None:
    """The sketch `--index-dim index_dim --sketch kind --sketch-seed seed` asks of D = dim features:
    None for None or 0 (no compression); ValueError for index_dim >= dim (nothing to compress) or an
    unknown kind."""
    if not index_dim:
        return None
    return Sketch(SketchSpec(kind, int(dim), int(index_dim), int(seed)))


def indexed_dim(index_dim: int | None, dim: int) -> int:
    """The dim of the indexed vectors: index_dim when it compresses, else dim."""
    return int(index_dim) if index_dim else int(dim)


def index_preconditioner(record: dict[str, Any] | None, pre: Any, index_d: int) -> Any:
    """What `score` prepares queries with: the saved preconditioner `pre`, followed by the sketch
    the index recorded (`Sketch.record()`, re-created and checked: `sketch_from_record`); ValueError
    when the sketch, the preconditioner and the FAISS index (d = index_d) do not fit together."""
    if not record:
        if int(index_d) != int(pre.dim):
            raise ValueError(f"the FAISS index holds d = {index_d}, its preconditioner gives D = {pre.dim}")
        return pre
    return SketchedPreconditioner(pre, sketch_from_record(record, pre.dim, index_d))
