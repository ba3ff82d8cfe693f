"""pipeline/finetune.py: fine-tuning from the latent cache into OUT (a transformer or a LoRA
directory), checkpoints that resume bitwise, refusals that write nothing, MODEL never written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from carv_attrib.config import FinetuneConfig
from carv_attrib.errors import RunLockedError, UsageError
from carv_attrib.models.lora import LORA_WEIGHTS
from carv_attrib.pipeline.finetune import CHECKPOINTS, RECORD, read_record, run_finetune

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _cfg(run: Path, model: Path, out: Path, **kw: object) -> FinetuneConfig:
    base: dict[str, object] = dict(
        run=run,
        model=str(model),
        out=out,
        steps=4,
        lr=2e-3,
        batch_clips=3,
        device="cpu",
        checkpoint_every=100,
    )
    return FinetuneConfig(**(base | kw))  # type: ignore[arg-type]


def _weights(out: Path, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    return load_file(str(out / name))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


class Stop:
    """A progress callback that raises KeyboardInterrupt after step `at` (a Ctrl-C there)."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, event: str, info: dict) -> None:
        if event == "step" and info["step"] == self.at:
            raise KeyboardInterrupt


def test_full_finetune_writes_a_transformer_dir_and_never_touches_model(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before = _tree_hash(tiny_model_dir)
    out = tmp_path / "ft"
    s = run_finetune(_cfg(encoded_run, tiny_model_dir, out))
    assert (s.kind, s.steps, s.trained_steps, s.clips) == ("transformer", 4, 4, 8)
    assert s.steps_per_s and s.steps_per_s > 0
    assert _tree_hash(tiny_model_dir) == before
    rec = read_record(out)
    assert rec is not None and rec["status"] == "done" and len(rec["losses"]) == 4
    st = rec["settings"]
    assert st["optimizer"] == "adamw" and st["density"] == "uniform" and st["lr"] == 2e-3
    assert st["batch_clips"] == 3 and st["seed"] == 0 and "clip_objective" in st["objective"]
    assert st["latents"]["fingerprint"] and st["latents"]["live_digest"] and st["base_model"]["fingerprint"]
    # usable as featurize --checkpoint OUT, and different from the base model
    from carv_attrib.models.wan import load_transformer

    ft = load_transformer(str(tiny_model_dir), str(out))
    base = load_transformer(str(tiny_model_dir))
    assert any(not torch.equal(a, b) for a, b in zip(ft.state_dict().values(), base.state_dict().values()))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_loss_goes_down_on_the_tiny_model(encoded_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    s = run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "ft", steps=40, batch_clips=8))
    losses = read_record(tmp_path / "ft")["losses"]  # type: ignore[index]
    first = sum(losses[:5]) / 5
    assert s.loss_last is not None and s.loss_last < 0.9 * first, (first, s.loss_last)


def test_interrupted_then_resumed_is_bitwise_the_uninterrupted_run(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "whole", steps=6))
    want = _weights(tmp_path / "whole")

    out = tmp_path / "cut"
    cfg = _cfg(encoded_run, tiny_model_dir, out, steps=6, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(cfg, Stop(3))  # after step 3: between the step-2 checkpoint and the next
    assert [p.name for p in (out / CHECKPOINTS).iterdir()] == ["step-00000003.pt"]
    assert read_record(out)["status"] == "training"  # type: ignore[index]
    s = run_finetune(cfg)
    assert (s.resumed_from, s.trained_steps, s.steps) == (3, 3, 6)
    assert _same(_weights(out), want)
    assert read_record(out)["losses"] == read_record(tmp_path / "whole")["losses"]  # type: ignore[index]

    mtime = (out / WEIGHTS).stat().st_mtime_ns
    again = run_finetune(cfg)  # the same command once more: nothing to do, nothing written
    assert again.already_done and again.steps == 6 and (out / WEIGHTS).stat().st_mtime_ns == mtime


def test_steps_then_more_steps_is_one_longer_run(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "whole", steps=5))
    out = tmp_path / "grown"
    run_finetune(_cfg(encoded_run, tiny_model_dir, out, steps=2))
    s = run_finetune(_cfg(encoded_run, tiny_model_dir, out, steps=5))
    assert (s.resumed_from, s.steps) == (2, 5)
    assert _same(_weights(out), _weights(tmp_path / "whole"))
    with pytest.raises(UsageError, match="more than --steps 3"):
        run_finetune(_cfg(encoded_run, tiny_model_dir, out, steps=3))


def test_lora_writes_a_diffusers_lora_dir_and_resumes_bitwise(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from diffusers import WanPipeline

    whole = tmp_path / "lora"
    s = run_finetune(_cfg(encoded_run, tiny_model_dir, whole, lora=2, lora_alpha=4.0, steps=4))
    assert s.kind == "lora" and 0 < s.trainable_params < 28_000
    pipe = WanPipeline.from_pretrained(str(tiny_model_dir))
    pipe.load_lora_weights(str(whole))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    rec = read_record(whole)
    assert rec["settings"]["lora"] == {
        "rank": 2,
        "alpha": 4.0,
        "targets": ["to_q", "to_k", "to_v", "to_out.0"],
    }  # type: ignore[index]

    cut = tmp_path / "lora-cut"
    cfg = _cfg(encoded_run, tiny_model_dir, cut, lora=2, lora_alpha=4.0, steps=4)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(cfg, Stop(1))
    run_finetune(cfg)
    assert _same(_weights(cut, LORA_WEIGHTS), _weights(whole, LORA_WEIGHTS))


def test_another_clip_set_gives_another_model(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    a = run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "a", clip_ids=None, steps=3))
    from carv_attrib.store.latents import iter_cached

    ids = [c.clip_id for c in iter_cached(encoded_run)]
    half = run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "b", clip_ids=ids[:4], steps=3))
    other = run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "c", clip_ids=ids[4:], steps=3))
    assert (a.clips, half.clips, other.clips) == (8, 4, 4)
    assert len({a.fingerprint, half.fingerprint, other.fingerprint}) == 3
    wb, wc = _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert sorted(wb) == sorted(wc) and any(not torch.equal(wb[k], wc[k]) for k in wb)


def test_out_inside_model_is_refused_before_anything_is_written(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before = _tree_hash(tiny_model_dir)
    for out in (tiny_model_dir, tiny_model_dir / "transformer", tiny_model_dir / "new"):
        with pytest.raises(UsageError, match="never writes into the model"):
            run_finetune(_cfg(encoded_run, tiny_model_dir, out))
    assert _tree_hash(tiny_model_dir) == before and not (tiny_model_dir / "new").exists()


def test_a_foreign_or_other_settings_out_is_refused_unless_overwrite(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a finetune's"):
        run_finetune(_cfg(encoded_run, tiny_model_dir, foreign))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    out = tmp_path / "ft"
    run_finetune(_cfg(encoded_run, tiny_model_dir, out, steps=2))
    record = (out / RECORD).read_text()
    with pytest.raises(UsageError, match=r"other settings \(lr: [0-9.e-]+ -> 0\.001; seed: 0 -> 1\)"):
        run_finetune(_cfg(encoded_run, tiny_model_dir, out, steps=2, lr=1e-3, seed=1))
    assert (out / RECORD).read_text() == record
    s = run_finetune(_cfg(encoded_run, tiny_model_dir, out, steps=2, lr=1e-3, overwrite=True))
    assert s.resumed_from == 0 and json.loads((out / RECORD).read_text())["settings"]["lr"] == 1e-3
    s = run_finetune(_cfg(encoded_run, tiny_model_dir, foreign, steps=1, overwrite=True))
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / WEIGHTS).is_file()


def test_a_run_being_written_is_refused(encoded_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import fcntl
    import os
    import subprocess
    import sys

    from carv_attrib.store.lock import lock_path

    assert lock_path(encoded_run).exists()
    child = subprocess.Popen(  # another process holding RUN's writer lock
        [sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock_path(encoded_run))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match="being written"):
            run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "ft"))
        assert not (tmp_path / "ft").exists()
    finally:
        child.kill()
        child.wait()
    fd = os.open(lock_path(encoded_run), os.O_RDONLY)  # released: a writer could take it now
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_a_ctrl_c_inside_the_update_waits_for_its_end() -> None:
    import os
    import signal

    from carv_attrib.pipeline.finetune import _sigint_deferred

    for sig in (signal.SIGINT, signal.SIGTERM):
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with _sigint_deferred():
                os.kill(os.getpid(), sig)
                reached.append("after the signal")  # the block runs to its end
        assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_checkpoints_like_ctrl_c(encoded_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import os
    import signal

    def term_at_2(event: str, info: dict) -> None:  # a batch scheduler stopping the job
        if event == "step" and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = _cfg(encoded_run, tiny_model_dir, tmp_path / "ft", steps=4)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(cfg, term_at_2)
    assert [p.name for p in (tmp_path / "ft" / CHECKPOINTS).iterdir()] == ["step-00000002.pt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert run_finetune(cfg).resumed_from == 2
    run_finetune(_cfg(encoded_run, tiny_model_dir, tmp_path / "whole", steps=4))
    assert _same(_weights(tmp_path / "ft"), _weights(tmp_path / "whole"))
