"""Fixtures for tests/carv: a tiny Wan2.1 transformer (28k parameters) and single-threaded torch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tensors here are tiny: extra intra-op threads only add synchronisation, and on a busy 2-core
    machine they oversubscribe it (measured: one tiny forward+backward 0.02 s → 1.4 s). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_transformer() -> torch.nn.Module:
    """WanTransformer3DModel with the diffusers test config, seeded, fp32, eval mode."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return model.eval()
