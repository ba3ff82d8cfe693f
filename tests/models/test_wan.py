from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carv_attrib.errors import ModelLoadError
from carv_attrib.models.wan import (
    encode_prompts,
    encode_video,
    latent_stats,
    load_wan,
    pad_context,
)


@pytest.fixture(scope="module")
def wan(tiny_model_dir: Path):
    return load_wan(str(tiny_model_dir), ("vae", "text_encoder", "tokenizer", "transformer"), device="cpu")


def test_tiny_model_has_the_wan_layout(tiny_model_dir: Path) -> None:
    import json

    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    for sub in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
        assert (tiny_model_dir / sub).is_dir()


def test_loaded_through_the_real_classes(wan) -> None:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    assert isinstance(wan.vae, AutoencoderKLWan)
    assert isinstance(wan.transformer, WanTransformer3DModel)
    assert isinstance(wan.text_encoder, UMT5EncoderModel)
    assert not wan.vae.training and not wan.transformer.training


def test_latents_equal_direct_vae_mode_normalised(wan) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 9, 32, 48, generator=g) * 2 - 1
    z = encode_video(wan.vae, x)
    with torch.no_grad():
        raw = wan.vae.encode(x).latent_dist.mode()
    mean, std = latent_stats(wan.vae)
    # Statistics come from the VAE's own config, never a hard-coded table.
    assert mean.flatten().tolist() == pytest.approx(wan.vae.config.latents_mean)
    expected = (raw - mean) / std
    assert z.shape == (2, 16, 3, 4, 6)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)


def test_prompt_embeddings_equal_wan_pipeline(tiny_model_dir: Path, wan) -> None:
    from diffusers import WanPipeline

    prompts = ["a red square moving left over a grey background", "  Hello &amp;  world  ", "x"]
    ours = encode_prompts(wan, prompts)
    pipe = WanPipeline.from_pretrained(str(tiny_model_dir))
    ref, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu", dtype=torch.float32
    )
    assert ref.shape[1] == 512
    for i, emb in enumerate(ours):
        n = emb.shape[0]
        torch.testing.assert_close(emb, ref[i, :n], rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(ref[i, n:]) == 0, "rows past the real tokens are zero in the pipeline"
        torch.testing.assert_close(pad_context(emb)[0], ref[i])


def test_missing_model_directory_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"not a diffusers pipeline folder \(no model_index.json\)"):
        load_wan(str(tmp_path / "empty"), ("vae",))
    (tmp_path / "empty" / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(ModelLoadError, match=r"cannot load vae from local directory"):
        load_wan(str(tmp_path / "empty"), ("vae",))


def test_unreachable_hub_id_is_one_clear_error() -> None:
    with pytest.raises(ModelLoadError, match=r"Hub id.*not in the local Hugging Face cache"):
        load_wan("no-such-org/no-such-wan-model", ("vae",))


def _long_caption(words: int, tail: str) -> str:
    """`words` words of plain English, then `tail` (what a caption past 512 tokens says last)."""
    base = "a red square moves slowly over a grey field while the camera pans".split()
    return " ".join(base[i % len(base)] for i in range(words)) + " " + tail


def test_untruncated_lengths_are_measured_and_long_captions_are_cut_as_wan_pipeline(
    tiny_model_dir: Path, wan
) -> None:
    """Two 2,000-word captions differing after word 1,000 get one embedding (the model sees 512 tokens,
    as WanPipeline feeds it): that is kept, and `prompt_token_lengths` says how long they really are."""
    from diffusers import WanPipeline

    from carv_attrib.models.wan import MAX_SEQUENCE_LENGTH, prompt_token_lengths, truncation_warning

    a = _long_caption(2000, "and then it turns blue")
    b = _long_caption(2000, "and then a dog runs in")
    short = "a red square"
    lengths = prompt_token_lengths(wan.tokenizer, [a, b, short])
    assert lengths[0] > 2000 and lengths[1] > 2000  # ~1 token a word, plus </s>
    assert lengths[2] == len(wan.tokenizer(short)["input_ids"]) < MAX_SEQUENCE_LENGTH
    ea, eb, es = encode_prompts(wan, [a, b, short])
    assert ea.shape[0] == eb.shape[0] == MAX_SEQUENCE_LENGTH and es.shape[0] == lengths[2]
    assert torch.equal(ea, eb)  # what the model sees: the same first 512 tokens
    pipe = WanPipeline.from_pretrained(str(tiny_model_dir))
    ref, _ = pipe.encode_prompt([a], do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
    # truncated exactly as the pipeline does (batch 3 vs 1: float noise of ~1e-6 in a few entries)
    torch.testing.assert_close(ea, ref[0], rtol=1e-4, atol=1e-5)
    assert truncation_warning(2) == (
        "2 captions exceed 512 UMT5 tokens and were truncated as WanPipeline truncates them: "
        "the words past token 512 do not reach the model"
    )
    assert truncation_warning(1).startswith("1 caption exceeds 512 UMT5 tokens and was truncated")
    assert prompt_token_lengths(wan.tokenizer, []) == []
