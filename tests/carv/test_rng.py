"""Counter-based random numbers: draw k of stream s under a seed is a pure function of (seed, s, k)."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carv_attrib.carv import rng
from carv_attrib.carv.rng import clip_stream, noise, normal, uniform, uniforms

REPO = Path(__file__).resolve().parents[2]
LATENT = (4, 2, 3, 3)


def test_uniforms_and_normals_are_counter_based() -> None:
    ks = list(range(16))
    full = uniforms(3, 0, ks)
    assert full.dtype == torch.float64 and bool(((full >= 0) & (full < 1)).all())
    assert torch.equal(uniforms(3, 0, [9, 2, 5]), full[[9, 2, 5]])
    assert uniform(3, 0, 7) == float(full[7])
    # Every (seed, stream) pair gives another sequence; "u" and "eps" hash different strings.
    assert not torch.equal(uniforms(4, 0, ks), full) and not torch.equal(uniforms(3, 1, ks), full)
    assert rng._hash64("u", 3, 0, 7) != rng._hash64("eps", 3, 0, 7)

    eps = noise(3, 0, ks, LATENT)  # (16, *LATENT)
    assert eps.shape == (16, *LATENT) and eps.dtype == torch.float32
    for order in ([5], [15, 0, 7], list(reversed(ks))):
        assert torch.equal(noise(3, 0, order, LATENT), eps[order])
    assert torch.equal(normal(3, 0, 4, LATENT), eps[4])
    # The dtype asked for is a cast of the same canonical fp32 numbers.
    assert torch.equal(noise(3, 0, [1, 2], LATENT, dtype=torch.float64), eps[[1, 2]].double())
    assert torch.equal(noise(3, 0, [1, 2], LATENT, dtype=torch.bfloat16), eps[[1, 2]].bfloat16())
    assert not torch.equal(noise(3, clip_stream(0), ks, LATENT), eps)
    # Global RNG state is neither used nor disturbed.
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    noise(3, 0, ks, LATENT)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_uniform_and_normal_moments() -> None:
    """U ~ U[0,1) and ε ~ N(0,1): moments within 4 standard errors."""
    u = uniforms(0, 0, range(20000))
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / u.numel())
    assert abs(float((u < 0.1).double().mean()) - 0.1) < 4 * math.sqrt(0.09 / u.numel())
    e = noise(0, 0, range(200), (100,)).flatten().double()
    assert abs(float(e.mean())) < 4 / math.sqrt(e.numel())
    assert abs(float(e.var()) - 1) < 4 * math.sqrt(2 / e.numel())


def test_antithetic_pairs() -> None:
    eps = noise(5, 0, range(5), LATENT, antithetic=True)
    plain = noise(5, 0, range(5), LATENT)
    assert torch.equal(eps[1], -eps[0]) and torch.equal(eps[3], -eps[2])
    assert torch.equal(eps[0], plain[0]) and torch.equal(eps[2], plain[2]) and torch.equal(eps[4], plain[4])
    assert torch.equal(noise(5, 0, [3], LATENT, antithetic=True)[0], -plain[2])


def test_clip_stream() -> None:
    assert clip_stream(0) == 1 and clip_stream(41) == 42
    with pytest.raises(ValueError):
        clip_stream(-1)


def test_hash_is_pinned() -> None:
    """The scheme is blake2b-8 of "carv-draws/v1|purpose|seed|stream|k": changing it needs a new version."""
    assert rng.RULE_VERSION == "carv-draws/v1"
    assert rng._hash64("u", 0, 0, 0) == int.from_bytes(
        hashlib.blake2b(b"carv-draws/v1|u|0|0|0", digest_size=8).digest(), "little"
    )
    assert uniform(0, 0, 0) == (rng._hash64("u", 0, 0, 0) >> 11) * 2.0**-53


def test_rng_and_timesteps_do_not_import_draws() -> None:
    """No import circle: rng imports nothing of carv, timesteps only rng, draws both."""
    code = (
        "import sys\n"
        "import carv_attrib.carv.timesteps\n"
        "assert 'carv_attrib.carv.draws' not in sys.modules, sorted(sys.modules)\n"
        "import carv_attrib.carv.draws\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
