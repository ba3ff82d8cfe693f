"""models/clip_encoder.py: the one "encode a clip like a training clip" path.

Unit tests on the tiny model (stored dtypes, motion maps, the finite check, failures, tiling), then
the invariant itself: a clip encoded by the encode stage and the same clip encoded as a query by
`score` are the same latents, text embedding and motion map, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from carv_attrib.models import clip_encoder as ce
from carv_attrib.models.clip_encoder import NON_FINITE, ClipEncoder, EncodedClip, EncodeFailure
from carv_attrib.models.wan import encode_prompts, encode_video, load_wan
from carv_attrib.store.latents import iter_cached
from carv_attrib.store.run import EncodeFacts, RunDir
from carv_attrib.video.decode import decode_clip, frames_to_tensor
from carv_attrib.video.motion import MOTION_DTYPE, MOTION_RULE, decode_with_motion, stored_map


def facts(**over: object) -> EncodeFacts:
    base = dict(
        frames=9, height=32, width=32, fps=8, pad_short=False, dtype="float32", latent_dtype="float32",
        model_fingerprint=None, components={},
    )  # fmt: skip
    return EncodeFacts(**(base | over))


@pytest.fixture(scope="module")
def wan(tiny_model_dir: Path):
    return load_wan(str(tiny_model_dir), ("vae", "text_encoder", "tokenizer"))


@pytest.fixture(scope="module")
def videos(demo_data: Path) -> list[str]:
    return [str(p) for p in sorted((demo_data / "videos").glob("*.mp4"))[:2]]


@pytest.mark.parametrize("latent_dtype", ["float32", "float16"])
def test_encode_gives_the_stored_forms(wan, videos: list[str], latent_dtype: str) -> None:
    enc = ClipEncoder(wan, facts(latent_dtype=latent_dtype))
    assert enc.decode_fn is decode_clip and not enc.motion
    clip = enc.decode(videos[0])
    out = enc.encode(clip, "a red square")
    assert isinstance(out, EncodedClip) and out.motion is None and out.motion_tensor() is None
    z = encode_video(wan.vae, frames_to_tensor(decode_clip(videos[0], enc.policy).frames)[None])[0]
    (emb,) = encode_prompts(wan, ["a red square"])
    assert out.latent.shape == (16, 3, 4, 4) and out.latent.dtype == np.dtype(latent_dtype)
    assert out.latent.tobytes() == z.numpy().astype(latent_dtype).tobytes()
    assert out.text_emb.dtype == np.dtype(latent_dtype) and out.text_emb.shape == tuple(emb.shape)
    assert out.text_emb.tobytes() == emb.numpy().astype(latent_dtype).tobytes()
    # the float32 tensors are the stored numbers widened, as a stored row reads back
    assert out.latent_tensor().dtype == out.text_tensor().dtype == torch.float32
    assert torch.equal(out.latent_tensor(), torch.from_numpy(out.latent.astype(np.float32)))
    bare = enc.encode_clip(clip)
    assert bare.text_emb is None and np.array_equal(bare.latent, out.latent)
    with pytest.raises(ValueError, match="not embedded"):
        bare.text_tensor()


def test_batch_matches_clips_one_by_one(wan, videos: list[str]) -> None:
    enc = ClipEncoder(wan, facts())
    clips = [enc.decode(v) for v in videos]
    batch = enc.encode_frames(clips)
    one = [enc.encode_clip(c) for c in clips]
    assert len(batch) == 2 and all(isinstance(o, EncodedClip) and o.text_emb is None for o in batch)
    for b, o in zip(batch, one):  # the same to float32 summation order
        np.testing.assert_allclose(b.latent, o.latent, rtol=1e-5, atol=1e-5)
    embs = enc.embed(["a", "a red square"])  # (L_i, D) each, trimmed to the real tokens
    assert all(e.dtype == np.float32 and e.shape[1] == embs[0].shape[1] for e in embs)
    assert embs[0].shape[0] < embs[1].shape[0]


def test_motion_maps_when_recorded(wan, videos: list[str]) -> None:
    enc = ClipEncoder(wan, facts(motion_masks=MOTION_RULE, latent_dtype="float16"))
    assert enc.motion and enc.decode_fn is decode_with_motion
    clip = enc.decode(videos[0])
    out = enc.encode_clip(clip)
    assert out.motion.dtype == MOTION_DTYPE and out.motion.shape == out.latent.shape[1:] == (3, 4, 4)
    assert out.motion.tobytes() == stored_map(clip.motion, 3).tobytes()
    assert torch.equal(out.motion_tensor(), torch.from_numpy(out.motion.astype(np.float32)))
    # score on a uniform index over the same latents: no flow computed
    assert not ClipEncoder(wan, facts(motion_masks=MOTION_RULE), motion=False).motion
    # a clip decoded without its flow, or a map on another grid, is an encode failure
    plain = decode_clip(videos[0], enc.policy)
    assert "without its motion" in enc.encode_clip(plain).detail
    clip.motion = clip.motion[:, :2]
    bad = enc.encode_frames([clip])[0]
    assert isinstance(bad, EncodeFailure) and bad.kind == "encode_error"
    assert bad.detail.startswith("ValueError: motion map") and bad.exception == "ValueError"


def test_finite_check_is_on_the_stored_numbers(wan, videos: list[str], monkeypatch) -> None:
    enc16 = ClipEncoder(wan, facts(latent_dtype="float16"))
    enc32 = ClipEncoder(wan, facts())
    clip = enc16.decode(videos[0])
    monkeypatch.setattr(ce, "encode_video", lambda vae, x: torch.full((x.shape[0], 16, 3, 4, 4), 1e6))
    over = enc16.encode_clip(clip)  # finite in float32, inf in float16
    assert isinstance(over, EncodeFailure) and over.detail == over.message == NON_FINITE
    assert isinstance(enc32.encode_clip(clip), EncodedClip)
    monkeypatch.setattr(ce, "encode_video", lambda vae, x: torch.full((x.shape[0], 16, 3, 4, 4), np.nan))
    assert [o.detail for o in enc32.encode_frames([clip, clip])] == [NON_FINITE, NON_FINITE]


def test_a_failing_batch_is_retried_clip_by_clip(wan, videos: list[str], monkeypatch) -> None:
    enc = ClipEncoder(wan, facts())
    clips = [enc.decode(v) for v in videos]
    real = ce.encode_video

    def flaky(vae, x):  # batches fail; the first clip alone fails too
        if x.shape[0] > 1 or torch.equal(x[0], frames_to_tensor(clips[0].frames)):
            raise RuntimeError("boom")
        return real(vae, x)

    monkeypatch.setattr(ce, "encode_video", flaky)
    first, second = enc.encode_frames(clips)
    assert isinstance(first, EncodeFailure) and first.detail == "RuntimeError: boom"
    assert isinstance(second, EncodedClip)
    assert isinstance(enc.encode(clips[0], "x"), EncodeFailure)


def test_tiling_follows_the_facts(tiny_model_dir: Path) -> None:
    enc = ClipEncoder.load(str(tiny_model_dir), facts(vae_tiling=True))
    assert enc.wan.vae.use_tiling
    assert not ClipEncoder.load(str(tiny_model_dir), facts()).wan.vae.use_tiling


def test_encode_stage_and_score_encode_a_clip_identically(
    tmp_path: Path, tiny_model_dir: Path, demo_data: Path
) -> None:
    """The training clip's stored latent, text embedding and motion map are bitwise the query's, for
    a float16 cache with motion maps. VAE batches of one on both sides (`batch_size=1`): a batch of B
    > 1 sums its convolutions in another order (last float32 bits, see `test_score`'s ulp test)."""
    from carv_attrib.pipeline.encode import EncodeConfig, run_encode
    from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
    from carv_attrib.pipeline.index import IndexConfig, build_run_index
    from carv_attrib.pipeline.score import Query, ScoreConfig, _encode_queries, query_encoder

    rows = json.loads((demo_data / "manifest.json").read_text())[:2]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    run = tmp_path / "run"
    run_encode(
        EncodeConfig(
            manifest=tmp_path / "m.json", videos=demo_data / "videos", model=str(tiny_model_dir), run=run,
            frames=9, size="32x32", fps=8, workers=0, device="cpu", batch_size=1, latent_dtype="float16",
            motion_masks=True,
        )
    )  # fmt: skip
    run_featurize(
        FeaturizeConfig(run=run, model=str(tiny_model_dir), draws=1, device="cpu", objective="motion")
    )
    build_run_index(IndexConfig(run=run, precondition="identity"))
    info = RunDir(run).index_info()
    videos = [demo_data / "videos" / f"{r['vid']}.mp4" for r in rows]
    cfg = ScoreConfig(run=run, queries=videos, prompt="x", device="cpu", workers=0)
    queries = [Query(path=str(v), prompt=r["caption"]) for v, r in zip(videos, rows)]
    wan = load_wan(str(tiny_model_dir), ("vae", "text_encoder", "tokenizer"), dtype=info.encode.dtype)
    _encode_queries(cfg, query_encoder(wan, info), queries)

    stored = {c.vid: c for c in iter_cached(run)}
    for q, r in zip(queries, rows):
        c = stored[r["vid"]]
        assert q.status == "ok" and q.motion is not None
        assert torch.equal(q.latent, c.latent) and torch.equal(q.text_emb, c.text_emb)
        assert torch.equal(q.motion, c.motion)
        assert q.latent.dtype == q.text_emb.dtype == torch.float32
