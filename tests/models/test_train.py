"""models/train.py: the shared-forward minibatch loss is `clip_objective`'s, TrainConfig.out is required
(the default no longer writes into MODEL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carv_attrib.carv.objective import clip_objective
from carv_attrib.carv.timesteps import density
from carv_attrib.models.train import TrainConfig, draw_minibatch, minibatch_backward, train_transformer
from carv_attrib.models.wan import load_transformer, pad_context
from carv_attrib.store.latents import iter_cached


def _grads(tr: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in tr.parameters() if p.grad is not None]


@pytest.mark.parametrize("clips_per_forward", [2, 8])
def test_shared_forwards_give_clip_objectives_loss_and_gradient(
    encoded_run: Path, tiny_model_dir: Path, clips_per_forward: int
) -> None:
    clips = list(iter_cached(encoded_run))
    contexts = [pad_context(c.text_emb) for c in clips]
    batch = draw_minibatch(clips, 5, 2, density("uniform"), torch.Generator().manual_seed(3))
    tr = load_transformer(str(tiny_model_dir))
    tr.requires_grad_(True)
    loss = minibatch_backward(tr, clips, contexts, batch, clips_per_forward)
    got = _grads(tr)
    tr.zero_grad(set_to_none=True)
    want = sum(
        clip_objective(tr, clips[i].latent, contexts[i], s, e, torch.ones(2))[0] / len(batch)
        for i, s, e in batch
    )
    want.backward()  # type: ignore[union-attr]
    assert loss == pytest.approx(float(want.detach()), rel=1e-5)  # type: ignore[union-attr]
    for g, w in zip(got, _grads(tr)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_train_transformer_needs_an_out(encoded_run: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="TrainConfig.out"):
        train_transformer(TrainConfig(run=encoded_run, model=str(tiny_model_dir), steps=1))
