"""The draw rule: everything that fixes a clip's K (σ, ε, w) draws, recorded with every index.

A `DrawRule` (seed, scheme, K, density p, proposal q, noise mode, antithetic) turns a stream into K draws:
σ_k and w_k from `timesteps.sample`, ε_k from `rng.noise`. Both are counter-based (see `rng`), so draw k
of a stream is the same in any process, batch or order, and a training clip featurized in one process
and a query scored months later in another see the very same (σ_k, ε_k) (ARCHITECTURE §2). Scoring
must use the rule the index was built with: `to_dict()` is saved with features and indexes, and
`from_dict` refuses a rule made by another RULE_VERSION.

Noise modes: "shared" puts every clip and query on stream 0 (global stratification, all gradients see
the same draws); "per-clip" gives clip `clip_id` the stream `rng.clip_stream(clip_id)`.

Usage:

    >>> rule = DrawRule(seed=0, scheme="stratified-is", k=8, density="uniform")
    >>> sigma, w, eps = rule.draws_for(rule.stream_for(clip_id=17), latent_shape=(16, 5, 8, 8))
    >>> sigma.shape, w.shape, eps.shape   # (8,), (8,), (8, 16, 5, 8, 8)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from carv_attrib.carv.rng import RULE_VERSION, SHARED_STREAM, clip_stream, noise
from carv_attrib.carv.rng import uniforms as uniforms  # re-export, until importers switch to rng
from carv_attrib.carv.timesteps import Proposal, check_proposal, density, sample, sampler
from carv_attrib.choices import NOISE_MODES, SCHEMES  # noqa: F401  (SCHEMES: the names a DrawRule takes)


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
        object.__setattr__(self, "density", density(self.density).spec)
        sampler(self.scheme)  # ValueError for a scheme without a registered sampler
        if int(self.k) < 1:
            raise ValueError(f"need at least one draw per clip, got k={self.k}")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"unknown noise mode {self.noise!r}; expected one of {', '.join(NOISE_MODES)}")
        check_proposal(self.scheme, self.proposal, self.density)  # fail here, not at the first draw

    def stream_for(self, clip_id: int | None = None) -> int:
        """The stream of a clip: 0 with shared noise, `clip_stream(clip_id)` with per-clip noise."""
        if self.noise == "shared":
            return SHARED_STREAM
        if self.noise == "per-clip":
            if clip_id is None:
                raise ValueError("per-clip noise needs a clip id to pick the clip's stream")
            return clip_stream(clip_id)
        raise ValueError(f"unknown noise mode {self.noise!r}; expected one of {', '.join(NOISE_MODES)}")

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
