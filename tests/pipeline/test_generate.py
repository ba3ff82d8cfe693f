"""pipeline/generate.py: a query video from the model's own WanPipeline, and score's warning for a
transformer that looks untrained (flat scores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from carv_attrib.config import GenerateConfig
from carv_attrib.errors import ModelLoadError, UsageError
from carv_attrib.pipeline.generate import run_generate
from carv_attrib.pipeline.score import UNTRAINED_SPREAD, Query, flatness, untrained_warnings
from carv_attrib.search.scale import RunScale
from carv_attrib.video.decode import FramePolicy, decode_clip


def test_generate_writes_a_video_score_can_decode(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = run_generate(
        GenerateConfig(
            prompt="a red square", model=str(tiny_model_dir), out=tmp_path / "q" / "g.mp4",
            frames=5, size="32x32", steps=2, device="cpu",
        )
    )  # fmt: skip
    clip = decode_clip(str(out), FramePolicy(frames=5, height=32, width=32, fps=8))
    assert clip.frames.shape == (5, 32, 32, 3)


def test_generate_refuses_bad_input_before_loading(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="1 \\+ 4k frames"):
        run_generate(GenerateConfig(prompt="x", model=str(tiny_model_dir), frames=6, out=tmp_path / "a.mp4"))
    with pytest.raises(ModelLoadError, match="component folder"):
        run_generate(GenerateConfig(prompt="x", model=str(tiny_model_dir / "vae"), out=tmp_path / "a.mp4"))
    assert not (tmp_path / "a.mp4").exists()


def test_flat_scores_warn_that_the_transformer_looks_untrained() -> None:
    def query(scores: list[float]) -> Query:
        q = Query(path="q.mp4", prompt="p")
        q.results = [{"score": s} for s in scores]
        return q

    flat = query([0.99997, 0.99989, 0.99972, 0.99966])  # a random-weight tiny model's, measured
    spread = query([0.99927, 0.99824, 0.99790, 0.99778, 0.99775])  # the 150-step demo model's
    short = query([0.5, 0.5])
    warnings = untrained_warnings([flat, spread, short])
    assert (
        len(warnings) == 1
        and warnings[0].startswith("q.mp4: its top 4 results")
        and "untrained" in warnings[0]
    )
    assert (
        max(r["score"] for r in spread.results) - min(r["score"] for r in spread.results) > UNTRAINED_SPREAD
    )


def test_the_untrained_check_weighs_the_clip_spread_against_the_standard_error() -> None:
    """With standard errors the check reads sd(scores) / median se (`flatness`): the random demos'
    measured 0.03-0.06 warn, the trained demo's 0.8 does not, whatever the cosines say."""

    def query(sd_scores: float, se: float) -> Query:
        q = Query(path="q.mp4", prompt="p")
        base = np.linspace(-1.0, 1.0, 10)
        scores = 0.5 + sd_scores * base / base.std()
        q.results = [{"score": float(s), "se": se} for s in scores[::-1]]
        q.scale = RunScale.from_scores(scores, "exact", len(scores))
        q.cosines = np.full(10, 0.5)  # would not warn on its own: the se rule decides
        return q

    assert len(untrained_warnings([query(0.001, 0.032)])) == 1  # the random tiny demo's figures
    assert untrained_warnings([query(0.04, 0.05)]) == []  # the trained demo's
    assert flatness(query(0.001, 0.032)) == pytest.approx(0.001 / 0.032, rel=64 * np.finfo(np.float64).eps)


def test_the_untrained_check_reads_cosines_not_normalize_scores() -> None:
    """Under `normalize` the scores carry ‖φ_i‖^0.5 (the untrained demo's: 0.7573..0.7561, a 1.6e-3
    spread); their cosines are what stays flat (4.4e-5 measured on that run)."""
    q = Query(path="q.mp4", prompt="p")
    q.results = [{"score": s} for s in (0.757283, 0.756764, 0.75632, 0.756129, 0.756072)]
    assert untrained_warnings([q]) == []  # the scores alone would not warn
    q.cosines = np.array([0.99991, 0.99990, 0.99989, 0.99988, 0.99987])
    assert len(untrained_warnings([q])) == 1
    q.cosines = np.array([0.94, 0.92, 0.91, 0.89, 0.88])  # a trained model's spread
    assert untrained_warnings([q]) == []


def _pickled_transformer(src: Path, dst: Path) -> Path:
    """A copy of the tiny pipeline whose transformer weights are a pickle carrying a payload (it would
    create `dst/PWNED` if unpickled)."""
    import os
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    weights = dst / "transformer" / "diffusion_pytorch_model.safetensors"
    state = dict(load_file(str(weights)))

    class Payload:
        def __reduce__(self):  # noqa: ANN204 - the pickle protocol
            return (os.system, (f"touch {dst / 'PWNED'}",))

    state["payload"] = Payload()
    torch.save(state, dst / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return dst


def _custom_transformer(src: Path, dst: Path) -> Path:
    """A copy of the tiny pipeline whose model_index.json names a custom transformer class beside it."""
    import json
    import shutil

    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index["transformer"] = ["my_module", "MyTransformer"]
    (dst / "model_index.json").write_text(json.dumps(index))
    (dst / "transformer" / "my_module.py").write_text(
        f"import pathlib\npathlib.Path({str(dst / 'PWNED')!r}).touch()\nclass MyTransformer: pass\n"
    )
    return dst


@pytest.mark.parametrize("make", [_pickled_transformer, _custom_transformer], ids=["pickle", "custom-class"])
def test_generate_refuses_pickles_and_custom_classes_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, make
) -> None:
    """diffusers refuses both without running the payload; the CLI says so in one line, exit 2."""
    from typer.testing import CliRunner

    from carv_attrib.cli.app import app

    model = make(tiny_model_dir, tmp_path / "model")
    out = tmp_path / "g.mp4"
    res = CliRunner().invoke(
        app, ["generate", "x", "-m", str(model), "-o", str(out), "--frames", "5", "--size", "32x32"]
    )
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot load the pipeline"), res.output
    assert "Traceback" not in res.output
    assert not (model / "PWNED").exists() and not out.exists()
