"""models/identity.py: a model's identity is its component files' hashes, not its path; the checks
refuse another VAE / text encoder (check_encoder_matches) or other transformer weights
(check_transformers_match) with one clear error each."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from carv_attrib.errors import ConfigMismatchError, ModelLoadError
from carv_attrib.models.identity import (
    ENCODER_COMPONENTS,
    check_encoder_matches,
    check_transformers_match,
    checkpoint_identity,
    component_identity,
    file_sha256,
    model_identity,
)

TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def encoder_record(model: Path) -> dict:
    """What encode records: the per-component identities of the VAE, text encoder and tokenizer."""
    return model_identity(str(model), ENCODER_COMPONENTS)["components"]


# -- identity --------------------------------------------------------------------------------------
def test_the_same_seed_builds_the_same_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    from carv_attrib.models.tiny import make_model

    make_model(str(tmp_path / "again"), "tiny", seed=0)
    make_model(str(tmp_path / "other"), "tiny", seed=1)
    comps = ("vae", "text_encoder", "transformer")
    fp = model_identity(str(tiny_model_dir), comps)["fingerprint"]
    assert model_identity(str(tmp_path / "again"), comps)["fingerprint"] == fp
    assert model_identity(str(tmp_path / "other"), comps)["fingerprint"] != fp


def test_model_identity_ignores_the_path(tmp_path: Path, tiny_model_dir: Path) -> None:
    a = copy_model(tiny_model_dir, tmp_path / "a")
    b = copy_model(tiny_model_dir, tmp_path / "deeper" / "b")
    comps = ("vae", "text_encoder", "tokenizer", "transformer")
    ia, ib = model_identity(str(a), comps), model_identity(str(b), comps)
    assert ia["components"] == ib["components"] and ia["fingerprint"] == ib["fingerprint"]
    assert ia["source"] == str(a.resolve()) and ib["source"] == str(b.resolve())
    # A relative spelling of the same directory is the same model too.
    rel = Path("..") / b.relative_to(tmp_path)
    assert model_identity(str(tmp_path / "a" / rel), comps)["fingerprint"] == ia["fingerprint"]


def test_component_identity_hashes_config_and_weights(tiny_model_dir: Path) -> None:
    files = component_identity(str(tiny_model_dir), "vae")["files"]
    assert set(files) == {"config.json", "diffusion_pytorch_model.safetensors"}
    for name, digest in files.items():
        assert digest == hashlib.sha256((tiny_model_dir / "vae" / name).read_bytes()).hexdigest()


def test_a_missing_component_has_no_files(tmp_path: Path) -> None:
    assert component_identity(str(tmp_path / "nope"), "vae")["files"] == {}


def test_file_sha256_reads_a_hub_blob_name(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"weights").hexdigest()
    blob = tmp_path / "blobs" / digest
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    (tmp_path / "model.safetensors").symlink_to(blob)
    assert file_sha256(tmp_path / "model.safetensors") == digest
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"weights")
    assert file_sha256(plain) == digest


# -- check_encoder_matches ---------------------------------------------------------------------------
def test_encoder_check_passes_for_the_same_files_elsewhere(tmp_path: Path, tiny_model_dir: Path) -> None:
    recorded = encoder_record(tiny_model_dir)
    check_encoder_matches(str(tiny_model_dir), recorded, str(tiny_model_dir))
    check_encoder_matches(str(copy_model(tiny_model_dir, tmp_path / "moved")), recorded, str(tiny_model_dir))


def test_encoder_check_passes_for_the_model_that_encoded_a_run(
    encoded_run: Path, tiny_model_dir: Path
) -> None:
    from carv_attrib.store.run import RunDir

    model = RunDir(encoded_run).require_latents()["config"]["model"]
    check_encoder_matches(str(tiny_model_dir), model["components"], model.get("source"))


@pytest.mark.parametrize("changed", ["vae/diffusion_pytorch_model.safetensors", "vae/config.json"])
def test_encoder_check_refuses_another_vae(tmp_path: Path, tiny_model_dir: Path, changed: str) -> None:
    recorded = encoder_record(tiny_model_dir)
    other = copy_model(tiny_model_dir, tmp_path / "other")
    flip_last_byte(other / changed)
    with pytest.raises(ConfigMismatchError) as exc:
        check_encoder_matches(str(other), recorded, "models/tiny-wan")
    msg = str(exc.value)
    assert "vae differ" in msg and "text_encoder" not in msg and "tokenizer" not in msg
    assert f"--model {other}" in msg and "models/tiny-wan" in msg and "re-encode" in msg
    assert exc.value.exit_code == 2


def test_encoder_check_ignores_the_transformer(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A fine-tuned transformer with the same VAE and text encoder can featurize the same latents."""
    recorded = encoder_record(tiny_model_dir)
    other = copy_model(tiny_model_dir, tmp_path / "finetuned")
    flip_last_byte(other / TRANSFORMER_WEIGHTS)
    check_encoder_matches(str(other), recorded, str(tiny_model_dir))


def test_encoder_check_names_every_component_that_differs(tmp_path: Path, tiny_model_dir: Path) -> None:
    recorded = encoder_record(tiny_model_dir)
    other = copy_model(tiny_model_dir, tmp_path / "other")
    flip_last_byte(other / "vae" / "config.json")
    flip_last_byte(other / "text_encoder" / "model.safetensors")
    with pytest.raises(ConfigMismatchError, match=r"text_encoder, vae differ"):
        check_encoder_matches(str(other), recorded, None)


def test_encoder_check_refuses_a_missing_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    recorded = encoder_record(tiny_model_dir)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=r"no such model directory") as exc:
        check_encoder_matches(str(missing), recorded, str(tiny_model_dir))
    assert f"--model {missing}" in str(exc.value) and str(tiny_model_dir) in str(exc.value)
    assert exc.value.exit_code == 2


# -- check_transformers_match -----------------------------------------------------------------------
def test_transformer_check_passes_for_the_same_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    fp = checkpoint_identity(str(tiny_model_dir), None)["fingerprint"]
    check_transformers_match(str(tiny_model_dir), [None], [fp])
    # MODEL's own transformer, found through another path to the same files.
    check_transformers_match(str(copy_model(tiny_model_dir, tmp_path / "moved")), [None], [fp])


def test_transformer_check_refuses_changed_model_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    fp = checkpoint_identity(str(tiny_model_dir), None)["fingerprint"]
    other = copy_model(tiny_model_dir, tmp_path / "other")
    flip_last_byte(other / TRANSFORMER_WEIGHTS)
    with pytest.raises(ConfigMismatchError) as exc:
        check_transformers_match(str(other), [None], [fp])
    msg = str(exc.value)
    assert f"--model {other}'s transformer" in msg and "weights differ" in msg
    assert exc.value.exit_code == 2


def test_transformer_check_of_a_checkpoint_directory(tmp_path: Path, tiny_model_dir: Path) -> None:
    ck = shutil.copytree(tiny_model_dir / "transformer", tmp_path / "ck" / "transformer")
    fp = checkpoint_identity(str(tiny_model_dir), str(ck))["fingerprint"]
    assert fp == checkpoint_identity(str(tiny_model_dir), None)["fingerprint"], "same files, same identity"
    # A checkpoint given as its parent directory (DIR/transformer) is the same checkpoint.
    assert checkpoint_identity(str(tiny_model_dir), str(ck.parent))["fingerprint"] == fp
    check_transformers_match(str(tiny_model_dir), [None, str(ck)], [fp, fp])
    flip_last_byte(ck / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConfigMismatchError, match=rf"checkpoint {ck} is not the transformer") as exc:
        check_transformers_match(str(tiny_model_dir), [None, str(ck)], [fp, fp])
    assert "weights differ" in str(exc.value)


def test_transformer_check_of_a_safetensors_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    ck = tmp_path / "step-100.safetensors"
    shutil.copyfile(tiny_model_dir / TRANSFORMER_WEIGHTS, ck)
    fp = checkpoint_identity(str(tiny_model_dir), str(ck))["fingerprint"]
    check_transformers_match(str(tiny_model_dir), [str(ck)], [fp])
    flip_last_byte(ck)
    with pytest.raises(ConfigMismatchError, match=rf"checkpoint {ck} is not the transformer"):
        check_transformers_match(str(tiny_model_dir), [str(ck)], [fp])


def test_transformer_check_refuses_a_missing_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    gone = tmp_path / "gone.safetensors"
    with pytest.raises(ModelLoadError) as exc:
        check_transformers_match(str(tiny_model_dir), [str(gone)], ["0" * 16])
    msg = str(exc.value)
    assert f"checkpoint {gone}" in msg and "no longer exists" in msg and "featurize again" in msg
    assert exc.value.exit_code == 2
