"""`evaluate --lora DIR`: LDS of LoRA attribution against adapters retrained with DIR's finetune
recipe on random halves of the training clips; cached retrainings resume; DIRs without a finetune
record (or of another run or base) and non-LoRA settings are refused (exit 2, one line)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.config import EncodeConfig, EvaluateConfig, FinetuneConfig
from carv_attrib.errors import UsageError
from carv_attrib.lds import retrain
from carv_attrib.lds.synthetic import make_demo_data
from carv_attrib.models.lora import LORA_WEIGHTS, file_sha256
from carv_attrib.pipeline.encode import run_encode
from carv_attrib.pipeline.evaluate import run_evaluate
from carv_attrib.pipeline.finetune import RECORD, read_record, run_finetune

runner = CliRunner()
STEPS = 3


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A 10-clip run and a rank-2 adapter `finetune --lora` trained on all of it."""
    root = tmp_path_factory.mktemp("evlora")
    manifest = make_demo_data(root / "d", clips=10, seed=4)
    run_encode(
        EncodeConfig(
            manifest=manifest, videos=root / "d" / "videos", model=str(tiny_model_dir), run=root / "run",
            frames=5, size="32x32", workers=0, device="cpu",
        )
    )  # fmt: skip
    run_finetune(
        FinetuneConfig(
            run=root / "run", model=str(tiny_model_dir), out=root / "lora", steps=STEPS, lora=2, lr=5e-3,
            batch_clips=4, draws=1, seed=3, device="cpu",
        )
    )  # fmt: skip
    return root / "run", root / "lora"


def _cfg(run: Path, model: Path, lora: Path, out: Path, **kw: object) -> EvaluateConfig:
    base: dict[str, object] = dict(
        run=run, model=str(model), lora=lora, queries=2, subsets=8, gt_draws=4, replicates=2, workers=1,
        variant=["default", "identity"], out=out,
    )  # fmt: skip
    return EvaluateConfig(**(base | kw))  # type: ignore[arg-type]


def test_lora_lds_records_the_adapter_and_resumes(
    lora_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, lora = lora_world
    lines: list[str] = []
    doc = run_evaluate(_cfg(run, tiny_model_dir, lora, tmp_path / "e.json"), say=lines.append)
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(doc))
    rec = read_record(lora)
    assert rec is not None
    ad = doc["adapter"]
    assert ad["weights_sha256"] == file_sha256(lora / LORA_WEIGHTS) and ad["path"] == str(lora.resolve())
    assert (ad["rank"], ad["alpha"], ad["targets"]) == (2, 2.0, rec["settings"]["lora"]["targets"])
    assert ad["finetune_fingerprint"] == rec["fingerprint"] and ad["saw_queries"] is True
    # the attributed adapter is DIR's recipe retrained on the 8 training clips, not DIR (queries held out)
    full = Path(ad["full_adapter"]["path"])
    assert (
        ad["full_adapter"]["train_clips"] == 8
        and ad["full_adapter"]["weights_sha256"] != ad["weights_sha256"]
    )
    assert full.parent.parent.parent == run / "evaluate" and (full / LORA_WEIGHTS).is_file()
    p = doc["protocol"]
    assert p | {"train_clips": 8, "queries": 2, "subsets": 8, "steps": STEPS, "lr": 5e-3, "rank": 2} == p
    assert p["train_seed"] == 3 and p["batch_clips"] == 4 and p["density"] == rec["settings"]["density"]
    assert set(doc["settings"]) == {"default", "identity"}
    row = doc["settings"]["default"]
    assert row["parameters"] == "lora" and row["kron_dims"] is None and "layers" not in row
    assert row["lds"]["ci95"][0] <= row["lds"]["mean"] <= row["lds"]["ci95"][1]
    assert -1.0 <= row["lds"]["mean"] <= 1.0
    # a line per training with the time left, then per setting
    assert sum(line.startswith("trainings ") for line in lines) == 9 and "s left)" in lines[2]
    assert any("setting 2/2" in line for line in lines)
    subsets = sorted(d.name for d in full.parent.iterdir())
    assert subsets == ["full"] + [f"subset-{m:03d}" for m in range(8)]

    # a rerun retrains nothing: every adapter is cached under RUN/evaluate/<fingerprint>/
    def no_training(job: object) -> None:
        raise AssertionError("retrained a cached adapter")

    monkeypatch.setattr(retrain, "train_lora_job", no_training)
    lines.clear()
    again = run_evaluate(_cfg(run, tiny_model_dir, lora, tmp_path / "e2.json"), say=lines.append)
    assert "trainings: 9 of 9 cached" in lines
    assert again["adapter"] == doc["adapter"]
    assert again["settings"]["default"]["lds"] == doc["settings"]["default"]["lds"]


def test_dir_without_a_finetune_record_is_refused(
    lora_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    run, lora = lora_world
    bare = tmp_path / "bare"
    shutil.copytree(lora, bare)
    (bare / RECORD).unlink()
    with pytest.raises(UsageError, match=f"no {RECORD}"):
        run_evaluate(_cfg(run, tiny_model_dir, bare, tmp_path / "e.json"))
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize(
    ("edit", "text"),
    [
        (lambda r: r["settings"]["base_model"].update(fingerprint="0" * 16), "another base model"),
        (lambda r: r["settings"]["latents"].update(fingerprint="0" * 16), "another run"),
        (lambda r: r["settings"].update(kind="transformer"), "full-transformer finetune"),
        (lambda r: r.update(status="training"), "unfinished"),
        (lambda r: r["settings"].update(dtype="bfloat16"), "retrains in float32 only"),
    ],
)
def test_adapter_of_another_run_or_base_is_refused(
    lora_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path, edit, text
) -> None:
    run, lora = lora_world
    other = tmp_path / "other"
    shutil.copytree(lora, other)
    rec = json.loads((other / RECORD).read_text())
    edit(rec)
    (other / RECORD).write_text(json.dumps(rec))
    with pytest.raises(UsageError, match=text):
        run_evaluate(_cfg(run, tiny_model_dir, other, tmp_path / "e.json"))


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({"steps": 7}, "--steps 7: with --lora the retrainings follow"),
        ({"variant": ["exact-crn-8"]}, "not a LoRA setting"),
        ({"variant": ["all-linear"]}, "not a LoRA setting"),
        ({"full_batch": True}, "--full-batch"),
        ({"ground_truth": Path("gt.json")}, "not both"),
    ],
)
def test_options_that_contradict_lora_are_refused(
    lora_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path, kw, text
) -> None:
    run, lora = lora_world
    with pytest.raises(UsageError, match=text):
        run_evaluate(_cfg(run, tiny_model_dir, lora, tmp_path / "e.json", **kw))


def test_cli_lora(lora_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    run, lora = lora_world
    args = [
        "evaluate", run, "-m", tiny_model_dir, "--lora", lora, "--queries", "2", "--subsets", "8",
        "--gt-draws", "4", "--replicates", "2", "--workers", "1", "--variant", "default", "-o", tmp_path / "e.json",
    ]  # fmt: skip
    r = runner.invoke(app, [str(a) for a in args] + ["--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["adapter"]["rank"] == 2 and "default" in doc["settings"]
    assert "evaluate" in r.stderr and "trainings" in r.stderr
    r = runner.invoke(app, [str(a) for a in args] + ["--format", "human"])
    assert r.exit_code == 0 and "through LoRA lora (rank 2" in " ".join(r.stdout.split()), r.output

    bare = tmp_path / "bare"
    shutil.copytree(lora, bare)
    (bare / RECORD).unlink()
    r = runner.invoke(app, [str(a) for a in args[:4]] + ["--lora", str(bare), "-o", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and f"no {RECORD}" in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
        r.stderr
    )


def test_train_seeds_vary_the_minibatch_seed_only(
    lora_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    run, lora = lora_world
    doc = run_evaluate(
        _cfg(run, tiny_model_dir, lora, tmp_path / "e.json", train_seeds=2, variant=["default"])
    )
    models = Path(doc["adapter"]["full_adapter"]["path"]).parent
    meta = json.loads((models / "subset-000-s1" / "carv_lora.json").read_text())["retrained"]
    assert (meta["seed"], meta["sample_seed"]) == (3, 1003) and doc["protocol"]["train_seeds"] == 2
    a, b = (load_file(str(models / m / LORA_WEIGHTS)) for m in ("subset-000", "subset-000-s1"))
    assert any(not (a[k] == b[k]).all() for k in a)  # other minibatches: another adapter
