"""Transformer(s) + draw rule + projector → one projected-gradient feature per cached clip.

The part of featurize that `score` and `plan` reuse, so that a query gets exactly the training
clips' treatment: the same transformer weights, the same (σ, w, ε) draws (common random numbers
under shared noise, `carv_attrib.carv.draws.DrawRule`), the same projection matrices.

    rule = build_draw_rule(seed=0, scheme="stratified-is", k=8, density="uniform")
    fz = load_featurizer("models/tiny-wan", [None], rule, "loss", "cpu", "float32",
                         new_projector=lambda t: build_projector("kron", t))
    feats, losses, draws = fz.features([(clip_id, latent, text_emb), ...])   # (B, D), (B, n_ckpt·K)

Knows no files beyond model loading: featurize writes the rows (`carv_attrib.store.features`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from carv_attrib.attrib.gradients import ClipDraws, per_draw_features
from carv_attrib.attrib.projection import (
    LORA_PATTERNS,
    PROJECTOR_CLASSES,
    DenseProjector,
    KronProjector,
    Projector,
    projector_from_spec,
    select_linear_layers,
)
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.nested import level_draws
from carv_attrib.carv.timesteps import Proposal
from carv_attrib.carv.weights import Objective
from carv_attrib.choices import OBJECTIVES, PROJECTORS  # noqa: F401  (PROJECTORS: the kinds build_projector takes)
from carv_attrib.errors import UsageError
from carv_attrib.models.wan import load_transformer, pad_context, resolve_device

# One clip for `Featurizer.features`: (clip_id, latent (C, T, h, w), trimmed text embedding (L, D)),
# and, for the motion objective, its motion map (T, h, w) (`carv_attrib.video.motion`).
ClipInput = (
    tuple[int, torch.Tensor, torch.Tensor] | tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]
)


def token_weights(
    objective: Objective | dict[str, Any], clip_id: int, motion: torch.Tensor | None
) -> torch.Tensor | None:
    """The per-token loss weights (T, h, w) float32 of a clip under `objective` (an `Objective` or its
    recorded spec; None: uniform). ValueError for an unknown kind; UsageError when the motion
    objective meets a clip without a motion map."""
    obj = Objective.from_spec(objective)
    if obj.kind != "uniform" and motion is None:
        raise UsageError(
            f"clip {clip_id} has no motion map: --objective motion needs latents encoded with --motion-masks"
        )
    w = obj.weights(None if motion is None else motion.numpy())
    return None if w is None else torch.from_numpy(w)


def build_draw_rule(
    *,
    seed: int,
    scheme: str,
    k: int,
    density: str,
    proposal: Proposal | None = None,
    noise: str = "shared",
    antithetic: bool = False,
) -> DrawRule:
    """A DrawRule, its ValueErrors (unknown scheme, a proposal for another density, ...) as
    UsageError (exit 2)."""
    try:
        return DrawRule(
            seed=seed,
            scheme=scheme,
            k=k,
            density=density,
            proposal=proposal,
            noise=noise,
            antithetic=antithetic,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def build_projector(
    kind: str,
    transformer: nn.Module,
    layers: Sequence[str] = ("blocks.*",),
    seed: int = 0,
    proj_dim: int | None = None,
    matrix: str = "gaussian",
    kron_dims: tuple[int, int] | None = None,
    lora: bool = False,
) -> KronProjector | DenseProjector:
    """A new projector over the Linear layers of `transformer` matching `layers` (globs), or with
    `lora` over its adapter's lora_A / lora_B Linears (`models.lora.lora_layers`; `layers` unused).

    kron: (k_out, k_in) = `kron_dims` per layer (default DEFAULT_K_OUT×DEFAULT_K_IN = 16×16), or a total `proj_dim` split over
    layers (`shapes_for_total_dim`); with `lora`, the adapter's exact gradient when small, else its
    rank sides exact and wide sides projected (`projection.lora_projection`); dense: one (p, proj_dim)
    JL matrix (default 1280).
    """
    cls = PROJECTOR_CLASSES.get(kind)
    if cls is None:
        raise UsageError(f"--projector {kind}: choose {' or '.join(PROJECTOR_CLASSES)}")
    if lora:
        from carv_attrib.models.lora import lora_layers

        selected = lora_layers(transformer)
        if not selected:
            raise UsageError("--lora: the transformer carries no LoRA adapter (no lora_A / lora_B Linear)")
        layers = LORA_PATTERNS
    try:
        if not lora:
            selected = select_linear_layers(transformer, list(layers))
        return cls.build(
            transformer,
            selected,
            patterns=layers,
            seed=seed,
            matrix=matrix,
            proj_dim=proj_dim,
            kron_dims=kron_dims,
            lora=lora,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


@dataclass
class Featurizer:
    """Loaded transformers (one per checkpoint), their projectors, and the draw rule."""

    transformers: list[nn.Module]
    projectors: list[Projector]
    rule: DrawRule
    output_fn: str
    device: str
    draws_per_backward: int | None = None  # None: one backward over all B×K draws (`kron_features`)
    objective: Objective | dict[str, Any] = field(default_factory=Objective)  # or its recorded spec
    _eps_cache: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.projectors)

    @property
    def blocks(self) -> list[int]:
        """Feature dims per checkpoint block (their sum is `dim`)."""
        return [p.dim for p in self.projectors]

    def use_rule(self, rule: DrawRule) -> None:
        """Switch to another draw rule (replicates, other schemes) and forget cached draws."""
        self.rule = rule
        self._eps_cache = {}

    def draws(self, clip_id: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(σ (K,), w (K,), ε (K, *shape)) of a clip; the shared stream is computed once per latent shape."""
        stream = self.rule.stream_for(clip_id)
        key = (stream, shape)
        if key not in self._eps_cache:
            if self.rule.noise != "shared":
                return self.rule.draws_for(stream, shape, device=self.device)
            self._eps_cache = {key: self.rule.draws_for(stream, shape, device=self.device)}
        return self._eps_cache[key]

    def features(
        self, clips: Sequence[ClipInput]
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """clips [(clip_id, latent (C,T,h,w), text (L,D)[, motion (T,h,w)])] → (features (B, D) float32
        CPU, per-draw losses (B, n_ckpt·K), [(σ, w)] per clip). One feature block per checkpoint,
        concatenated. Under the motion objective each clip needs its motion map."""
        batch, draws = [], []
        for clip_id, z, emb, *rest in clips:
            sigma, w, eps = self.draws(clip_id, tuple(z.shape))
            draws.append((sigma, w))
            tw = token_weights(self.objective, clip_id, rest[0] if rest else None)
            ctx = pad_context(emb).to(self.device)
            batch.append(
                ClipDraws(z.to(self.device), ctx, sigma, w, eps, None if tw is None else tw.to(self.device))
            )
        feats, losses = [], []
        for transformer, proj in zip(self.transformers, self.projectors):
            f, ell = proj.batch_features(transformer, batch, self.output_fn, self.draws_per_backward)
            feats.append(f)
            losses.append(ell)
        return torch.cat(feats, dim=1), torch.cat(losses, dim=1), draws

    def draw_parts(
        self, clip_id: int, latent: torch.Tensor, text_emb: torch.Tensor, motion: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(parts (K, D) float32 CPU, σ (K,) float64): part k = w_k φ_k / K, draw k's weighted share
        of the clip's feature (one block per checkpoint, like `features`), so Σ_k parts = φ up to
        float32 summation order. Kron projectors only (`per_draw_features`); costs one K-draw
        forward and backward per checkpoint, like featurizing the clip."""
        sigma, w, eps = self.draws(clip_id, tuple(latent.shape))
        return self.parts_for(clip_id, latent, text_emb, motion, sigma, w, eps), sigma

    def level_parts(
        self,
        clip_id: int,
        latent: torch.Tensor,
        text_emb: torch.Tensor,
        motion: torch.Tensor | None,
        level: int,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """(parts (m, D) float32 CPU, u (m,) float64) of the m draws level ℓ of the rule's nested
        strata adds (`carv.nested`; level 0: the rule's own K): part d = w_d φ_d / m, as `draw_parts`.
        ValueError for an antithetic rule."""
        sigma, w, eps, u = level_draws(
            self.rule, self.rule.stream_for(clip_id), level, tuple(latent.shape), device=self.device
        )
        return self.parts_for(clip_id, latent, text_emb, motion, sigma, w, eps), u

    def parts_for(
        self,
        clip_id: int,
        latent: torch.Tensor,
        text_emb: torch.Tensor,
        motion: torch.Tensor | None,
        sigma: torch.Tensor,
        w: torch.Tensor,
        eps: torch.Tensor,
    ) -> torch.Tensor:
        """(m, D) float32 CPU w_d φ_d / m of explicit draws σ (m,), w (m,), ε (m, *latent.shape)."""
        ctx = pad_context(text_emb).to(self.device)  # (1, 512, D)
        tw = token_weights(self.objective, clip_id, motion)
        blocks = []
        for transformer, proj in zip(self.transformers, self.projectors):
            if not isinstance(proj, KronProjector):
                raise UsageError("per-draw parts need per-layer (kron) features")
            phi_k, _ = per_draw_features(
                transformer, proj, latent.to(self.device), ctx, sigma, eps.to(self.device), self.output_fn,
                None if tw is None else tw.to(self.device),
            )  # (m, D_j)  # fmt: skip
            blocks.append(phi_k.float().cpu() * (w.float() / sigma.shape[0])[:, None])
        return torch.cat(blocks, dim=1)


def load_featurizer(
    model: str,
    checkpoints: Sequence[str | None],
    rule: DrawRule,
    output_fn: str,
    device: str,
    dtype: str,
    *,
    projector_specs: Sequence[dict[str, Any]] | None = None,
    new_projector: Callable[[nn.Module], Projector] | None = None,
    objective: Objective | dict[str, Any] | None = None,
    lora: str | None = None,
) -> Featurizer:
    """Load one transformer per checkpoint (None: MODEL's own), with the LoRA adapter at `lora` on
    each when given (`models.lora.load_lora`), and give each a projector: rebuilt from recorded
    `projector_specs` (score), or made by `new_projector` (featurize, plan)."""
    if (projector_specs is None) == (new_projector is None):
        raise ValueError("pass exactly one of projector_specs and new_projector")
    device = resolve_device(device)
    transformers = [load_transformer(model, ck, device=device, dtype=dtype) for ck in checkpoints]
    if lora is not None:
        from carv_attrib.models.lora import load_lora

        for t in transformers:
            load_lora(t, lora)
    if projector_specs is not None:
        projectors: list[Projector] = [
            projector_from_spec(t, s) for t, s in zip(transformers, projector_specs)
        ]
    else:
        assert new_projector is not None
        projectors = [new_projector(t) for t in transformers]
    return Featurizer(
        transformers, projectors, rule, output_fn, device, objective=Objective.from_spec(objective)
    )
