"""Counter-based random numbers: every random quantity is a pure function of (purpose, seed, stream, k).

Draw k of a stream is computed from its own counter, never from global RNG state, batch size, worker rank
or order, so draw k of stream s under seed is the same number in any process, batch, subset or order:
a training clip featurized in one process and a query scored months later in another see the very same
(σ_k, ε_k) (Motive's "common randomness", D-TRAK's seeded noise; ARCHITECTURE §2).

The scheme is the counter-based idea of Philox / Random123 (a random number is a keyed hash of its
counter, so any element of the sequence is computed directly), but the hash is BLAKE2b from Python's
hashlib rather than a Philox round function:

    h = blake2b("carv-draws/v1|{purpose}|{seed}|{stream}|{k}", digest_size=8) → 64-bit little-endian int
    U_k = (h >> 11) · 2⁻⁵³                                   purpose "u":   uniform in [0, 1)
    ε_k = randn(shape, Generator(cpu).manual_seed(h mod 2⁶³))  purpose "eps": standard normal

The hashed string holds the rule version (RULE_VERSION), so changing the scheme means a new version, and
old indexes are then refused rather than silently scored with other draws. The two purposes hash
different strings, so U_k and ε_k are independent. ε is always generated in float32 on the CPU (by
torch's CPU generator, seeded per draw) and then cast and moved, so CPU and CUDA, fp32 and bf16 get the
same numbers (up to the cast's rounding).

Streams: stream 0 (SHARED_STREAM) is common to every training clip and every query (`--noise shared`:
global stratification, all gradients see the same draws). With `--noise per-clip`, clip `clip_id` uses
stream `clip_stream(clip_id) = clip_id + 1`, which never collides with 0.

Usage:

    >>> U = uniforms(seed=0, stream=clip_stream(17), ks=range(8))   # (8,) float64 in [0, 1)
    >>> eps = noise(0, clip_stream(17), [3, 5], (16, 5, 8, 8))      # (2, 16, 5, 8, 8) float32
    >>> bool((eps[1] == normal(0, clip_stream(17), 5, (16, 5, 8, 8))).all())
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

RULE_VERSION = "carv-draws/v1"  # part of every hashed key; DrawRule records it with each index
SHARED_STREAM = 0


def _hash64(purpose: str, seed: int, stream: int, k: int) -> int:
    """A stable 64-bit integer from (purpose, seed, stream, k): same on every machine and Python."""
    key = f"{RULE_VERSION}|{purpose}|{int(seed)}|{int(stream)}|{int(k)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def clip_stream(clip_id: int) -> int:
    """The per-clip stream of clip `clip_id` (≥ 0): clip_id + 1, so never the shared stream 0."""
    if int(clip_id) < 0:
        raise ValueError(f"clip ids must be nonnegative integers, got {clip_id}")
    return int(clip_id) + 1


def uniform(seed: int, stream: int, k: int) -> float:
    """U_k ∈ [0, 1): the top 53 bits of the "u" hash, i.e. a float64 with full mantissa resolution."""
    return (_hash64("u", seed, stream, k) >> 11) * 2.0**-53


def uniforms(seed: int, stream: int, ks: Sequence[int]) -> Tensor:
    """(U_k for k in ks) as a (len(ks),) float64 tensor."""
    return torch.tensor([uniform(seed, stream, k) for k in ks], dtype=torch.float64)


def normal(
    seed: int,
    stream: int,
    k: int,
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """ε_k ~ N(0, I) of `shape`, from a fresh CPU generator seeded by the "eps" hash."""
    g = torch.Generator(device="cpu").manual_seed(_hash64("eps", seed, stream, k) & (2**63 - 1))
    eps = torch.randn(tuple(shape), generator=g, dtype=torch.float32)  # canonical: fp32 on CPU
    return eps.to(device=device, dtype=dtype)


def noise(
    seed: int,
    stream: int,
    ks: Sequence[int],
    shape: Sequence[int],
    *,
    antithetic: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(ε_k for k in ks) stacked: (len(ks), *shape).

    With `antithetic`, draws pair up as (2j, 2j+1) with ε_{2j+1} = −ε_{2j}, both made from index 2j;
    each ε_k is still N(0, I), so any estimator stays unbiased.
    """
    out = []
    for k in ks:
        if antithetic:
            eps = normal(seed, stream, 2 * (k // 2), shape)
            out.append(-eps if k % 2 else eps)
        else:
            out.append(normal(seed, stream, k, shape))
    if not out:
        return torch.empty((0, *shape), dtype=dtype, device=device)
    return torch.stack(out).to(device=device, dtype=dtype)  # (len(ks), *shape)
