"""Write the same clips in the forms datasets ship (`carv_attrib.store.inputs`): WebDataset tar
shards, a saved Hugging Face dataset, a folder of videos with .txt sidecars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def demo_clips(demo_data: Path, n: int | None = None) -> list[tuple[str, str, Path]]:
    """(vid, caption, video file) of the demo clips (`tests/conftest.py: demo_data`), the first n."""
    rows = json.loads((demo_data / "manifest.json").read_text())[:n]
    return [(r["vid"], r["caption"], demo_data / "videos" / f"{r['vid']}.mp4") for r in rows]


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def write_manifest(clips: list[tuple[str, str, Path]], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"vid": v, "caption": c} for v, c, _ in clips]))
    return out


def write_shards(clips: list[tuple[str, str, Path]], out: Path, shards: int = 2) -> str:
    """video2dataset's layout: {key}.mp4, {key}.txt (even clips) or {key}.json with a "caption" (odd
    ones) and a {key}.json of metadata; returns the brace pattern of the shards."""
    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(clips) // shards)
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tf:
            for i, (vid, caption, path) in enumerate(clips[s * per : (s + 1) * per]):
                add_bytes(tf, f"{vid}.mp4", path.read_bytes())
                if i % 2 == 0:
                    add_bytes(tf, f"{vid}.txt", caption.encode())
                    add_bytes(tf, f"{vid}.json", json.dumps({"key": vid, "status": "success"}).encode())
                else:
                    add_bytes(tf, f"{vid}.json", json.dumps({"caption": caption, "url": "x"}).encode())
    return str(out / f"{{00000..{shards - 1:05d}}}.tar")


def write_hf(clips: list[tuple[str, str, Path]], out: Path, video: str = "path") -> Path:
    """A dataset saved with save_to_disk whose video column holds paths ("path"), bytes beside an id
    column ("bytes"), or {"bytes", "path"} dicts ("dict")."""
    import datasets

    if video == "path":
        data = {"video": [str(p) for _, _, p in clips], "text": [c for _, c, _ in clips]}
    elif video == "bytes":
        data = {"vid": [v for v, _, _ in clips], "mp4": [p.read_bytes() for _, _, p in clips]}
        data["caption"] = [c for _, c, _ in clips]
    else:
        data = {"video": [{"bytes": p.read_bytes(), "path": p.name} for _, _, p in clips]}
        data["prompt"] = [c for _, c, _ in clips]
    datasets.Dataset.from_dict(data).save_to_disk(str(out))
    return out


def write_sidecars(clips: list[tuple[str, str, Path]], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for vid, caption, path in clips:
        (out / f"{vid}.mp4").write_bytes(path.read_bytes())
        (out / f"{vid}.txt").write_text(caption + "\n")
    return out
