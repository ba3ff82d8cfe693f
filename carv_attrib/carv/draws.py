"""Common random numbers: every random quantity is a pure function of (seed, stream, k, purpose).

Draw k of a stream is fixed by a counter-based rule, never by global RNG state, batch size, worker rank
or order, so a training clip featurized in one process and a query scored months later in another see
the very same (σ_k, ε_k) (Motive's "common randomness", D-TRAK's seeded noise; ARCHITECTURE §2):

    h = blake2b("carv-draws/v1|{purpose}|{seed}|{stream}|{k}") → 64-bit integer
    U_k = (h >> 11) · 2⁻⁵³                                   purpose "u":   uniform in [0, 1)
    ε_k = randn(shape, Generator(cpu).manual_seed(h mod 2⁶³))  purpose "eps": standard normal

The two purposes hash different strings, so U_k and ε_k are independent. ε is always generated in
float32 on the CPU and then cast and moved, so CPU and CUDA, fp32 and bf16 get the same numbers (up to
the cast's rounding).

Streams: stream 0 is the shared stream, common to every training clip and every query (the default,
`--noise shared`: global stratification, all gradients see the same draws). `--noise per-clip` gives
clip `clip_id` the stream `clip_stream(clip_id) = clip_id + 1`, which never collides with 0.

Usage:

    >>> rule = DrawRule(seed=0, scheme="stratified-is", k=8, density="uniform")
    >>> sigma, w, eps = rule.draws_for(rule.stream_for(clip_id=17), latent_shape=(16, 5, 8, 8))
    >>> sigma.shape, w.shape, eps.shape   # (8,), (8,), (8, 16, 5, 8, 8)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # timesteps imports this module; import it lazily at run time.
    from carv_attrib.carv.timesteps import Proposal

RULE_VERSION = "carv-draws/v1"
NOISE_MODES = ("shared", "per-clip")
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


@dataclass(frozen=True)
class DrawRule:
    """Everything that fixes the K (σ, ε, w) draws of a clip; saved with features and indexes.

    Scoring must use the rule the index was built with (compare `to_dict()`), otherwise query and
    training gradients are estimated with different draws.
    """

    seed: int = 0
    scheme: str = "stratified-is"  # iid | stratified | stratified-is
    k: int = 8  # draws per clip
    density: str = "uniform"  # p(σ) spec, canonicalised on construction
    proposal: Proposal | None = None  # q for stratified-is; None means q = p
    noise: str = "shared"  # shared | per-clip
    antithetic: bool = False

    def __post_init__(self) -> None:
        from carv_attrib.carv.timesteps import SCHEMES, density

        object.__setattr__(self, "density", density(self.density).spec)
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown timestep scheme {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if int(self.k) < 1:
            raise ValueError(f"need at least one draw per clip, got k={self.k}")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"unknown noise mode {self.noise!r}; use 'shared' or 'per-clip'")
        if self.proposal is not None:
            if self.scheme != "stratified-is":
                raise ValueError(f"a proposal only applies to scheme 'stratified-is', not {self.scheme!r}")
            if self.proposal.density != self.density:
                raise ValueError(
                    f"the proposal was fitted for density {self.proposal.density!r}, "
                    f"not {self.density!r}; refit it for this density"
                )

    def stream_for(self, clip_id: int | None = None) -> int:
        """The stream of a clip: 0 with shared noise, `clip_stream(clip_id)` with per-clip noise."""
        if self.noise == "shared":
            return SHARED_STREAM
        if clip_id is None:
            raise ValueError("per-clip noise needs a clip id to pick the clip's stream")
        return clip_stream(clip_id)

    def draws_for(
        self,
        stream: int,
        latent_shape: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        ks: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(σ (K,), w (K,), ε (K, *latent_shape)) of `stream`: σ, w float64 CPU; ε in dtype on device.

        `ks` picks a subset of the K draws (same values as in the full set).
        """
        from carv_attrib.carv.timesteps import sample

        ks = list(range(self.k)) if ks is None else [int(k) for k in ks]
        sigma, w = sample(
            self.scheme,
            self.k,
            density=self.density,
            proposal=self.proposal,
            seed=self.seed,
            stream=stream,
            ks=ks,
        )
        eps = noise(
            self.seed, stream, ks, latent_shape, antithetic=self.antithetic, dtype=dtype, device=device
        )
        return sigma, w, eps

    def to_dict(self, include_proposal: bool = True) -> dict[str, Any]:
        """JSON-ready provenance. `proposal` is the fingerprint; `proposal_data` the full q (optional)."""
        d: dict[str, Any] = {
            "rule": RULE_VERSION,
            "seed": int(self.seed),
            "scheme": self.scheme,
            "draws": int(self.k),
            "density": self.density,
            "proposal": None if self.proposal is None else self.proposal.fingerprint,
            "noise": self.noise,
            "antithetic": bool(self.antithetic),
        }
        if include_proposal and self.proposal is not None:
            d["proposal_data"] = self.proposal.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], proposal: Proposal | None = None) -> DrawRule:
        """Inverse of `to_dict`. Without `proposal_data` in `d`, pass the proposal whose fingerprint it names."""
        from carv_attrib.carv.timesteps import Proposal

        if d.get("rule", RULE_VERSION) != RULE_VERSION:
            raise ValueError(
                f"draws were made by rule {d.get('rule')!r}; this version implements {RULE_VERSION!r}"
            )
        if proposal is None and d.get("proposal_data") is not None:
            proposal = Proposal.from_dict(d["proposal_data"])
        fp = d.get("proposal")
        if (fp is None) != (proposal is None) or (proposal is not None and proposal.fingerprint != fp):
            have = None if proposal is None else proposal.fingerprint
            raise ValueError(f"draw rule names proposal {fp!r} but the proposal given is {have!r}")
        return cls(
            seed=int(d["seed"]),
            scheme=d["scheme"],
            k=int(d["draws"]),
            density=d["density"],
            proposal=proposal,
            noise=d["noise"],
            antithetic=bool(d["antithetic"]),
        )
