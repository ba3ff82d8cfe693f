"""Encode a clip exactly like a training clip: the one path of `encode`, `score` and `plan`.

The method's central invariant is that a query is turned into latents the way the training clips
were: the same frame policy, VAE (tiled or not), text encoder, motion map, finite check and storage
rounding. `ClipEncoder` holds those choices (a run's `EncodeFacts`) and is the only place that applies
them; the encode stage writes its output to latent rows, `score` featurizes it, `plan` times it.

    enc = ClipEncoder.load("models/tiny-wan", facts, device="cpu")   # or ClipEncoder(wan, facts)
    clip = enc.decode("clip.mp4")             # DecodedClip; raises ClipFailure (data.video's kinds)
    out = enc.encode_clip(clip)               # EncodedClip | EncodeFailure (a VAE batch of one)
    outs = enc.encode_frames(clips)           # the same per clip, in one VAE batch (the encode stage)
    [emb] = enc.embed(["a red square"])       # (L, D) numpy in facts.latent_dtype
    out = enc.encode(clip, "a red square")    # encode_clip + embed: EncodedClip with text_emb filled

A VAE batch of B > 1 clips gives latents that differ from B batches of one in the last float32 bits
(the convolutions sum in another order); the text encoder pads every caption to 512 tokens, so its
batches do not matter.

Shapes and units of an `EncodedClip` (the stored forms, `data.latents.latent_schema`):
- latent: (C, T, h, w) numpy in `facts.latent_dtype` (float32 or float16): the VAE posterior mode
  normalised by the VAE's own statistics, (z − latents_mean) / latents_std (`models.wan.encode_video`);
  C = 16, T = 1 + (F − 1)/4, h = H/8, w = W/8 for Wan2.1;
- text_emb: (L, D) numpy in `facts.latent_dtype`: UMT5's last hidden state for the caption, trimmed to
  its L real tokens (`models.wan.encode_prompts`);
- motion: (T, h, w) float16 mean |optical flow| in pixels per frame on the latent grid
  (`data.motion.stored_map`), only when the encoder computes motion maps, else None.
`latent_tensor()` / `text_tensor()` / `motion_tensor()` give them as float32 torch tensors, exactly as
`data.latents.row_to_clip` reads a stored row back (same rounding, same bits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from carv_attrib.models.identity import ENCODER_COMPONENTS
from carv_attrib.models.wan import WanModel, encode_prompts, encode_video, load_wan, prompt_token_lengths
from carv_attrib.store.run import EncodeFacts
from carv_attrib.video.decode import DecodedClip, FramePolicy, decode_clip, frames_to_tensor
from carv_attrib.video.motion import decode_with_motion, stored_map

__all__ = ["ClipEncoder", "EncodedClip", "EncodeFailure", "NON_FINITE"]

NON_FINITE = "VAE produced non-finite latents"


@dataclass(frozen=True)
class EncodedClip:
    """One clip in its stored form (shapes and dtypes in the module docstring)."""

    latent: np.ndarray  # (C, T, h, w) latent_dtype, normalised
    motion: np.ndarray | None = None  # (T, h, w) float16 px/frame; None without motion maps
    text_emb: np.ndarray | None = None  # (L, D) latent_dtype; None until the caption is embedded

    def latent_tensor(self) -> torch.Tensor:
        """float32 (C, T, h, w), as a stored row reads back."""
        return torch.from_numpy(self.latent.astype(np.float32))

    def text_tensor(self) -> torch.Tensor:
        """float32 (L, D), as a stored row reads back."""
        if self.text_emb is None:
            raise ValueError("the clip's caption is not embedded yet")
        return torch.from_numpy(self.text_emb.astype(np.float32))

    def motion_tensor(self) -> torch.Tensor | None:
        """float32 (T, h, w), as a stored row reads back; None without a motion map."""
        return None if self.motion is None else torch.from_numpy(self.motion.astype(np.float32))


@dataclass(frozen=True)
class EncodeFailure:
    """A decoded clip the VAE could not encode (status `encode_error`): `message` is NON_FINITE or
    the exception's message, `exception` the exception's type name when the encode raised."""

    message: str
    exception: str | None = None
    kind: str = "encode_error"

    @property
    def detail(self) -> str:
        """ "TypeName: message" when the encode raised, else the message (a latent row's `error`)."""
        return f"{self.exception}: {self.message}" if self.exception else self.message


class ClipEncoder:
    """Decode → (motion map) → VAE latents → finite check → stored dtypes, and caption → text
    embedding, all as a run's `EncodeFacts` say.

    `facts`: the run's frame policy, `latent_dtype` (the storage dtype of latents and text
    embeddings), `vae_tiling` (tiling is switched on here, on `wan.vae`) and `motion_masks` (the flow
    rule, or None). `motion`: compute motion maps (default: when the facts record them; `score` asks
    for them only when its index's objective uses them). `wan` needs the VAE, text encoder and
    tokenizer, loaded in `facts.dtype`.
    """

    def __init__(self, wan: WanModel, facts: EncodeFacts, motion: bool | None = None):
        self.wan, self.facts = wan, facts
        self.motion = facts.motion_masks is not None if motion is None else motion
        self.dtype = np.dtype(facts.latent_dtype)
        if facts.vae_tiling:  # diffusers' tiled encode: its latents differ slightly, so it is a fact
            wan.vae.enable_tiling()

    @classmethod
    def load(
        cls, model: str, facts: EncodeFacts, device: str = "cpu", motion: bool | None = None
    ) -> ClipEncoder:
        """Load MODEL's encoder components in `facts.dtype` on `device`, and wrap them."""
        return cls(load_wan(model, ENCODER_COMPONENTS, device=device, dtype=facts.dtype), facts, motion)

    @property
    def policy(self) -> FramePolicy:
        return self.facts.policy

    @property
    def decode_fn(self) -> Callable[[str, FramePolicy], DecodedClip]:
        """The module-level decode function (`DecodePool(decode_fn=...)` pickles it to its workers):
        `decode_with_motion` when motion maps are computed (the flow is decoded beside the frames)."""
        return decode_with_motion if self.motion else decode_clip

    def decode(self, path: str) -> DecodedClip:
        """The clip's frames under the facts' frame policy; raises ClipFailure."""
        return self.decode_fn(path, self.policy)

    def encode_frames(self, clips: Sequence[DecodedClip]) -> list[EncodedClip | EncodeFailure]:
        """VAE-encode decoded clips in one batch (B, 3, F, H, W); if the batch raises, clip by clip
        (`encode_clip`), so that one bad clip does not take its neighbours down."""
        try:
            x = torch.stack([frames_to_tensor(c.frames) for c in clips])  # (B, 3, F, H, W)
            z = encode_video(self.wan.vae, x)  # (B, C, T, h, w) float32
            return [self._stored(zi, c) for zi, c in zip(z, clips)]
        except Exception:
            return [self.encode_clip(c) for c in clips]

    def encode_clip(self, clip: DecodedClip) -> EncodedClip | EncodeFailure:
        """One decoded clip through the VAE (a batch of one) to its stored form; text_emb stays None."""
        try:
            return self._stored(encode_video(self.wan.vae, frames_to_tensor(clip.frames)[None])[0], clip)
        except Exception as exc:
            return EncodeFailure(str(exc), type(exc).__name__)

    def embed(self, captions: Sequence[str]) -> list[np.ndarray]:
        """(L_i, D) text embeddings in the storage dtype, in one `encode_prompts` call."""
        return [emb.numpy().astype(self.dtype) for emb in encode_prompts(self.wan, list(captions))]

    def token_lengths(self, captions: Sequence[str]) -> list[int]:
        """Each caption's UMT5 token count before truncation (`prompt_token_lengths`); > 512 means
        `embed` saw only its first 512 tokens, as WanPipeline would."""
        return prompt_token_lengths(self.wan.tokenizer, list(captions))

    def encode(self, clip: DecodedClip, caption: str) -> EncodedClip | EncodeFailure:
        """`encode_clip`, then, if it encoded, its caption (`embed`)."""
        out = self.encode_clip(clip)
        if isinstance(out, EncodeFailure):
            return out
        (emb,) = self.embed([caption])
        return replace(out, text_emb=emb)

    def _stored(self, z: torch.Tensor, clip: DecodedClip) -> EncodedClip | EncodeFailure:
        """(C, T, h, w) float32 latent → its stored form, the finite check on the stored numbers, and
        the motion map on its grid (ValueError when the two grids differ)."""
        with np.errstate(over="ignore"):  # an overflow is the failure below, not a warning
            arr = z.numpy().astype(self.dtype)
        if not np.isfinite(arr).all():  # non-finite in float32, or beyond the storage dtype's range
            return EncodeFailure(NON_FINITE)
        if not self.motion:
            return EncodedClip(arr)
        if clip.motion is None:
            raise ValueError("the clip was decoded without its motion (decode with `decode_fn`)")
        m = stored_map(clip.motion, arr.shape[1])  # (T, h, w)
        if m.shape != arr.shape[1:]:
            raise ValueError(f"motion map {m.shape} does not match the latent grid {arr.shape[1:]}")
        return EncodedClip(arr, m)
