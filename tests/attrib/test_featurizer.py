"""attrib/featurizer.py: building projectors and draw rules (bad combinations as UsageError), loading
a featurizer, rebuilding one from recorded projector specs (identical features), and the draws a
clip gets under shared and per-clip noise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from carv_attrib.attrib.featurizer import (
    Featurizer,
    build_draw_rule,
    build_projector,
    load_featurizer,
    token_weights,
)
from carv_attrib.attrib.projection import (
    DEFAULT_DENSE_DIM,
    DEFAULT_K_IN,
    DEFAULT_K_OUT,
    DenseProjector,
    KronProjector,
    augmented_shape,
    select_linear_layers,
)
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.timesteps import Proposal
from carv_attrib.errors import UsageError

LATENT_SHAPE = (16, 3, 4, 4)  # (C, T, h, w) of a 9-frame 32x32 clip of the tiny VAE


@pytest.fixture(scope="module")
def block_layers(wan: nn.Module) -> list[tuple[str, nn.Linear]]:
    return select_linear_layers(wan, ["blocks.*"])


@pytest.fixture(scope="module")
def clips(encoded_run: Path) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    from carv_attrib.store.latents import iter_cached

    cached = list(iter_cached(encoded_run))[:2]
    return [(c.clip_id, c.latent, c.text_emb) for c in cached]


# -- build_projector -------------------------------------------------------------------------------
def test_the_tiny_model_has_20_block_layers(block_layers) -> None:
    """The defaults below are stated for this model: 2 blocks x 10 Linear layers."""
    assert len(block_layers) == 20
    assert DEFAULT_DENSE_DIM == 1280  # the dense reference's own default, not tied to the kron dims


def test_kron_default_is_16x16_per_selected_layer(wan: nn.Module, block_layers) -> None:
    proj = build_projector("kron", wan)
    assert isinstance(proj, KronProjector)
    assert proj.layer_dims == [(n, DEFAULT_K_OUT, DEFAULT_K_IN) for n, _ in block_layers]
    assert proj.dim == len(block_layers) * DEFAULT_K_OUT * DEFAULT_K_IN == len(block_layers) * 256
    assert proj.spec()["patterns"] == ["blocks.*"] and proj.seed == 0 and proj.kind == "gaussian"


def test_kron_layers_seed_and_matrix(wan: nn.Module) -> None:
    proj = build_projector("kron", wan, layers=["blocks.0.*"], seed=3, matrix="rademacher")
    names = [n for n, _ in select_linear_layers(wan, ["blocks.0.*"])]
    assert [n for n, _, _ in proj.layer_dims] == names and len(names) == 10
    assert proj.seed == 3 and proj.kind == "rademacher"
    assert all(bool((p_in.abs() == p_in.abs()[0, 0]).all()) for _, p_in, _ in proj.matrices())


def test_kron_dims_per_layer(wan: nn.Module, block_layers) -> None:
    proj = build_projector("kron", wan, kron_dims=(4, 2))
    assert {(ko, ki) for _, ko, ki in proj.layer_dims} == {(4, 2)}
    assert proj.dim == len(block_layers) * 8


@pytest.mark.parametrize("proj_dim", [500, 333, 20])
def test_kron_proj_dim_is_a_total_split_over_layers(wan: nn.Module, block_layers, proj_dim: int) -> None:
    proj = build_projector("kron", wan, proj_dim=proj_dim)
    n = len(block_layers)
    k = math.isqrt(proj_dim // n)
    assert {(ko, ki) for _, ko, ki in proj.layer_dims} == {(k, k)}
    assert proj.dim == n * k * k <= proj_dim


def test_dense_default_and_proj_dim(wan: nn.Module, block_layers) -> None:
    proj = build_projector("dense", wan)
    assert isinstance(proj, DenseProjector)
    assert proj.dim == DEFAULT_DENSE_DIM == 1280
    assert proj.grad_dim == sum(o * i for o, i in (augmented_shape(m) for _, m in block_layers))
    assert build_projector("dense", wan, proj_dim=96, seed=2, matrix="rademacher").dim == 96


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        ("kron", {"proj_dim": 256, "kron_dims": (4, 4)}, r"--proj-dim .*--kron-dims"),
        ("dense", {"kron_dims": (4, 4)}, r"--kron-dims applies to --projector kron"),
        ("pca", {}, r"--projector pca"),
        ("kron", {"layers": ["no.such.*"]}, r"no nn.Linear module matches"),
        ("dense", {"layers": ["no.such.*"]}, r"no nn.Linear module matches"),
        ("kron", {"matrix": "sparse"}, r"sparse"),
        ("dense", {"matrix": "sparse"}, r"sparse"),
        ("kron", {"proj_dim": -1}, r"proj_dim"),
        ("dense", {"proj_dim": -1}, r"dim"),
        ("kron", {"kron_dims": (0, 4)}, r"k_out and k_in must be >= 1"),
    ],
)
def test_bad_projector_combinations_are_usage_errors(
    wan: nn.Module, kind: str, kwargs: dict, message: str
) -> None:
    with pytest.raises(UsageError, match=message) as exc:
        build_projector(kind, wan, **kwargs)
    assert exc.value.exit_code == 2


# -- build_draw_rule -------------------------------------------------------------------------------
def test_build_draw_rule_is_a_draw_rule() -> None:
    rule = build_draw_rule(seed=1, scheme="stratified", k=3, density="logit-normal:0,1", noise="per-clip")
    assert rule == DrawRule(seed=1, scheme="stratified", k=3, density="logit-normal:0,1", noise="per-clip")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "sobol"}, r"unknown timestep scheme 'sobol'"),
        ({"k": 0}, r"at least one draw"),
        ({"noise": "none"}, r"unknown noise mode"),
        ({"density": "cauchy"}, r"cauchy"),
    ],
)
def test_build_draw_rule_turns_bad_values_into_usage_errors(kwargs: dict, message: str) -> None:
    args = {"seed": 0, "scheme": "stratified-is", "k": 4, "density": "uniform", **kwargs}
    with pytest.raises(UsageError, match=message):
        build_draw_rule(**args)


def test_build_draw_rule_refuses_a_proposal_for_another_density() -> None:
    q = Proposal.from_bins([0.0, 0.5, 1.0], [1.0, 2.0], "logit-normal:0,1", 0.1, form="p-scaled")
    assert build_draw_rule(seed=0, scheme="stratified-is", k=2, density="logit-normal:0,1", proposal=q)
    with pytest.raises(UsageError, match=r"--density"):
        build_draw_rule(seed=0, scheme="stratified-is", k=2, density="uniform", proposal=q)
    with pytest.raises(UsageError, match=r"stratified-is"):
        build_draw_rule(seed=0, scheme="iid", k=2, density="logit-normal:0,1", proposal=q)


# -- load_featurizer -------------------------------------------------------------------------------
def test_load_featurizer_needs_exactly_one_projector_source(tiny_model_dir: Path) -> None:
    rule = DrawRule(k=2)
    with pytest.raises(ValueError, match="exactly one"):
        load_featurizer(str(tiny_model_dir), [None], rule, "loss", "cpu", "float32")
    with pytest.raises(ValueError, match="exactly one"):
        load_featurizer(
            str(tiny_model_dir),
            [None],
            rule,
            "loss",
            "cpu",
            "float32",
            projector_specs=[{"kind": "kron"}],
            new_projector=lambda t: build_projector("kron", t),
        )


@pytest.mark.parametrize("kind", ["kron", "dense"])
def test_a_featurizer_rebuilt_from_its_specs_gives_identical_features(
    tiny_model_dir: Path, clips, kind: str
) -> None:
    """What score does: new process, transformer loaded again, projector from the recorded spec."""
    rule = DrawRule(seed=0, scheme="stratified-is", k=2)
    fz = load_featurizer(
        str(tiny_model_dir),
        [None],
        rule,
        "loss",
        "cpu",
        "float32",
        new_projector=lambda t: build_projector(kind, t, proj_dim=None if kind == "kron" else 64),
    )
    specs = json.loads(json.dumps([p.spec() for p in fz.projectors]))  # as stored in index_info.json
    again = load_featurizer(
        str(tiny_model_dir), [None], DrawRule.from_dict(rule.to_dict()), "loss", "cpu", "float32",
        projector_specs=specs,
    )  # fmt: skip
    assert type(again.projectors[0]) is type(fz.projectors[0]) and again.dim == fz.dim
    f1, l1, d1 = fz.features(clips)
    f2, l2, d2 = again.features(clips)
    assert f1.shape == (len(clips), fz.dim) and f1.dtype == torch.float32
    assert l1.shape == (len(clips), rule.k)
    assert torch.equal(f1, f2) and torch.equal(l1, l2)
    for (s1, w1), (s2, w2) in zip(d1, d2):
        assert torch.equal(s1, s2) and torch.equal(w1, w2)
    assert bool(f1.abs().sum() > 0)


def test_one_feature_block_per_checkpoint(tiny_model_dir: Path, clips) -> None:
    rule = DrawRule(seed=0, scheme="stratified", k=2)
    ck = str(tiny_model_dir / "transformer")
    fz = load_featurizer(
        str(tiny_model_dir), [None, ck], rule, "loss", "cpu", "float32",
        new_projector=lambda t: build_projector("kron", t, kron_dims=(2, 2)),
    )  # fmt: skip
    d = fz.projectors[0].dim
    assert fz.blocks == [d, d] and fz.dim == 2 * d
    feats, losses, _ = fz.features(clips)
    assert feats.shape == (len(clips), 2 * d) and losses.shape == (len(clips), 2 * rule.k)
    # The same weights and the same projector seed: the two blocks are the same computation.
    assert torch.equal(feats[:, :d], feats[:, d:]) and torch.equal(losses[:, :2], losses[:, 2:])


# -- draws -----------------------------------------------------------------------------------------
def _featurizer(rule: DrawRule) -> Featurizer:
    return Featurizer(transformers=[], projectors=[], rule=rule, output_fn="loss", device="cpu")


def _equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("scheme", ["iid", "stratified", "stratified-is"])
def test_shared_noise_gives_every_clip_the_same_draws(scheme: str) -> None:
    rule = DrawRule(seed=5, scheme=scheme, k=4, noise="shared")
    a = _featurizer(rule).draws(3, LATENT_SHAPE)
    b = _featurizer(rule).draws(11, LATENT_SHAPE)  # another featurizer: no shared cache
    assert _equal(a, b)
    assert _equal(a, rule.draws_for(0, LATENT_SHAPE))
    sigma, w, eps = a
    assert sigma.shape == w.shape == (4,) and eps.shape == (4, *LATENT_SHAPE)


@pytest.mark.parametrize("scheme", ["iid", "stratified", "stratified-is"])
def test_per_clip_noise_gives_clips_their_own_draws(scheme: str) -> None:
    rule = DrawRule(seed=5, scheme=scheme, k=4, noise="per-clip")
    fz = _featurizer(rule)
    s3, w3, e3 = fz.draws(3, LATENT_SHAPE)
    s11, w11, e11 = fz.draws(11, LATENT_SHAPE)
    assert not torch.equal(s3, s11) and not torch.equal(e3, e11)
    # Each is the clip's own stream, and asking again gives the same draws.
    assert _equal((s3, w3, e3), rule.draws_for(rule.stream_for(3), LATENT_SHAPE))
    assert _equal((s11, w11, e11), fz.draws(11, LATENT_SHAPE))


def test_use_rule_forgets_cached_draws() -> None:
    fz = _featurizer(DrawRule(seed=0, k=2))
    before = fz.draws(0, LATENT_SHAPE)
    fz.use_rule(DrawRule(seed=1, k=2))
    after = fz.draws(0, LATENT_SHAPE)
    assert not torch.equal(before[2], after[2])
    assert _equal(after, DrawRule(seed=1, k=2).draws_for(0, LATENT_SHAPE))


def test_features_report_each_clips_draws(tiny_model_dir: Path, clips) -> None:
    shared = DrawRule(seed=0, scheme="stratified", k=2, noise="shared")
    fz = load_featurizer(
        str(tiny_model_dir), [None], shared, "loss", "cpu", "float32",
        new_projector=lambda t: build_projector("kron", t, kron_dims=(2, 2)),
    )  # fmt: skip
    _, _, draws = fz.features(clips)
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    fz.use_rule(DrawRule(seed=0, scheme="stratified", k=2, noise="per-clip"))
    _, _, draws = fz.features(clips)
    assert not torch.equal(draws[0][0], draws[1][0])


# -- draw_parts (score --explain's per-stratum split) ----------------------------------------------
@pytest.mark.parametrize("objective", ["uniform", "motion"])
def test_draw_parts_add_up_to_the_feature_with_weights_and_checkpoints(
    tiny_model_dir: Path, clips, objective: str
) -> None:
    """Σ_k part_k = φ for each checkpoint block, with importance weights w_k ≠ 1 (stratified-is under
    a non-flat proposal) and per-token motion weights.

    The per-draw path and the batched K-draw feature are the same sums in another float32 order. Per
    layer block the allowed error is the larger of C·eps32·sqrt(n)·Σ_k ‖part_k‖ (test_gradients.py's
    bound, n the longest contraction; Σ_k ‖part_k‖ because draws partly cancel) and 10x the measured
    reordering noise of the same feature (one backward per draw, `draws_per_backward=1`, against one
    for all K): the token sums of the real demo latents, with the 512-token padded context, cancel
    more than test_gradients.py's random data. The control: dropping the w_k, or the motion weights,
    must exceed it."""
    from carv_attrib.video.motion import objective_spec

    q = Proposal.from_bins(torch.linspace(0, 1, 5), torch.tensor([4.0, 1.0, 0.5, 0.25]), "uniform", mix=0.1)
    rule = DrawRule(seed=1, scheme="stratified-is", k=3, density="uniform", proposal=q)
    ck = str(tiny_model_dir / "transformer")
    fz = load_featurizer(
        str(tiny_model_dir), [None, ck], rule, "loss", "cpu", "float32",
        new_projector=lambda t: build_projector("kron", t, kron_dims=(2, 2)), objective=objective_spec(objective),
    )  # fmt: skip
    cid, z, emb = clips[0]
    motion = torch.rand(z.shape[1:], generator=torch.Generator().manual_seed(0)) * 3  # (T, h, w) px/frame
    feat, _, ((sigma, w),) = fz.features([(cid, z, emb, motion)])
    assert not torch.allclose(w, torch.ones_like(w))  # the weights are really exercised
    fz.draws_per_backward = 1
    reordered, _, _ = fz.features([(cid, z, emb, motion)])
    fz.draws_per_backward = None
    parts, sig = fz.draw_parts(cid, z, emb, motion)
    assert parts.shape == (rule.k, fz.dim) and torch.equal(sig, sigma)
    widest = max(m.out_features * (m.in_features + 1) for t in fz.transformers for m in t.modules()
                 if isinstance(m, nn.Linear))  # fmt: skip
    n = max(widest, rule.k * 512)  # the K/V layers contract over the padded context's 512 tokens
    c_eps = 8.0 * torch.finfo(torch.float32).eps * math.sqrt(n)
    unweighted = parts.double() / w.double()[:, None]  # the control: w_k dropped
    start, worst, control = 0, 0.0, 0.0
    for proj in fz.projectors:
        for _, k_out, k_in in proj.layer_dims:
            sl = slice(start, start + k_out * k_in)
            b = feat[0, sl].double()
            tol = max(c_eps * float(parts[:, sl].double().norm(dim=1).sum()),
                      10 * float((reordered[0, sl].double() - b).norm()))  # fmt: skip
            worst = max(worst, float((parts[:, sl].double().sum(0) - b).norm()) / tol)
            control = max(control, float((unweighted[:, sl].sum(0) - b).norm()) / tol)
            start = sl.stop
    assert worst <= 1.0 and control > 1.0, (worst, control)
    if objective == "motion":  # the weights reach the gradient: the uniform feature differs
        fz.objective = objective_spec("uniform")
        plain, _, _ = fz.features([(cid, z, emb)])
        assert float((plain - feat).norm() / feat.norm()) > 1e-2


# -- objectives ------------------------------------------------------------------------------------
def test_an_unknown_objective_weights_no_token() -> None:
    """No fallback: an objective kind other than uniform and motion is not read as motion."""
    assert token_weights({"kind": "uniform"}, 0, None) is None
    with pytest.raises(ValueError, match=r"unknown objective 'saliency'; expected one of uniform, motion"):
        token_weights({"kind": "saliency"}, 0, torch.ones(3, 4, 4))
