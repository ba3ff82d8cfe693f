"""Build a tiny Wan2.1 text-to-video pipeline from the real diffusers/transformers classes.

The result is saved in the layout of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` and is loaded back through
the same loader as a real model (`carv_attrib.models.wan`), so the demo and the tests exercise the
real code paths offline. Recipe: ../shared/research/wan-diffusers.md §6.

    from carv_attrib.models.tiny import build_pipeline
    pipe = build_pipeline("tiny", seed=0)
    pipe.save_pretrained("models/tiny-wan")

Sizes:
- `tiny`:  transformer 2 layers, dim 24 (2 heads x 12), ffn 32, text_dim 32 (~28 k params); for tests.
- `small`: transformer 4 layers, dim 256 (4 heads x 64), ffn 1024, text_dim 64 (~4.9 M params);
           for benchmarks.
Both use a small `AutoencoderKLWan` (base_dim 8) that keeps Wan's 4x temporal / 8x spatial
compression, its 16 latent channels and its published latents_mean/std, and a 2-layer UMT5 encoder.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from carv_attrib.models.wan import _quiet_hf

# Words of the demo captions get whole-word pieces so that captions tokenize into a few tokens,
# like a real sentencepiece vocabulary would; anything else falls back to characters.
DEMO_WORDS = (
    "a an the of over on in and with moving left right up down circle square triangle ring bar "
    "red green blue yellow purple orange white black grey gray background small large big fast slow "
    "bouncing rotating growing shrinking diagonally across video clip shape"
).split()


@dataclass(frozen=True)
class TinySize:
    heads: int
    head_dim: int
    ffn_dim: int
    layers: int
    text_dim: int
    text_layers: int
    text_heads: int
    text_ff: int
    vae_base_dim: int


SIZES: dict[str, TinySize] = {
    "tiny": TinySize(2, 12, 32, 2, 32, 2, 4, 64, 8),
    "small": TinySize(4, 64, 1024, 4, 64, 2, 4, 128, 8),
    # ~20 M transformer parameters: the second point of the featurize benchmark.
    "medium": TinySize(6, 64, 1536, 8, 64, 2, 4, 128, 8),
}


def build_tokenizer() -> Any:
    """A T5 (Unigram) tokenizer from an in-memory vocabulary: ids 0,1,2 = <pad>, </s>, <unk>."""

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {piece for piece, _ in vocab}

    def add(piece: str, score: float) -> None:
        # A duplicate piece would silently remap ids on load, so each piece goes in once.
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for word in DEMO_WORDS:
        add("\u2581" + word, -1.0)
    for c in string.ascii_letters + string.digits + string.punctuation:
        add("\u2581" + c, -6.0)
        add(c, -5.0)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_transformer(size: str = "tiny", seed: int = 0) -> Any:
    """The `WanTransformer3DModel` of a size, with weights fixed by `seed` (eval mode)."""

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=s.heads,
            attention_head_dim=s.head_dim,
            in_channels=16,
            out_channels=16,
            text_dim=s.text_dim,
            freq_dim=256,
            ffn_dim=s.ffn_dim,
            num_layers=s.layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=128,
        ).eval()


def build_pipeline(size: str = "tiny", seed: int = 0) -> Any:
    """Assemble a `WanPipeline` of the given size with deterministic random weights."""

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    tokenizer = build_tokenizer()
    # torch seeds its default generator randomly per process, so every component is built under
    # an explicit seed: the same (size, seed) gives bit-identical weights on every machine.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=s.text_dim,
                d_kv=s.text_dim // s.text_heads,
                d_ff=s.text_ff,
                num_layers=s.text_layers,
                num_heads=s.text_heads,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                tie_word_embeddings=False,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        ).eval()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(
            base_dim=s.vae_base_dim,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],  # length 4: the VAE's 4-frame chunking is hard-coded
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()
    transformer = build_transformer(size, seed + 2)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


def make_model(out_dir: str, size: str = "tiny", seed: int = 0) -> dict[str, int]:
    """Build and save a pipeline; returns parameter counts per component."""

    _quiet_hf()
    pipe = build_pipeline(size, seed)
    pipe.save_pretrained(out_dir)
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("text_encoder", "vae", "transformer")
    }
