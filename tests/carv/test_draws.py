"""The draw rule: (σ, w, ε) of draw k are a pure function of (rule, stream, k), in any batch or process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carv_attrib.carv import draws, rng
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.rng import clip_stream
from carv_attrib.carv.timesteps import Proposal, sample

REPO = Path(__file__).resolve().parents[2]
EDGES = torch.linspace(0, 1, 9, dtype=torch.float64)
LATENT = (4, 2, 3, 3)


def fitted_rule(**kw) -> DrawRule:
    q = Proposal.from_bins(EDGES, [8, 4, 2, 1, 1, 1, 2, 3], "logit-normal:0,1", 0.1)
    return DrawRule(seed=11, scheme="stratified-is", k=8, density="logit-normal:0,1", proposal=q, **kw)


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_draws_subsets_match_full_set() -> None:
    """Draw k of an n-draw stratification is the same computed alone, in any subset or order."""
    rule = fitted_rule()
    sigma, w, eps = rule.draws_for(0, LATENT)
    for ks in ([3], [7, 0], [6, 5, 4, 3, 2, 1, 0]):
        s2, w2, e2 = rule.draws_for(0, LATENT, ks=ks)
        assert torch.equal(s2, sigma[ks]) and torch.equal(w2, w[ks]) and torch.equal(e2, eps[ks])
    for scheme in ("iid", "stratified", "stratified-is"):
        full = sample(scheme, 8, density="shift:3", seed=2, stream=5)
        for k in range(8):
            one = sample(scheme, 8, density="shift:3", seed=2, stream=5, ks=[k])
            assert torch.equal(one[0], full[0][[k]]) and torch.equal(one[1], full[1][[k]])


def test_draws_identical_in_another_process() -> None:
    code = (
        "import hashlib, torch\n"
        "from carv_attrib.carv.draws import DrawRule\n"
        "from carv_attrib.carv.timesteps import Proposal\n"
        "q = Proposal.from_bins(torch.linspace(0, 1, 9, dtype=torch.float64), [8, 4, 2, 1, 1, 1, 2, 3],"
        " 'logit-normal:0,1', 0.1)\n"
        "rule = DrawRule(seed=11, scheme='stratified-is', k=8, density='logit-normal:0,1', proposal=q,"
        " noise='per-clip', antithetic=True)\n"
        f"s, w, e = rule.draws_for(rule.stream_for(12), {LATENT!r}, ks=[6, 1, 2])\n"
        "h = hashlib.sha256()\n"
        "for t in (s, w, e): h.update(t.contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    rule = fitted_rule(noise="per-clip", antithetic=True)
    s, w, e = rule.draws_for(rule.stream_for(12), LATENT)
    assert out.stdout.strip() == digest(s[[6, 1, 2]], w[[6, 1, 2]], e[[6, 1, 2]])


def test_draw_rule_streams_and_dict() -> None:
    shared = fitted_rule()
    assert shared.stream_for(3) == shared.stream_for(None) == 0  # clips and queries share stream 0
    a, b = shared.draws_for(shared.stream_for(3), LATENT), shared.draws_for(shared.stream_for(9), LATENT)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    per_clip = fitted_rule(noise="per-clip")
    assert per_clip.stream_for(3) == clip_stream(3)
    a, b = (
        per_clip.draws_for(per_clip.stream_for(3), LATENT),
        per_clip.draws_for(per_clip.stream_for(9), LATENT),
    )
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[2], b[2])
    with pytest.raises(ValueError, match="clip id"):
        per_clip.stream_for(None)
    unknown = fitted_rule()
    object.__setattr__(unknown, "noise", "fresh")  # past __post_init__: stream_for has no fallback
    with pytest.raises(ValueError, match=r"unknown noise mode 'fresh'"):
        unknown.stream_for(3)

    sigma, w, eps = shared.draws_for(0, LATENT, dtype=torch.float64)
    assert sigma.shape == w.shape == (8,) and sigma.dtype == w.dtype == torch.float64
    assert eps.shape == (8, *LATENT) and eps.dtype == torch.float64
    assert float(w.max()) <= 1 / 0.1 and not bool(torch.equal(w, torch.ones(8, dtype=torch.float64)))

    d = shared.to_dict()
    assert d["proposal"] == shared.proposal.fingerprint and d["rule"] == rng.RULE_VERSION
    assert DrawRule.from_dict(d) == shared
    slim = shared.to_dict(include_proposal=False)
    assert "proposal_data" not in slim
    assert DrawRule.from_dict(slim, proposal=shared.proposal) == shared
    with pytest.raises(ValueError, match="proposal"):
        DrawRule.from_dict(slim)
    other = Proposal.from_bins(EDGES, torch.ones(8), "logit-normal:0,1", 0.1)
    with pytest.raises(ValueError, match="proposal"):
        DrawRule.from_dict(slim, proposal=other)
    plain = DrawRule(seed=1, scheme="iid", k=4, density="shift:3.0", noise="per-clip")
    assert plain.density == "shift:3" and DrawRule.from_dict(plain.to_dict()) == plain


def test_draw_rule_validation() -> None:
    q = Proposal.from_bins(EDGES, torch.ones(8), "uniform", 0.1)
    for kwargs in (
        dict(scheme="sobol"),
        dict(k=0),
        dict(noise="fresh"),
        dict(density="gauss"),
        dict(scheme="stratified", proposal=q),
        dict(density="shift:3", proposal=q),
    ):
        with pytest.raises(ValueError):
            DrawRule(**kwargs)
    with pytest.raises(ValueError, match="rule"):
        DrawRule.from_dict({**DrawRule().to_dict(), "rule": "carv-draws/v0"})
    with pytest.raises(ValueError, match=r"unknown timestep scheme 'sobol'; expected one of iid, "):
        DrawRule(scheme="sobol")
    with pytest.raises(ValueError, match=r"unknown noise mode 'fresh'; expected one of shared, per-clip"):
        DrawRule(noise="fresh")
    # The proposal/density check is timesteps.check_proposal's, raised at construction.
    with pytest.raises(ValueError, match=r"fitted for density 'uniform', not --density 'shift:3'"):
        DrawRule(density="shift:3", proposal=q)


def test_old_import_paths_still_work() -> None:
    """Until their importers move to `rng`, draws re-exports clip_stream, noise and uniforms."""
    assert draws.clip_stream is rng.clip_stream and draws.noise is rng.noise
    assert draws.uniforms is rng.uniforms
