"""Model identity: which VAE, text encoder and transformer made a stage's numbers, and the checks that
refuse mixing them.

What changes the numbers is the component configs and weights, so a component's identity is the
sha256 of its config and every weight file (hashes of big files cached by (path, size, mtime); a
Hugging Face cache blob is named by its sha256 and read for free). A model's *path* is provenance,
not identity (`carv_attrib.store.shards.PROVENANCE_KEYS`).

Checks used by the stages:
- `check_encoder_matches(model, recorded)`: featurize/plan/score with the VAE + text encoder that
  encoded the run;
- `check_transformers_match(model, paths, fingerprints)`: score with the transformer(s) the index
  was featurized with.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import snapshot_download

from carv_attrib.errors import ConfigMismatchError, ModelLoadError

if TYPE_CHECKING:  # a type only: data/ builds on models/ elsewhere, not the other way round
    from carv_attrib.store.records import ModelRecord

ENCODER_COMPONENTS = ("vae", "text_encoder", "tokenizer")


def _hash_cache_path() -> Path:
    root = Path(os.environ.get("CARV_ATTRIB_CACHE", Path.home() / ".cache" / "carv-attrib"))
    return root / "file-hashes.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file; a Hugging Face cache blob is named by its sha256, so it is read for free."""
    real = Path(os.path.realpath(path))
    if (
        real.parent.name == "blobs"
        and len(real.name) == 64
        and all(c in "0123456789abcdef" for c in real.name)
    ):
        return real.name
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _hash_cache_path()
    cache: dict[str, str] = {}
    if st.st_size > (32 << 20) and cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return cache[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if st.st_size > (32 << 20):
        cache[key] = digest
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:  # a read-only home only costs a re-hash next time
            pass
    return digest


def _component_dir(source: str, name: str) -> Path | None:
    local = Path(source) / name
    if local.is_dir():
        return local
    try:  # a Hub id already in the local cache
        snap = Path(snapshot_download(source, allow_patterns=[f"{name}/*"], local_files_only=True))
        return snap / name if (snap / name).is_dir() else None
    except Exception:
        return None


def component_identity(source: str, name: str) -> dict[str, Any]:
    """{"files": {relative name: sha256}} over config and weight files of one component."""
    cdir = _component_dir(source, name)
    if cdir is None:
        return {"source": source, "files": {}}
    files = {
        p.name: file_sha256(p)
        for p in sorted(cdir.iterdir())
        if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".model", ".txt"}
    }
    return {"files": files}


WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")


def check_pipeline_dir(source: str) -> None:
    """Refuse (ModelLoadError, exit 2) a local --model that is not a diffusers Wan2.1 pipeline folder,
    naming what it is instead: a component folder (MODEL/transformer: pass its parent), another
    pipeline, or a folder without model_index.json. A Hub id (not a local directory) passes."""
    path = Path(source)
    if not path.is_dir():
        return
    index = path / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except (ValueError, OSError) as exc:
            raise ModelLoadError(f"--model {source}: model_index.json cannot be read ({exc})") from None
        if cls is not None and cls not in WAN_PIPELINES:
            raise ModelLoadError(
                f"--model {source} is a {cls} pipeline, not Wan2.1 (model_index.json names {cls}); "
                "pass a Wan2.1 diffusers pipeline folder or Hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
            )
        return
    config = path / "config.json"
    parent_index = path.parent / "model_index.json"
    if config.is_file() and parent_index.is_file():
        raise ModelLoadError(
            f"--model {source} is the {path.name!r} component folder of the pipeline at {path.parent}; "
            f"pass --model {path.parent}"
        )
    raise ModelLoadError(
        f"--model {source} is not a diffusers pipeline folder (no model_index.json); pass the folder "
        "holding model_index.json, vae/, text_encoder/, tokenizer/ and transformer/ (e.g. one made by "
        "`carv-attrib make-model DIR`) or a Hub id"
    )


def model_identity(source: str, components: Sequence[str]) -> dict[str, Any]:
    """Per-component file hashes plus one short fingerprint over all of them. ModelLoadError (exit 2)
    for a local folder that is not a Wan2.1 pipeline (`check_pipeline_dir`)."""
    check_pipeline_dir(source)
    comps = {name: component_identity(source, name) for name in sorted(components)}
    blob = json.dumps(comps, sort_keys=True).encode()
    return {
        "source": resolve_source(source),
        "components": comps,
        "fingerprint": hashlib.sha256(blob).hexdigest()[:16],
    }


def resolve_source(source: str) -> str:
    """An absolute path for a local directory (so `score` finds it from any working directory); a Hub id
    unchanged."""
    return str(Path(source).resolve()) if Path(source).is_dir() else str(source)


def checkpoint_identity(source: str, checkpoint: str | None) -> dict[str, Any]:
    """File hashes of the transformer that produced a feature block."""
    if checkpoint is None:
        files = component_identity(str(source), "transformer")["files"]
        label = f"{source}:transformer"
    else:
        ck = Path(checkpoint)
        if ck.is_file():
            files = {ck.name: file_sha256(ck)}
        else:
            d = ck if (ck / "config.json").exists() else ck / "transformer"
            files = component_identity(str(d.parent), d.name)["files"]
        label = str(checkpoint)
    fp = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    return {"checkpoint": label, "files": files, "fingerprint": fp}


def check_encoder_matches(
    model: str, recorded: ModelRecord | dict[str, Any], source: str | None = None
) -> None:
    """Refuse (exit 2) a MODEL whose VAE / text encoder / tokenizer files differ from `recorded`:
    the run's `ModelRecord` (`LatentsRecord.model`), or its per-component identities as stored by
    encode (then `source` names where they came from), or that cannot be found at all."""
    if not isinstance(recorded, dict):
        recorded, source = recorded.components, recorded.source
    now = model_identity(model, tuple(recorded))["components"]
    if not any(c.get("files") for c in now.values()):
        raise ModelLoadError(
            f"--model {model}: no such model directory (from {Path.cwd()}), and not a Hub id in the local "
            f"cache; this run was encoded with {source}"
        )
    diffs = [c for c in recorded if now[c].get("files") != recorded[c].get("files")]
    if diffs:
        raise ConfigMismatchError(
            f"--model {model} is not the model that encoded this run ({source}): {', '.join(diffs)} differ; "
            "use the same model, or re-encode"
        )


def check_transformers_match(model: str, paths: Sequence[str | None], fingerprints: Sequence[str]) -> None:
    """Refuse (exit 2) transformers whose weights differ from the ones a feature stage recorded:
    MODEL's own transformer (path None) or checkpoints at the recorded absolute paths."""
    for path, fp in zip(paths, fingerprints):
        if path is not None and not Path(path).exists():
            raise ModelLoadError(
                f"checkpoint {path}, recorded when the index was built, no longer exists; restore it "
                "there, or featurize again with its new location"
            )
        if checkpoint_identity(model, path)["fingerprint"] != fp:
            what = f"checkpoint {path}" if path is not None else f"--model {model}'s transformer"
            raise ConfigMismatchError(
                f"{what} is not the transformer the index was built with (weights differ); score with the "
                "same weights, or featurize again"
            )
