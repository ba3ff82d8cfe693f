"""Load Wan2.1 components, fingerprint them, encode videos and prompts.

MODEL is a local diffusers directory (the layout of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) or a Hub id;
both go through `from_pretrained(MODEL, subfolder=...)`, so a tiny model built by
`carv-attrib make-model` is loaded exactly like the real one.

    wan = load_wan("models/tiny-wan", components=("vae", "text_encoder", "tokenizer"))
    z = encode_video(wan.vae, frames)            # (B, 3, F, H, W) in [-1, 1] -> (B, 16, T, h, w)
    embs = encode_prompts(wan, ["a red square"])  # list of (L_i, D), trimmed to the real tokens
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from carv_attrib.choices import DTYPES
from carv_attrib.errors import ModelLoadError, UsageError
from carv_attrib.memory import available_memory
from carv_attrib.models.identity import check_pipeline_dir, model_identity

log = logging.getLogger(__name__)

# WanPipeline.__call__ pads/truncates prompts to 512 tokens (its encode_prompt defaults to 226:
# always pass 512). The transformer's cross-attention has no mask, so the padded length is part of
# the model input and must match the pipeline's.
MAX_SEQUENCE_LENGTH = 512


def truncation_warning(count: int, what: str = "captions") -> str:
    """The per-run line for `count` texts longer than MAX_SEQUENCE_LENGTH UMT5 tokens."""
    are = "exceed" if count != 1 else "exceeds"
    return (
        f"{count} {what if count != 1 else what.rstrip('s')} {are} {MAX_SEQUENCE_LENGTH} UMT5 tokens and "
        f"{'were' if count != 1 else 'was'} truncated as WanPipeline truncates them: the words past "
        f"token {MAX_SEQUENCE_LENGTH} do not reach the model"
    )


COMPONENT_CLASSES = {
    "vae": ("diffusers", "AutoencoderKLWan"),
    "transformer": ("diffusers", "WanTransformer3DModel"),
    "text_encoder": ("transformers", "UMT5EncoderModel"),
    "tokenizer": ("transformers", "AutoTokenizer"),
}


@dataclass
class WanModel:
    """The loaded components (those not asked for stay None) and their identity."""

    source: str
    device: str
    dtype: str
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    transformer: Any = None
    identity: dict[str, Any] = field(default_factory=dict)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def resolve_device(device: str) -> str:
    """`auto` → cuda if available, else mps, else cpu. Explicit devices are checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: CUDA is not available on this machine; use --device cpu or auto"
        )
    return device


def _quiet_hf() -> None:
    # Loading bars from transformers/diffusers would interleave with our own progress on stderr.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover - logging tweaks are best effort
        pass


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine fails at once instead of after the
    hub client's retries (about 25 s per file)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_one(source: str, name: str, dtype: Any) -> Any:
    lib, cls_name = COMPONENT_CLASSES[name]
    import diffusers  # imported here, not at module level: commands that never load a model stay light
    import transformers

    cls = getattr(diffusers if lib == "diffusers" else transformers, cls_name)
    kwargs: dict[str, Any] = {"subfolder": name}
    if name != "tokenizer":
        kwargs["dtype"] = dtype
    if not Path(source).exists():
        kwargs["local_files_only"] = not _hub_reachable()
    try:
        return cls.from_pretrained(source, **kwargs)
    except Exception as exc:  # OSError, HF hub errors, JSON errors: all mean "cannot load"
        where = (
            f"local directory {source}"
            if Path(source).exists()
            else f"'{source}' (not a local directory; treated as a Hugging Face Hub id)"
        )
        hint = (
            "check that it holds a diffusers Wan2.1 pipeline (model_index.json, vae/, text_encoder/, "
            "tokenizer/, transformer/)"
            if Path(source).exists()
            else f"{'it is not in the local Hugging Face cache and the Hub cannot be reached' if kwargs.get('local_files_only') else 'the Hub has no such model'}; pass a local directory "
            "(e.g. one made by `carv-attrib make-model DIR`) or pre-download it into the HF cache"
        )
        raise ModelLoadError(
            f"cannot load {name} from {where}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; {hint}"
        ) from exc


def load_wan(
    source: str,
    components: Sequence[str] = ("vae", "text_encoder", "tokenizer"),
    device: str = "cpu",
    dtype: str = "float32",
) -> WanModel:
    """Load the named components of a Wan2.1 diffusers pipeline, in eval mode, on `device`.
    ModelLoadError (exit 2) for a folder that is not one (`check_pipeline_dir`) or does not load."""
    check_pipeline_dir(str(source))
    _quiet_hf()
    tdtype = torch_dtype(dtype)
    device = resolve_device(device)
    wan = WanModel(source=str(source), device=device, dtype=dtype)
    for name in components:
        module = _load_one(str(source), name, tdtype)
        if name != "tokenizer":
            module = module.to(device).eval()
        setattr(wan, name, module)
    wan.identity = model_identity(str(source), components)
    return wan


# ---------------------------------------------------------------------------------------------
# Encoding


def latent_stats(vae: Any) -> tuple[Any, Any]:
    """(mean, std) as (1, C, 1, 1, 1) tensors from the VAE's own config (never hard-coded)."""
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1)
    return mean, std


def encode_video(vae: Any, frames: Any) -> Any:
    """frames (B, 3, F, H, W) in [-1, 1] → normalised latents (B, C, T, H/8, W/8), float32.

    latent = (latent_dist.mode() − latents_mean) / latents_std, as WanVideoToVideoPipeline and the
    original Wan repo do (the posterior mode: no sampling, so the encode is deterministic and the
    between-encode variance σ_b² is 0).
    """
    mean, std = latent_stats(vae)
    param = next(vae.parameters())
    with torch.inference_mode():
        x = frames.to(device=param.device, dtype=param.dtype)
        z = vae.encode(x).latent_dist.mode().float()  # (B, C, T, h, w)
    return ((z - mean.to(z.device)) / std.to(z.device)).cpu()


# Peak activation memory of an untiled Wan2.1 VAE encode per clip in the batch, float32: the encoder
# runs causally over 4-frame chunks, so it grows with the frame area, not the frame count. Fitted to
# peak RSS above the loaded VAE (0.92 GB) on CPU, `bench/real_shapes.py --worker --case vae --mode
# untiled --clip F x H x W`: 0.26 GB at 5x64x64; 0.52, 0.42, 0.50 GB at 5, 9, 17 x 128x128. So about
# 0.2 GB + 20 KB per pixel, i.e. ~8 GB per 480x832 clip (an estimate: two frame sizes, one machine).
VAE_BYTES_FIXED = 0.2e9
VAE_BYTES_PER_PIXEL = 20e3


def vae_encode_bytes(height: int, width: int, batch: int, dtype: str = "float32") -> float:
    """Estimated peak activation bytes of an untiled VAE encode of `batch` clips of height x width."""
    scale = 0.5 if dtype in ("bfloat16", "float16") else 1.0
    return batch * scale * (VAE_BYTES_FIXED + VAE_BYTES_PER_PIXEL * height * width)


def device_free_bytes(device: str) -> float | None:
    """Free memory of `device` now (CUDA: mem_get_info; CPU: Linux MemAvailable), None if unknown."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    if device == "cpu":
        free = available_memory()
        return None if free is None else float(free)
    return None


def vae_tiling_decision(mode: str, height: int, width: int, batch: int, dtype: str, device: str) -> bool:
    """Whether to tile the VAE encode: `on` / `off` as given; `auto` when the untiled estimate
    (`vae_encode_bytes`) exceeds 80 % of the device's free memory (diffusers' tiling encodes
    overlapping 256-pixel tiles and blends them: the latents differ slightly, so the choice is part of
    a run's configuration)."""
    if mode != "auto":
        return mode == "on"
    free = device_free_bytes(resolve_device(device))
    return free is not None and vae_encode_bytes(height, width, batch, dtype) > 0.8 * free


def encode_prompts(wan: WanModel, prompts: Sequence[str], batch_size: int = 16) -> list[Any]:
    """Prompt embeddings exactly as `WanPipeline.encode_prompt(..., max_sequence_length=512)`,
    trimmed to each prompt's real tokens: a list of (L_i, D) float32 CPU tensors.

    Steps of `WanPipeline._get_t5_prompt_embeds`: prompt_clean (ftfy if installed, html unescape,
    whitespace collapse) → tokenize padded to 512 with mask → UMT5 → keep the first seq_len rows.
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    out: list[Any] = []
    param = next(wan.text_encoder.parameters())
    for start in range(0, len(prompts), batch_size):
        chunk = [prompt_clean(p) for p in prompts[start : start + batch_size]]
        toks = wan.tokenizer(
            chunk,
            padding="max_length",
            max_length=MAX_SEQUENCE_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        seq_lens = toks.attention_mask.gt(0).sum(dim=1).tolist()
        with torch.inference_mode():
            hidden = wan.text_encoder(
                toks.input_ids.to(param.device), toks.attention_mask.to(param.device)
            ).last_hidden_state  # (b, 512, D)
        out.extend(hidden[i, :n].float().cpu().clone() for i, n in enumerate(seq_lens))
    return out


def prompt_token_lengths(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    """Each prompt's UMT5 token count *before* truncation (after `prompt_clean`, with the closing </s>,
    as `encode_prompts` tokenizes it): past MAX_SEQUENCE_LENGTH the model sees only the first 512
    (`encode_prompts` truncates, as WanPipeline does), so the caller can say so."""
    if not prompts:
        return []
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    ids = tokenizer(
        [prompt_clean(p) for p in prompts], add_special_tokens=True, truncation=False, verbose=False
    )["input_ids"]
    return [len(x) for x in ids]


def pad_context(emb: Any, length: int = MAX_SEQUENCE_LENGTH) -> Any:
    """(L, D) trimmed embedding → (1, 512, D) zero-padded, as the pipeline feeds the transformer."""
    out = torch.zeros(1, length, emb.shape[-1], dtype=emb.dtype, device=emb.device)
    out[0, : emb.shape[0]] = emb
    return out


# ---------------------------------------------------------------------------------------------
# Transformer checkpoints (TRAK ensembles / TracIn sums over training checkpoints)


def load_transformer(
    source: str, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> Any:
    """The WanTransformer3DModel of MODEL, or of a checkpoint.

    A checkpoint is a diffusers transformer directory (config.json + weights), a pipeline directory
    (with transformer/), or a .safetensors file of transformer weights loaded into MODEL's config.
    """
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    _quiet_hf()
    tdtype = torch_dtype(dtype)
    if checkpoint is None:
        module = _load_one(str(source), "transformer", tdtype)
    else:
        ck = Path(checkpoint)
        if not ck.exists():
            raise UsageError(f"--checkpoint {checkpoint}: no such file or directory")
        try:
            if ck.is_dir() and (ck / "config.json").exists():
                module = WanTransformer3DModel.from_pretrained(str(ck), dtype=tdtype)
            elif ck.is_dir() and (ck / "transformer").is_dir():
                module = WanTransformer3DModel.from_pretrained(str(ck), subfolder="transformer", dtype=tdtype)
            elif ck.suffix == ".safetensors":
                module = _load_one(str(source), "transformer", tdtype)
                missing, unexpected = module.load_state_dict(load_file(str(ck)), strict=False)
                if missing or unexpected:
                    raise UsageError(
                        f"--checkpoint {checkpoint}: weights do not fit {source}'s transformer "
                        f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[:3]})"
                    )
            else:
                raise UsageError(
                    f"--checkpoint {checkpoint}: expected a transformer directory (config.json), a pipeline "
                    "directory (transformer/) or a .safetensors file"
                )
        except UsageError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from exc
    return module.to(resolve_device(device)).eval()
