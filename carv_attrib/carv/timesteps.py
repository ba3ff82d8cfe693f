"""Timestep densities p(σ), the importance-sampling proposal q(σ), and stratified σ draws.

The attribution signal is g(z, c) = E_{σ~p, ε}[∇θ ℓ(θ; z, c, σ, ε)] (ARCHITECTURE §2). For one clip we
use K draws of σ and one of three estimators, all unbiased for g:

    iid            σ_k = F_p⁻¹(U_k)                              w_k = 1
    stratified     σ_k = F_p⁻¹(u_k),   u_k = (k + U_k) / K       w_k = 1
    stratified-is  σ_k = F_q⁻¹(u_k),   u_k = (k + U_k) / K       w_k = p(σ_k) / q(σ_k)

where U_k = rng.uniform(seed, stream, k) is counter-based (see `rng`),
and ĝ = (1/K) Σ_k w_k ∇ℓ(σ_k, ε_k). Unbiasedness of stratified-is: u_k is uniform on its stratum, so
E[ĝ] = ∫₀¹ (w·f)(F_q⁻¹(u)) du = E_q[w f] = E_p[f].

Densities are given by a spec string, canonicalised by `density`:

    uniform              σ ~ U(0, 1)
    logit-normal:m,s     σ = sigmoid(m + s·N(0, 1))          (Wan report, finetrainers: m=0, s=1)
    shift:k              σ' = kσ / (1 + (k−1)σ), σ ~ U(0, 1)  (DiffSynth trains Wan with k = 5)

All densities compute in float64 and return float64 tensors, whatever the input dtype. Draw k's σ and
w are bitwise the same whichever subset `ks` computes them (only elementwise float64 kernels whose
result does not depend on the batch; see LogitNormal.icdf), as common random numbers require.

Usage:

    >>> p = density("logit-normal:0,1")
    >>> sigma, w = sample("stratified", 8, density=p.spec, seed=0)          # w == 1
    >>> q = Proposal.from_bins(torch.linspace(0, 1, 17), scores, density=p.spec, mix=0.1)
    >>> sigma, w = sample("stratified-is", 8, density=p.spec, proposal=q)   # w = p/q ≤ 1/mix
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from carv_attrib.carv.rng import uniforms
from carv_attrib.choices import SCHEMES

PROPOSAL_FORMS = ("flat", "p-scaled")
DENSITY_FORMS = "'uniform', 'logit-normal:m,s' (s > 0) or 'shift:k' (k > 0)"
_F64 = torch.float64


def _as_f64(x: Tensor | float | Sequence[float]) -> Tensor:
    """Any tensor, float or list as a float64 tensor (on its device; float64 CUDA is fine)."""
    if isinstance(x, Tensor):
        return x.to(_F64)
    return torch.as_tensor(x, dtype=_F64)


def _fmt(x: float) -> str:
    """Canonical number for a spec: integers without a dot ("3"), others as Python's shortest repr."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


# --------------------------------------------------------------------------------------------------
# p(σ): the model's training timestep density


class Density:
    """A density on σ ∈ [0, 1] with closed-form pdf, cdf and inverse cdf (all float64 in and out)."""

    spec: str

    def pdf(self, s: Tensor | float) -> Tensor:
        raise NotImplementedError

    def cdf(self, s: Tensor | float) -> Tensor:
        raise NotImplementedError

    def icdf(self, u: Tensor | float) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"density({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Density) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


class Uniform(Density):
    """p(σ) = 1 on [0, 1]."""

    spec = "uniform"

    def pdf(self, s: Tensor | float) -> Tensor:
        s = _as_f64(s)
        return ((s >= 0) & (s <= 1)).to(_F64)

    def cdf(self, s: Tensor | float) -> Tensor:
        return _as_f64(s).clamp(0.0, 1.0)

    def icdf(self, u: Tensor | float) -> Tensor:
        return _as_f64(u).clamp(0.0, 1.0)


class LogitNormal(Density):
    """σ = sigmoid(m + s·N(0,1)):  p(σ) = φ((logit σ − m)/s) / (s·σ(1−σ)),  F(σ) = Φ((logit σ − m)/s)."""

    def __init__(self, m: float, s: float):
        if not (math.isfinite(m) and math.isfinite(s) and s > 0):
            raise ValueError(f"logit-normal:m,s needs finite m and s > 0, got m={m}, s={s}")
        self.m, self.s = float(m), float(s)
        self.spec = f"logit-normal:{_fmt(m)},{_fmt(s)}"

    def _z(self, s: Tensor) -> tuple[Tensor, Tensor]:
        # Only the open interval has a finite logit; the ends are handled by the callers' masks.
        inside = (s > 0) & (s < 1)
        si = torch.where(inside, s, torch.full_like(s, 0.5))
        logit = torch.log(si) - torch.log1p(-si)
        return (logit - self.m) / self.s, inside

    def pdf(self, s: Tensor | float) -> Tensor:
        s = _as_f64(s)
        z, inside = self._z(s)
        si = torch.where(inside, s, torch.full_like(s, 0.5))
        # log p = log φ(z) − log s − log σ − log(1−σ): in logs so that σ → 0, 1 underflows to 0, not NaN.
        logp = -0.5 * z**2 - 0.5 * math.log(2 * math.pi) - math.log(self.s) - torch.log(si) - torch.log1p(-si)
        return torch.where(inside, torch.exp(logp), torch.zeros_like(s))

    def cdf(self, s: Tensor | float) -> Tensor:
        s = _as_f64(s)
        z, inside = self._z(s)
        return torch.where(inside, torch.special.ndtr(z), (s >= 1).to(_F64))

    def icdf(self, u: Tensor | float) -> Tensor:
        u = _as_f64(u).clamp(0.0, 1.0)
        # ndtri(0) = −inf and ndtri(1) = +inf map to exactly 0 and 1. Not torch.sigmoid: its float64
        # kernel rounds differently in vectorised and scalar paths, and draw k must not depend on batch.
        return 1.0 / (1.0 + torch.exp(-(self.m + self.s * torch.special.ndtri(u))))


class Shift(Density):
    """Uniform σ pushed through σ' = kσ/(1+(k−1)σ):  F(σ') = σ'/(k − (k−1)σ'),  p(σ') = k/(k − (k−1)σ')²."""

    def __init__(self, k: float):
        if not (math.isfinite(k) and k > 0):
            raise ValueError(f"shift:k needs a finite k > 0, got k={k}")
        self.k = float(k)
        self.spec = f"shift:{_fmt(k)}"

    def pdf(self, s: Tensor | float) -> Tensor:
        s = _as_f64(s)
        k = self.k
        # k − (k−1)σ lies between 1 and k on [0, 1], so no division by zero there.
        p = k / (k - (k - 1) * s.clamp(0.0, 1.0)) ** 2
        return torch.where((s >= 0) & (s <= 1), p, torch.zeros_like(s))

    def cdf(self, s: Tensor | float) -> Tensor:
        s = _as_f64(s).clamp(0.0, 1.0)
        return s / (self.k - (self.k - 1) * s)

    def icdf(self, u: Tensor | float) -> Tensor:
        u = _as_f64(u).clamp(0.0, 1.0)
        return self.k * u / (1 + (self.k - 1) * u)


def density(spec: str | Density) -> Density:
    """The density named by `spec` ('uniform', 'logit-normal:m,s' or 'shift:k'); `.spec` is canonical.

    >>> density("logit-normal:0.0, 1").spec
    'logit-normal:0,1'
    """
    return _parse_density(spec)


def _parse_density(spec: str | Density) -> Density:
    # `sample` has a keyword argument named `density`, so it calls this rather than the public name.
    if isinstance(spec, Density):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"timestep density must be a string, one of {DENSITY_FORMS}; got {spec!r}")
    text = spec.strip().lower().replace(" ", "")
    name, _, args = text.partition(":")
    try:
        nums = [float(a) for a in args.split(",")] if args else []
    except ValueError:
        nums = None
    try:
        if name == "uniform" and not args:
            return Uniform()
        if name == "logit-normal" and nums is not None and len(nums) == 2:
            return LogitNormal(*nums)
        if name == "shift" and nums is not None and len(nums) == 1:
            return Shift(nums[0])
    except ValueError as err:
        raise ValueError(f"bad timestep density {spec!r}: {err}; use {DENSITY_FORMS}") from None
    raise ValueError(f"unknown timestep density {spec!r}; use {DENSITY_FORMS}, e.g. 'logit-normal:0,1'")


# --------------------------------------------------------------------------------------------------
# q(σ): the importance-sampling proposal


class Proposal:
    """q = (1−α)·q* + α·p on σ bins [e_i, e_{i+1}); p is the training density.

    q* puts mass m_i = scores_i·Δ_i / Σ_j scores_j·Δ_j on bin i (Δ_i = e_{i+1} − e_i, ∫q* = 1), spread
    within the bin according to `form`:

        "flat"      q*(σ) = m_i / Δ_i              piecewise constant (ARCHITECTURE §2; the default)
        "p-scaled"  q*(σ) = (m_i / P_i)·p(σ)       P_i = F_p(e_{i+1}) − F_p(e_i): p's shape inside the bin,
                                                   so w = p/q is constant in each bin

    Both forms have the same bin masses, so a plan's scores mean the same in either. They coincide for
    uniform p. For a p that varies inside a bin (logit-normal, shift), "flat" makes w = p/q vary with
    it, which can cost more variance than the importance sampling saves; "p-scaled" is the flat
    proposal in the coordinates F_p(σ) and does not have that problem.
    Because q ≥ α·p everywhere, the weight w = p/q is at most 1/α; α = 1 gives q = p (w = 1).
    Build with `Proposal.from_bins`; save with `to_json`.
    """

    def __init__(self, edges: Tensor, scores: Tensor, density_spec: str, mix: float, form: str = "flat"):
        # Use `from_bins`, which validates; this stores already validated float64 CPU tensors.
        self.edges = edges  # (n+1,)
        self.scores = scores  # (n,)
        self.p = _parse_density(density_spec)
        self.mix = float(mix)
        self.form = form
        widths = edges[1:] - edges[:-1]  # (n,) Δ_i
        mass = scores * widths / (scores * widths).sum()  # (n,) m_i, q* mass per bin
        self._fp_edges = self.p.cdf(edges)  # (n+1,) F_p at the edges
        p_mass = self._fp_edges[1:] - self._fp_edges[:-1]  # (n,) P_i
        if form == "flat":
            self._scale = mass / widths  # (n,) q* height h_i
        else:
            safe = torch.where(p_mass > 0, p_mass, torch.ones_like(p_mass))
            self._scale = torch.where(mass > 0, mass / safe, torch.zeros_like(mass))  # (n,) c_i: q* = c_i·p
        self._cum = torch.cat([torch.zeros(1, dtype=_F64), torch.cumsum(mass, 0)])  # (n+1,) Q* at edges
        self._cum[-1] = 1.0  # exact, so that cdf(1) = 1
        self._q_edges = self.cdf(edges)  # (n+1,) Q at the edges, to bracket icdf's root

    @classmethod
    def from_bins(
        cls,
        edges: Tensor | Sequence[float],
        scores: Tensor | Sequence[float],
        density: str = "uniform",
        mix: float = 0.1,
        *,
        form: str = "flat",
    ) -> Proposal:
        """Proposal from bin edges (n+1,) and unnormalised per-bin mean q* heights `scores` (n,).

        For gradients the optimal q* ∝ p(σ)·sqrt(E‖g_σ‖²), so the caller passes, per bin,
        scores_i = p̄_i · sqrt(mean squared gradient norm of the pilot draws in bin i), with
        p̄_i = (F_p(e_{i+1}) − F_p(e_i)) / (e_{i+1} − e_i) the bin's mean density. `form` is "flat"
        or "p-scaled" (see the class docstring).
        """
        e = _as_f64(edges).detach().cpu().flatten()
        sc = _as_f64(scores).detach().cpu().flatten()
        if e.numel() < 2 or e[0] != 0.0 or e[-1] != 1.0 or not bool((e[1:] > e[:-1]).all()):
            raise ValueError("proposal edges must start at 0, end at 1 and strictly increase")
        if sc.numel() != e.numel() - 1:
            raise ValueError(f"proposal needs one score per bin: {e.numel() - 1} bins, {sc.numel()} scores")
        if not bool(torch.isfinite(sc).all()) or bool((sc < 0).any()) or not bool((sc > 0).any()):
            raise ValueError("proposal scores must be finite, nonnegative and not all zero")
        if not (0.0 < float(mix) <= 1.0):
            raise ValueError(f"proposal mix must be in (0, 1] (weights are bounded by 1/mix), got {mix}")
        if form not in PROPOSAL_FORMS:
            raise ValueError(f"unknown proposal form {form!r}; use one of {', '.join(PROPOSAL_FORMS)}")
        p = _parse_density(density)
        if form == "p-scaled":
            fe = p.cdf(e)
            if bool(((sc > 0) & (fe[1:] <= fe[:-1])).any()):
                raise ValueError("a 'p-scaled' proposal cannot put mass on bins where p has none; use 'flat'")
        return cls(e, sc, p.spec, float(mix), form)

    @property
    def density(self) -> str:
        """The canonical spec of p, the density this proposal importance-samples."""
        return self.p.spec

    @property
    def n_bins(self) -> int:
        return self.scores.numel()

    def _bin(self, s: Tensor) -> Tensor:
        # Bin i holds [e_i, e_{i+1}); σ = 1 goes to the last bin.
        idx = torch.searchsorted(self.edges.to(s.device), s.contiguous(), right=True) - 1
        return idx.clamp(0, self.n_bins - 1)

    def pdf(self, s: Tensor | float) -> Tensor:
        """q(σ) = (1−α)·q*(σ) + α·p(σ); 0 outside [0, 1]."""
        s = _as_f64(s)
        scale = self._scale.to(s.device)[self._bin(s)]
        p = self.p.pdf(s)
        qstar = scale if self.form == "flat" else scale * p
        q = (1 - self.mix) * qstar + self.mix * p
        return torch.where((s >= 0) & (s <= 1), q, torch.zeros_like(s))

    def cdf(self, s: Tensor | float) -> Tensor:
        """Q(σ) = (1−α)·Q*(σ) + α·F_p(σ), Q*(σ) = Σ_{j<i} m_j + ∫_{e_i}^σ q* for σ in bin i."""
        s = _as_f64(s).clamp(0.0, 1.0)
        i = self._bin(s)
        dev = s.device
        fp = self.p.cdf(s)
        if self.form == "flat":
            inside = self._scale.to(dev)[i] * (s - self.edges.to(dev)[i])  # h_i·(σ − e_i)
        else:
            inside = self._scale.to(dev)[i] * (fp - self._fp_edges.to(dev)[i])  # c_i·(F_p(σ) − F_p(e_i))
        qstar = (self._cum.to(dev)[i] + inside).clamp(0.0, 1.0)
        q = ((1 - self.mix) * qstar + self.mix * fp).clamp(0.0, 1.0)
        return torch.where(s >= 1, torch.ones_like(q), q)  # exact at σ = 1 despite rounding in the sum

    def icdf(self, u: Tensor | float, tol: float = 1e-14, max_iter: int = 100) -> Tensor:
        """Q⁻¹(u) in float64. icdf(0) = 0 and icdf(1) = 1 exactly.

        The bin holding the root is found from Q at the edges. "p-scaled": inside bin i,
        Q(σ) = A_i + ((1−α)c_i + α)·F_p(σ) is inverted in closed form through F_p⁻¹. "flat": safeguarded
        Newton, σ ← σ − (Q(σ)−u)/q(σ), with steps that would leave the bracket replaced by bisection, so
        it converges from anywhere (quadratically once close) to |Δσ| ≤ tol.
        """
        u = _as_f64(u).clamp(0.0, 1.0)
        if self.mix == 1.0:
            return self.p.icdf(u)  # q = p
        dev = u.device
        edges, q_edges = self.edges.to(dev), self._q_edges.to(dev)  # (n+1,) σ and Q(σ) at edges
        i = (torch.searchsorted(q_edges, u.contiguous(), right=True) - 1).clamp(0, self.n_bins - 1)
        lo, hi = edges[i], edges[i + 1]  # bracket: Q(lo) ≤ u ≤ Q(hi)
        if self.form == "p-scaled":
            c, fe = self._scale.to(dev)[i], self._fp_edges.to(dev)  # (len(u),), (n+1,)
            slope = (1 - self.mix) * c + self.mix  # dQ/dF_p inside the bin
            fp = fe[i] + (u - q_edges[i]) / slope  # F_p(σ) solving Q(σ) = u
            x = self.p.icdf(torch.minimum(torch.maximum(fp, fe[i]), fe[i + 1]))
            x = torch.minimum(torch.maximum(x, lo), hi)
        else:
            frac = ((u - q_edges[i]) / (q_edges[i + 1] - q_edges[i])).clamp(0.0, 1.0)
            x = lo + frac * (hi - lo)  # linear interpolation within the bin: exact for uniform p
            done = torch.zeros_like(u, dtype=torch.bool)
            for _ in range(max_iter):
                f = self.cdf(x) - u
                lo = torch.where(f < 0, x, lo)
                hi = torch.where(f > 0, x, hi)
                dens = self.pdf(x)
                newton = x - f / torch.where(dens > 0, dens, torch.ones_like(dens))
                # A Newton step must land strictly inside the bracket, or stay put (converged).
                ok = (dens > 0) & (((newton > lo) & (newton < hi)) | (newton == x))
                x_new = torch.where(f == 0, x, torch.where(ok, newton, 0.5 * (lo + hi)))
                # Each element stops on its own step, so draw k does not depend on the batch it is in.
                converged = (x_new - x).abs() <= tol
                x = torch.where(done, x, x_new)
                done = done | converged
                if bool(done.all()):
                    break
        x = torch.where(u <= 0, torch.zeros_like(x), x)
        return torch.where(u >= 1, torch.ones_like(x), x)

    def weight(self, s: Tensor | float) -> Tensor:
        """w = p(σ)/q(σ) ∈ [0, 1/α]; 0 where both vanish (e.g. logit-normal at σ = 0)."""
        s = _as_f64(s)
        p, q = self.p.pdf(s), self.pdf(s)
        return torch.where(q > 0, p / torch.where(q > 0, q, torch.ones_like(q)), torch.zeros_like(q))

    def to_dict(self) -> dict[str, Any]:
        # Python floats serialise with a round-tripping repr, so from_dict(to_dict()) is exact.
        return {
            "kind": "carv-proposal",
            "version": 1,
            "density": self.density,
            "mix": self.mix,
            "form": self.form,
            "edges": self.edges.tolist(),
            "scores": self.scores.tolist(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Proposal:
        if d.get("kind") != "carv-proposal" or d.get("version") != 1:
            raise ValueError("not a carv proposal (expected kind 'carv-proposal', version 1)")
        form = d.get("form", "flat")
        return cls.from_bins(d["edges"], d["scores"], density=d["density"], mix=d["mix"], form=form)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> Proposal:
        """Inverse of `to_json` (exact); a dict (already parsed JSON) is accepted too."""
        return cls.from_dict(text if isinstance(text, dict) else json.loads(text))

    @property
    def fingerprint(self) -> str:
        """16 hex digits of a hash of the canonical JSON: equal fingerprints mean equal proposals."""
        return hashlib.blake2b(self.to_json().encode(), digest_size=8).hexdigest()

    @property
    def spec(self) -> str:
        return (
            f"proposal:{self.density}:{self.form}:mix={_fmt(self.mix)}:bins={self.n_bins}:{self.fingerprint}"
        )

    def __repr__(self) -> str:
        return f"Proposal({self.spec})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Proposal) and other.to_json() == self.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())


def check_proposal(scheme: str, proposal: Proposal | None, density: str | Density) -> None:
    """Raise ValueError unless `proposal` (if any) can importance-sample `density` under `scheme`.

    The one place a proposal q meets a density p: `sample` and `DrawRule` both call it. q is fitted
    for one p (w = p/q), so drawing for another p with it would weight the draws wrongly.
    """
    if proposal is None:
        return
    if not sampler(scheme).takes_proposal:
        takers = [name for name, s in SAMPLERS.items() if s.takes_proposal]
        raise ValueError(
            f"a proposal only applies to scheme {' or '.join(map(repr, takers))}, not {scheme!r}"
        )
    spec = _parse_density(density).spec
    if proposal.density != spec:
        raise ValueError(
            f"the proposal (plan) was fitted for density {proposal.density!r}, not --density {spec!r}; "
            f"refit the plan for this density (`carv-attrib plan ... --density {spec}`) "
            f"or pass the plan's density (--density {proposal.density})"
        )


# --------------------------------------------------------------------------------------------------
# σ draws


def sample(
    scheme: str,
    n: int,
    *,
    density: str | Density = "uniform",
    proposal: Proposal | None = None,
    seed: int = 0,
    stream: int = 0,
    ks: Sequence[int] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Draws k ∈ ks (default 0..n−1) of an n-draw `scheme`: (σ (len(ks),), w (len(ks),)), float64 CPU.

    iid: σ_k = F_p⁻¹(U_k), w = 1.  stratified: σ_k = F_p⁻¹((k + U_k)/n), w = 1.
    stratified-is: σ_k = F_q⁻¹((k + U_k)/n), w_k = p(σ_k)/q(σ_k); without a proposal q = p (w = 1).
    U_k = rng.uniform(seed, stream, k) depends on (seed, stream, k) only, so draw k is the same
    whichever subset `ks` or process computes it; (1/n) Σ_k w_k f(σ_k) over all k is unbiased for E_p[f].
    A proposal must suit `scheme` and `density` (`check_proposal`), else ValueError.
    """
    s = sampler(scheme)
    if n < 1:
        raise ValueError(f"need at least one draw, got n={n}")
    p = _parse_density(density)
    check_proposal(scheme, proposal, p.spec)
    k = torch.arange(n, dtype=torch.int64) if ks is None else torch.as_tensor(ks, dtype=torch.int64).flatten()
    if k.numel() and (int(k.min()) < 0 or int(k.max()) >= n):
        raise ValueError(f"draw indices must lie in [0, {n}), got {k.tolist()}")
    U = uniforms(seed, stream, k.tolist())  # (len(ks),) float64 in [0, 1)
    return s.draw(k, U, n, p, proposal)


# --------------------------------------------------------------------------------------------------
# the scheme registry: one Sampler per name of choices.SCHEMES


@dataclass(frozen=True)
class Sampler:
    """How one timestep scheme turns the common uniforms into draws.

    draw(k, U, n, p, proposal) -> (σ (len(k),), w (len(k),)) float64: k the draw indices (int64),
    U their uniforms in [0, 1) (float64, `rng.uniforms`), n the draws per clip, p the density,
    proposal q or None. `stratified`: draw k lies in stratum k, the k-th of n equal-mass bands of
    `stratum_density` (what `score --explain` splits a score by); otherwise strata are the density's
    equal-mass bands and a draw is placed by its σ. `takes_proposal`: the scheme can importance-sample
    with a plan's proposal (`check_proposal`).

    Adding a scheme: a `Sampler` here and its name in `choices.SCHEMES` (the CLI's list).
    """

    draw: Callable[[Tensor, Tensor, int, Density, Proposal | None], tuple[Tensor, Tensor]]
    stratified: bool
    takes_proposal: bool = False

    def stratum_density(self, p: Density, proposal: Proposal | None) -> Density | Proposal:
        """The distribution whose equal-mass bands are the strata: q when it samples with one, else p."""
        return proposal if (self.takes_proposal and proposal is not None) else p


def _draw_iid(k: Tensor, U: Tensor, n: int, p: Density, proposal: Proposal | None) -> tuple[Tensor, Tensor]:
    return p.icdf(U), torch.ones_like(U)  # σ_k = F_p⁻¹(U_k), w = 1


def _draw_stratified(
    k: Tensor, U: Tensor, n: int, p: Density, proposal: Proposal | None
) -> tuple[Tensor, Tensor]:
    u = (k.to(_F64) + U) / n  # (len(k),) one point in each stratum [k/n, (k+1)/n)
    return p.icdf(u), torch.ones_like(u)


def _draw_stratified_is(
    k: Tensor, U: Tensor, n: int, p: Density, proposal: Proposal | None
) -> tuple[Tensor, Tensor]:
    if proposal is None:  # q = p: plain stratified
        return _draw_stratified(k, U, n, p, None)
    sigma = proposal.icdf((k.to(_F64) + U) / n)  # σ_k = F_q⁻¹((k + U_k)/n)
    return sigma, proposal.weight(sigma)  # w_k = p(σ_k)/q(σ_k)


SAMPLERS: dict[str, Sampler] = {
    "iid": Sampler(_draw_iid, stratified=False),
    "stratified": Sampler(_draw_stratified, stratified=True),
    "stratified-is": Sampler(_draw_stratified_is, stratified=True, takes_proposal=True),
}
assert tuple(SAMPLERS) == SCHEMES, "choices.SCHEMES and timesteps.SAMPLERS must agree"


def sampler(scheme: str) -> Sampler:
    """The registered Sampler of `scheme`; ValueError for a name without one."""
    try:
        return SAMPLERS[scheme]
    except KeyError:
        raise ValueError(
            f"unknown timestep scheme {scheme!r}; expected one of {', '.join(SAMPLERS)}"
        ) from None
