"""The end-to-end demo: tiny Wan2.1 model, synthetic clips, encode, finetune, plan, featurize, generate, score.

    from carv_attrib.pipeline.demo import DemoConfig, run_demo
    result = run_demo(DemoConfig(out="demo-run"))
    result.doc["queries"][0]["results"][:3]

Layout of DIR: model/ (the pipeline, its transformer the fine-tuned one), finetune/ (`finetune`'s
OUT: the trained transformer, its record and last checkpoint), data/ (videos + manifest.json), run/
(latents, features, index), plan.json (+ plan.png) from the `plan` pilot, generated.mp4 (a video the trained tiny pipeline generated for a demo caption) and
attribution.json (its attribution). Each stage resumes: a second `carv-attrib demo DIR` reuses
what exists.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carv_attrib.atomic import atomic_path
from carv_attrib.config import (
    DemoConfig,
    EncodeConfig,
    FeaturizeConfig,
    FinetuneConfig,
    PlanConfig,
    ScoreConfig,
)
from carv_attrib.lds.synthetic import make_demo_data, write_mp4
from carv_attrib.models.tiny import make_model
from carv_attrib.pipeline.encode import run_encode
from carv_attrib.pipeline.featurize import featurize_and_index
from carv_attrib.pipeline.finetune import TRANSFORMER_FILES, read_record, run_finetune
from carv_attrib.pipeline.generate import generate_video
from carv_attrib.pipeline.plan import run_plan
from carv_attrib.pipeline.score import run_score

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    out: Path
    doc: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


DEMO_LR = 2e-3  # the tiny presets' learning rate (finetune's default, 1e-4, is for Wan2.1 itself)


def _train(cfg: DemoConfig, run: Path, model: Path, ft: Path) -> list[float]:
    """`finetune` MODEL's transformer on RUN into FT, then make it the demo pipeline's own transformer
    (the demo's model is the trained one: its README walkthrough and `generate` use MODEL as is).
    A finished FT is installed without training again (its base fingerprint was the untrained model's)."""
    rec = read_record(ft)
    if not (rec and rec.get("status") == "done" and rec.get("steps") == cfg.train_steps):
        run_finetune(
            FinetuneConfig(
                run=run,
                model=str(model),
                out=ft,
                steps=cfg.train_steps,
                lr=DEMO_LR,
                batch_clips=8,
                draws=2,
                seed=cfg.seed,
                device=cfg.device,
                checkpoint_every=max(cfg.train_steps, 1),
            )
        )
        rec = read_record(ft)
    assert rec is not None
    for name in TRANSFORMER_FILES:
        with atomic_path(model / "transformer" / name) as tmp:
            shutil.copyfile(ft / name, tmp)
    return [float(x) for x in rec["losses"]]


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = lambda s: None) -> DemoResult:
    cfg.validate()  # before anything is written
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data, run = out / "model", out / "data", out / "run"
    timings: dict[str, float] = {}

    def stage(name: str) -> Callable[[], None]:
        t = time.monotonic()
        return lambda: timings.__setitem__(name, round(time.monotonic() - t, 2))

    done = stage("model")
    if not (model / "model_index.json").exists():
        say(f"building the {cfg.preset} Wan2.1 pipeline from the diffusers classes -> {model}")
        make_model(str(model), size=cfg.preset, seed=cfg.seed)
    done()
    done = stage("data")
    manifest = data / "manifest.json"
    if not manifest.exists():
        say(f"writing {cfg.clips} synthetic H.264 clips -> {data}")
        make_demo_data(data, clips=cfg.clips, seed=cfg.seed)
    done()
    done = stage("encode")
    say("encode: decoding and VAE-encoding each clip once")
    run_encode(
        EncodeConfig(
            manifest=manifest,
            videos=data / "videos",
            model=str(model),
            run=run,
            frames=cfg.frames,
            size=cfg.size,
            fps=8,
            workers=cfg.workers,
            device=cfg.device,
            shard_size=8,
        )
    )
    done()
    done = stage("train")
    trained = out / ".trained"
    if cfg.train_steps > 0 and not trained.exists():
        say(
            f"finetune: training the transformer on the demo latents for {cfg.train_steps} steps (random weights attribute nothing)"
        )
        losses = _train(cfg, run, model, out / "finetune")
        trained.write_text(f"{losses[0]:.4f} -> {losses[-1]:.4f}\n")
    done()
    done = stage("plan")
    plan_path = out / "plan.json"
    use_plan = cfg.timesteps == "stratified-is" and cfg.plan_pilot_clips >= 2
    if use_plan and not plan_path.exists():
        say(f"plan: pilot of {cfg.plan_pilot_clips} clips -> costs, per-σ gradient moments, proposal q(σ)")
        plan = run_plan(
            PlanConfig(
                run=run,
                model=str(model),
                out=plan_path,
                plot=out / "plan.png" if _has_matplotlib() else None,
                pilot_clips=cfg.plan_pilot_clips,
                bins=8,
                draws=4,
                replicates=3,
                seed=cfg.seed,
                device=cfg.device,
            )
        )
        ratios = ", ".join(f"{k} {v['variance_ratio_vs_iid']:.2f}" for k, v in plan["schemes"].items())
        say(f"plan: within-encode variance per draw relative to iid: {ratios}")
    done()
    done = stage("featurize")
    say(
        f"featurize: {cfg.draws} {cfg.timesteps} draws per cached encode, kron projection, {cfg.precondition} index"
    )
    featurize_and_index(  # the CLI's job: features, then the index (its other choices kept)
        FeaturizeConfig(
            run=run,
            model=str(model),
            draws=cfg.draws,
            timesteps=cfg.timesteps,
            seed=cfg.seed,
            device=cfg.device,
            plan=plan_path if use_plan else None,
        ),
        {"precondition": cfg.precondition},
    )
    done()
    done = stage("generate")
    prompt = cfg.prompt or json.loads(manifest.read_text())[0]["caption"]
    video = out / "generated.mp4"
    say(f"generating a video with WanPipeline for “{prompt}” -> {video}")
    frames = generate_video(
        str(model), prompt, cfg.frames, cfg.height, cfg.width, cfg.inference_steps, cfg.seed, cfg.device
    )
    write_mp4(video, frames, fps=8)
    done()
    done = stage("score")
    say("score: same encode, same draws, FAISS top-k")
    score_cfg = ScoreConfig(run=run, queries=[video], prompt=prompt, top_k=cfg.top_k, device=cfg.device)
    doc = run_score(score_cfg, out=out / "attribution.json")  # written and recorded in RUN/run.json
    done()
    return DemoResult(out=out, doc=doc, timings=timings)
