"""store/latents.py: storage-dtype rounding (`as_stored`), row decoding (`row_to_clip`) and the
ok-rows-in-manifest-order reader (`iter_cached`) over a small store written with ShardStore."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from carv_attrib.pipeline.encode import latent_schema
from carv_attrib.store.latents import CachedClip, as_stored, iter_cached, row_to_clip
from carv_attrib.store.live import latent_sha
from carv_attrib.store.manifest import ClipTable
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import ShardStore
from carv_attrib.store.sources import SourcedClips, SourceId

LATENT_SHAPE = (16, 3, 4, 4)  # (C, T, h, w)
TEXT_LEN, TEXT_DIM = 5, 32


def _bits(x: Any) -> np.ndarray:
    """The float32 bit patterns, so that NaN, -0.0 and inf compare exactly too."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.int32)


def _awkward_float32() -> np.ndarray:
    """Values where float16 rounding is delicate: ties, subnormals, overflow, signed zero, NaN."""
    f16 = np.finfo(np.float16)
    special = np.array(
        [
            0.0,
            -0.0,
            1.0,
            1.0 + 2.0**-11,  # halfway between two float16 neighbours: ties to even (down)
            1.0 + 3 * 2.0**-11,  # halfway: ties to even (up)
            1.0 + 2.0**-11 + 2.0**-20,  # just above halfway: up
            float(f16.max),
            65519.0,  # rounds down to 65504
            65520.0,  # rounds to inf
            1e6,
            -1e6,
            float(f16.tiny),  # smallest normal
            float(f16.tiny) / 3,  # subnormal
            2.0**-25,  # half the smallest subnormal: ties to zero
            2.0**-25 * 1.5,  # rounds up to the smallest subnormal
            1e-10,
            np.inf,
            -np.inf,
            np.nan,
            np.pi,
            -np.e,
        ],
        dtype=np.float32,
    )
    rng = np.random.default_rng(0)
    spread = (rng.standard_normal(4000) * 10.0 ** rng.uniform(-9, 6, 4000)).astype(np.float32)
    return np.concatenate([special, spread])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 65520 -> inf on purpose
def test_as_stored_float16_rounds_exactly_like_numpy() -> None:
    x = _awkward_float32()
    got = as_stored(torch.from_numpy(x.copy()), "float16")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == x.shape
    expected = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(_bits(got.numpy()), _bits(expected))
    assert np.isinf(got.numpy()[8]) and got.numpy()[7] == 65504.0  # the overflow edge is numpy's
    assert not np.array_equal(_bits(expected), _bits(x))  # the rounding did something


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 65520 -> inf on purpose
def test_as_stored_keeps_shape_and_float32_is_the_identity() -> None:
    x = torch.from_numpy(_awkward_float32()[:480].reshape(2, 3, 4, 20).copy())
    same = as_stored(x, "float32")
    assert same.shape == x.shape and same.dtype == torch.float32
    np.testing.assert_array_equal(_bits(same.numpy()), _bits(x.numpy()))
    half = as_stored(x, "float16")
    assert half.shape == x.shape
    expected = x.numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(_bits(half.numpy()), _bits(expected))


def _encoded_row(clip_id: int, vid: str, z: torch.Tensor, emb: torch.Tensor, dtype: str) -> dict[str, Any]:
    """A latents row exactly as pipeline/encode.py builds it (bytes + shape + dtype string)."""
    arr = z.numpy().astype(np.dtype(dtype))
    txt = emb.numpy().astype(np.dtype(dtype))
    return {
        "clip_id": clip_id,
        "vid": vid,
        "status": "ok",
        "error": None,
        "latent": arr.tobytes(),
        "latent_shape": list(arr.shape),
        "latent_dtype": str(arr.dtype),
        "text_emb": txt.tobytes(),
        "text_len": txt.shape[0],
        "text_dim": txt.shape[1],
        "frame_indices": [0, 1, 2],
        "source_fps": 24.0,
        "fps": 8.0,
        "source_key": f"key-{vid}",
        "latent_sha": latent_sha(arr.tobytes(), txt.tobytes()),
    }


def _failed_row(clip_id: int, vid: str, status: str) -> dict[str, Any]:
    row = dict.fromkeys(latent_schema().names)
    return row | {
        "clip_id": clip_id,
        "vid": vid,
        "status": status,
        "error": f"{status}: synthetic",
        "source_key": f"key-{vid}",
    }


def _commit_manifest(root: Path, vids: list[str], clip_ids: list[int]) -> None:
    """The committed manifest that makes rows keyed `key-<vid>` live."""
    clips = ClipTable(clip_ids, vids, ["a caption"] * len(vids), [f"/v/{v}.mp4" for v in vids])
    none = SourceId(None, None, None)
    SourcedClips(clips, [none] * len(vids), [f"key-{v}" for v in vids]).write(RunDir(root).manifest_table)


def _tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(*LATENT_SHAPE, generator=gen) * 3
    emb = torch.randn(TEXT_LEN, TEXT_DIM, generator=gen)
    return z, emb


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_row_to_clip_round_trips_an_encoded_row(dtype: str) -> None:
    z, emb = _tensors(1)
    row = _encoded_row(-7, "vid-a", z, emb, dtype)
    # Through Arrow with the real schema, as the reader sees it (int32 lists, binary columns).
    (stored,) = pa.Table.from_pylist([row], schema=latent_schema()).to_pylist()
    for r in (row, stored):
        clip = row_to_clip(r)
        assert isinstance(clip, CachedClip) and clip.clip_id == -7 and clip.vid == "vid-a"
        assert clip.latent.dtype == clip.text_emb.dtype == torch.float32
        assert tuple(clip.latent.shape) == LATENT_SHAPE
        assert tuple(clip.text_emb.shape) == (TEXT_LEN, TEXT_DIM)
        # What comes back is the tensor rounded through the storage dtype: bit for bit what
        # `as_stored` gives a query, and the original itself for float32.
        np.testing.assert_array_equal(_bits(clip.latent.numpy()), _bits(as_stored(z, dtype).numpy()))
        np.testing.assert_array_equal(_bits(clip.text_emb.numpy()), _bits(as_stored(emb, dtype).numpy()))
        if dtype == "float32":
            assert torch.equal(clip.latent, z) and torch.equal(clip.text_emb, emb)
        else:
            assert not torch.equal(clip.latent, z)
    assert len(row["latent"]) == np.dtype(dtype).itemsize * z.numel()


def _write_shard(store: ShardStore, index: int, rows: list[dict[str, Any]], done: bool = True) -> None:
    table = pa.Table.from_pylist(rows, schema=latent_schema())
    stats = {"shard": index, "clips": len(rows), "ok": sum(r["status"] == "ok" for r in rows)}
    store.write_shard(index, table, stats, {"stage": "latents"})
    if not done:
        store.done_path(index).unlink()  # a shard interrupted before its done marker


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_iter_cached_yields_the_live_ok_rows_in_storage_order(tmp_path: Path, dtype: str) -> None:
    store = ShardStore(tmp_path, "latents")
    store.prepare({"latent_dtype": dtype})
    tensors = {i: _tensors(100 + i) for i in range(10)}

    def ok(i: int) -> dict[str, Any]:
        return _encoded_row(1000 - i, f"clip-{i:02d}", *tensors[i], dtype)  # ids not sorted like order

    shards = {
        0: [ok(0), _failed_row(999, "clip-01", "missing"), ok(2)],
        1: [_failed_row(997, "clip-03", "decode_error"), _failed_row(996, "clip-04", "timeout")],
        2: [ok(5), ok(6), _failed_row(993, "clip-07", "too_short")],
        10: [ok(8)],  # shard numbers sort as numbers, not as strings
    }
    for index in (10, 2, 0, 1):  # written out of order, as parallel workers would
        _write_shard(store, index, shards[index])
    _write_shard(store, 3, [ok(9)], done=False)  # not done: never read
    gone = _encoded_row(990, "clip-gone", *_tensors(1), dtype)  # a clip removed from the manifest
    old = _encoded_row(1000, "clip-00", *_tensors(2), dtype) | {"source_key": "key-before-an-edit"}
    _write_shard(store, 11, [gone, old])
    vids = [f"clip-{i:02d}" for i in range(10)]
    _commit_manifest(tmp_path, vids, [1000 - i for i in range(10)])

    clips = list(iter_cached(tmp_path))
    assert [c.vid for c in clips] == ["clip-00", "clip-02", "clip-05", "clip-06", "clip-08"]
    assert [c.clip_id for c in clips] == [1000, 998, 995, 994, 992]
    for c in clips:
        z, emb = tensors[int(c.vid.split("-")[1])]
        np.testing.assert_array_equal(_bits(c.latent.numpy()), _bits(as_stored(z, dtype).numpy()))
        np.testing.assert_array_equal(_bits(c.text_emb.numpy()), _bits(as_stored(emb, dtype).numpy()))

    assert list(iter_cached(tmp_path / "elsewhere")) == []  # no latents stage: nothing
