"""score --null-prompt: each query ranked again under the empty text (classifier-free guidance's
unconditional branch), beside its captioned ranking, or alone when no prompt is given."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.errors import UsageError
from carv_attrib.models.clip_encoder import ClipEncoder
from carv_attrib.models.wan import pad_context
from carv_attrib.pipeline.score import (
    NULL_PROMPT,
    Query,
    ScoreConfig,
    clip_ids,
    null_embedding,
    null_prompt_block,
    run_score,
)
from carv_attrib.store.run import RunDir

EPS32 = float(np.finfo(np.float32).eps)


def schema() -> dict:
    return json.loads(resources.files("carv_attrib").joinpath("schemas/attribution.schema.json").read_text())


def caption(demo_data: Path, vid: str) -> str:
    return {r["vid"]: r["caption"] for r in json.loads((demo_data / "manifest.json").read_text())}[vid]


@pytest.fixture
def run(featurized_run: Path, tmp_path: Path) -> Path:
    """A copy: run_score records each invocation in RUN/run.json."""
    out = tmp_path / "run"
    shutil.copytree(featurized_run, out)
    return out


def test_the_empty_text_is_embedded_as_wan_pipeline_embeds_its_negative_prompt(
    tiny_model_dir: Path, featurized_run: Path
) -> None:
    from diffusers import WanPipeline

    facts = RunDir(featurized_run).index_info().encode
    enc = ClipEncoder.load(str(tiny_model_dir), facts)
    emb = null_embedding(enc)  # (L, D)
    (direct,) = enc.embed([NULL_PROMPT])
    assert NULL_PROMPT == "" and torch.equal(emb, torch.from_numpy(direct.astype(np.float32)))
    assert emb.shape[0] == 1  # the lone end-of-sequence token: "" is embedded, not refused
    pipe = WanPipeline.from_pretrained(str(tiny_model_dir))
    _, neg = pipe.encode_prompt(
        "a caption", negative_prompt=None, max_sequence_length=512, device="cpu", dtype=torch.float32
    )  # None → "": the pipeline's default unconditional text
    neg = neg.detach()
    assert neg.shape[1] == 512
    # the cache rounds the text embedding through latent_dtype; in float32 the two are the same numbers up
    # to the batch the encoder ran in: a UMT5 hidden state of D entries, rounding ≤ D·eps32 of its scale
    tol = emb.shape[1] * EPS32 * float(neg.abs().max())
    torch.testing.assert_close(pad_context(emb)[0], neg[0], rtol=0, atol=tol)


def test_null_prompt_ranking_rides_beside_the_captioned_one(run: Path, demo_data: Path) -> None:
    vid = "demo-00002"
    query = demo_data / "videos" / f"{vid}.mp4"
    common = dict(run=run, queries=[query], top_k=3, workers=0, device="cpu")
    events: list[tuple[str, dict]] = []
    doc = run_score(
        ScoreConfig(prompt=caption(demo_data, vid), null_prompt=True, explain=True, **common),
        lambda e, info: events.append((e, info)),
    )
    # the progress bar's total: encode + captioned + null featurize per query, then the explain clips
    todo = sum(info["todo"] for e, info in events if e in ("start", "explain"))
    assert todo == sum(e == "clip" for e, _ in events) and events[0] == ("start", {"todo": 3})
    jsonschema.validate(doc, schema())
    (q,) = doc["queries"]
    assert q["conditioning"] == "prompt" and q["results"][0]["vid"] == vid
    null = q["null_prompt"]
    assert null["status"] == "ok" and len(null["results"]) == 3
    mine, theirs = [r["clip_id"] for r in q["results"]], [r["clip_id"] for r in null["results"]]
    assert null["shared"] == [c for c in mine if c in theirs]
    assert null["shared_str"] == [str(c) for c in null["shared"]]
    assert null["top_k_overlap"] == len(set(mine) & set(theirs)) / 3
    for r in null["results"]:  # the null rows are full result rows: placed and explained like the others
        assert r["percentile"] is not None and set(r["explain"]["by_kind"]) >= {"self_attention", "other"}
    # the same ranking as --null-prompt alone (an explicit empty --prompt is refused: see
    # test_blank_prompt_is_refused_naming_null_prompt)
    alone = run_score(ScoreConfig(null_prompt=True, **common))
    jsonschema.validate(alone, schema())
    (qa,) = alone["queries"]
    assert qa["prompt"] == "" and qa["conditioning"] == "null" and "null_prompt" not in qa
    dim = doc["index"]["dim"]
    for other in (qa,):
        assert [r["clip_id"] for r in other["results"]] == theirs
        # cosine scores of features computed in another batch: float32 rounding, ≤ D·eps32
        for a, b in zip(other["results"], null["results"]):
            assert a["score"] == pytest.approx(b["score"], rel=0, abs=dim * EPS32)


def test_null_prompt_through_the_cli_and_its_checks(run: Path, demo_data: Path, tmp_path: Path) -> None:
    query = demo_data / "videos" / "demo-00001.mp4"
    runner = CliRunner()
    r = runner.invoke(
        app, ["score", str(query), "--run", str(run), "--null-prompt", "-k", "2", "--format", "human", "--device",
              "cpu", "--workers", "0"]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "the empty text: --null-prompt" in " ".join(r.stdout.split())  # the table wraps its title
    r = runner.invoke(
        app, ["score", str(query), "--run", str(run), "-p", caption(demo_data, "demo-00001"), "--null-prompt",
              "-k", "2", "--format", "human", "--device", "cpu", "--workers", "0"]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "null prompt:" in r.stdout and "overlap" in " ".join(r.stdout.split())
    with pytest.raises(UsageError, match="or --null-prompt alone"):
        run_score(ScoreConfig(run=run, queries=[query], device="cpu"))
    with pytest.raises(UsageError, match="null_prompt must be True or False"):
        ScoreConfig(run=run, queries=[query], null_prompt="yes").validate()  # type: ignore[arg-type]


def test_null_prompt_block_overlap_and_a_failed_null_pass() -> None:
    def rows(*ids: int) -> list[dict]:  # result rows as `_results` writes them
        meta = {"vid": None, "caption": None, "path": None, "score": 0.5}
        return [{"rank": j + 1, **clip_ids(i), **meta} for j, i in enumerate(ids)]

    q = Query(path="q.mp4", prompt="p", results=rows(7, 3, 2**60 + 1))
    null = Query(path="q.mp4", prompt="", conditioning="null", results=rows(2**60 + 1, 9, 7))
    block = null_prompt_block(q, null)
    assert block["shared"] == [7, 2**60 + 1] and block["shared_str"] == ["7", str(2**60 + 1)]
    assert block["top_k_overlap"] == 2 / 3 and block["results"] is null.results
    # a short list (an index of fewer clips than k) is counted against the longer one
    assert null_prompt_block(q, Query(path="q.mp4", prompt="", results=rows(3)))["top_k_overlap"] == 1 / 3
    null.fail("nonfinite: the query's gradient feature has NaN/Inf")
    failed = null_prompt_block(q, null)
    assert failed["status"] == "error" and failed["results"] == [] and failed["top_k_overlap"] is None
    q.null = null
    entry = q.to_json()
    assert entry["null_prompt"] == failed and entry["conditioning"] == "prompt"
    jsonschema.validate(entry, schema()["properties"]["queries"]["items"] | {"$defs": schema()["$defs"]})


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_blank_prompt_is_refused_naming_null_prompt(
    run: Path, demo_data: Path, tmp_path: Path, blank: str
) -> None:
    """encode refuses an empty caption; score refuses an empty --prompt the same way (exit 2, one line),
    naming --null-prompt, the explicit way to rank under the empty text. Nothing is loaded or written."""
    query = demo_data / "videos" / "demo-00001.mp4"
    before = (run / "run.json").read_bytes() if (run / "run.json").exists() else None
    with pytest.raises(UsageError, match="--null-prompt"):
        ScoreConfig(run=run, queries=[query], prompt=blank).validate()
    r = CliRunner().invoke(
        app, ["score", str(query), "--run", str(run), "-p", blank, "--device", "cpu", "--workers", "0"]
    )
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "empty" in lines[0] and "--null-prompt" in lines[0], r.output
    assert "Traceback" not in r.output
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({str(query): blank}))
    r = CliRunner().invoke(
        app,
        [
            "score",
            str(query),
            "--run",
            str(run),
            "--prompts",
            str(prompts),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 2 and "--null-prompt" in r.output and "empty prompt for" in r.output, r.output
    after = (run / "run.json").read_bytes() if (run / "run.json").exists() else None
    assert before == after


def test_prompt_past_512_tokens_is_scored_truncated_with_a_warning(run: Path, demo_data: Path) -> None:
    """A --prompt past the text encoder's 512 tokens is embedded as WanPipeline embeds it (its first
    512 tokens: two prompts that differ after that score the same), and said: a warning in the
    document and on the terminal, and `prompt_truncated` in the query's JSON (schema-valid)."""
    vid = "demo-00002"
    query = demo_data / "videos" / f"{vid}.mp4"
    words = (caption(demo_data, vid) + " ") * 400
    common = dict(run=run, queries=[query], top_k=3, workers=0, device="cpu")
    a = run_score(ScoreConfig(prompt=words + "and it ends blue", **common))
    b = run_score(ScoreConfig(prompt=words + "and then a dog runs in", **common))
    jsonschema.validate(a, schema())
    (qa,), (qb,) = a["queries"], b["queries"]
    assert qa["prompt_truncated"]["limit"] == 512 and qa["prompt_truncated"]["tokens"] > 512
    assert [r["score"] for r in qa["results"]] == [r["score"] for r in qb["results"]]
    (warning,) = [w for w in a["warnings"] if "UMT5 tokens" in w]
    assert (
        f"{qa['prompt_truncated']['tokens']} UMT5 tokens" in warning and "truncated as WanPipeline" in warning
    )
    short = run_score(ScoreConfig(prompt=caption(demo_data, vid), **common))
    assert "prompt_truncated" not in short["queries"][0]
    assert not [w for w in short["warnings"] if "UMT5" in w]
    r = CliRunner().invoke(
        app, ["score", str(query), "--run", str(run), "-p", words, "-k", "2", "--format", "json", "--device",
              "cpu", "--workers", "0"]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stderr and "truncated as WanPipeline" in " ".join(r.stderr.split())
