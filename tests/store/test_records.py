"""store/records.py: every record reads the document today's writers put on disk and gives it back key
for key (old runs load, new files keep their bytes), and tolerates files missing the optional keys."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from carv_attrib.store.digests import doc_digest
from carv_attrib.store.records import (
    PLAN_SCHEMA,
    EncodeFacts,
    FeaturesRecord,
    IndexInfo,
    IndexSummary,
    LatentsRecord,
    ModelRecord,
    PlanDoc,
    RunLog,
    StageRecord,
)
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import ShardStore, read_json


def _stored(path: Path) -> dict:
    return json.loads(path.read_text())


# -- the documents of a real run -------------------------------------------------------------------
def test_latents_record_of_an_encoded_run(encoded_run: Path) -> None:
    d = _stored(encoded_run / "latents" / "config.json")
    rec = LatentsRecord.from_dict(d)
    assert rec.to_dict() == d and json.dumps(rec.to_dict(), sort_keys=True) == json.dumps(d, sort_keys=True)
    assert rec.fingerprint == d["fingerprint"] and rec.config == d["config"]
    assert rec.encode == EncodeFacts.from_latents_config(d["config"]) and rec.encode.frames == 9
    assert rec.model == ModelRecord.from_dict(d["config"]["model"])
    assert rec.model.components == d["config"]["model"]["components"] and rec.model.source
    assert ModelRecord.from_dict(rec.model.to_dict()) == rec.model
    assert RunDir(encoded_run).require_latents_record() == rec == RunDir(encoded_run).latents_record()


def test_features_record_and_index_info_of_a_featurized_run(featurized_run: Path) -> None:
    run = RunDir(featurized_run)
    d = _stored(run.features.config_path)
    rec = FeaturesRecord.from_dict(d)
    assert rec.to_dict() == d
    c = d["config"]
    assert (rec.latents, rec.transformers, rec.draws, rec.output_fn) == (
        c["latents"],
        c["transformers"],
        c["draws"],
        c["output_fn"],
    )
    assert (rec.projector, rec.dtype, rec.timestep) == (c["projector"], c["dtype"], c["timestep"])
    assert "objective" not in c and rec.objective == {"kind": "uniform"}  # uniform is not stored
    assert run.require_features_record() == rec

    info_d = _stored(run.index_info_path)
    info = IndexInfo.from_dict(info_d)
    digest = info_d.pop("digest")  # the document's own checksum, written beside the record's fields
    assert digest == doc_digest(info_d)
    assert info.to_dict() == info_d and info == IndexInfo.read(run.index_info_path)
    # what build_run_index records is what from_records makes of the stored documents
    again = IndexInfo.from_records(
        run.latents_record(),  # type: ignore[arg-type]
        rec,
        run.features.read_provenance() or {},
        {k: info_d[k] for k in ("factory", "preconditioner", "lambda_rel", "nprobe", "rerank_vectors")},
        info.count,
        info.live_digest,
        info.created_at,
        info.tool_version,
    )
    assert info.files and set(info.files) >= {"index.faiss", "preconditioner/precondition.json"}
    assert again == dataclasses.replace(info, files={})  # the checksums come from the written files
    assert IndexSummary.read(run.index_info_path).to_dict() == info_d | {"digest": digest}


def test_stage_record_of_a_bare_config(tmp_path: Path) -> None:
    """Any stage's config.json, as ShardStore.prepare writes it."""
    store = ShardStore(tmp_path, "latents")
    fp = store.prepare({"frames": 9})
    d = store.read_config()
    rec = store.read_record(StageRecord)
    assert rec is not None and rec.fingerprint == fp and rec.config == {"frames": 9}
    assert rec.to_dict() == d and StageRecord.from_dict(rec.to_dict()) == rec
    assert ShardStore(tmp_path, "features").read_record(StageRecord) is None


def test_run_log_of_an_encoded_run(encoded_run: Path) -> None:
    log = RunLog.read(RunDir(encoded_run).run_log) if RunDir(encoded_run).run_log.exists() else RunLog()
    assert RunLog.from_dict(log.to_dict()) == log
    assert RunLog.from_dict({}).last_command is None
    assert (
        RunLog.from_dict({"invocations": [{"command": "encode"}, {"command": "index"}]}).last_command
        == "index"
    )


def test_plan_doc_of_a_plan(encoded_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from carv_attrib.pipeline.plan import PlanConfig, run_plan

    out = tmp_path / "plan.json"
    cfg = PlanConfig(
        run=encoded_run,
        model=str(tiny_model_dir),
        out=out,
        pilot_clips=3,
        bins=4,
        draws=2,
        replicates=2,
        device="cpu",
    )
    result = run_plan(cfg)
    d = read_json(out)
    doc = PlanDoc.read(out)
    assert doc.to_dict() == d == result
    assert (doc.proposal, doc.output_fn, doc.objective, doc.density, doc.schema) == (
        d["proposal"],
        d["output_fn"],
        d["objective"],
        d["density"],
        PLAN_SCHEMA,
    )
    assert doc.rest["recommended"] == d["recommended"] and "proposal" not in doc.rest


# -- tolerant readers ------------------------------------------------------------------------------
LATENTS_CONFIG = {
    "model": {
        "source": "/m",
        "components": {"vae": {"files": {"config.json": "f" * 64}}},
        "fingerprint": "e" * 16,
    },
    "frames": 9,
    "height": 32,
    "width": 32,
    "fps": 8.0,
    "pad_short": False,
    "dtype": "float32",
}


def test_latents_record_missing_optional_keys() -> None:
    """A run from before latent_dtype, vae_tiling and motion_masks, without tool_version/created_at."""
    d = {"fingerprint": "a" * 16, "config": LATENTS_CONFIG}
    rec = LatentsRecord.from_dict(d)
    assert rec.encode is not None and rec.model is not None
    assert (rec.encode.latent_dtype, rec.encode.vae_tiling, rec.encode.motion_masks) == (
        "float32",
        False,
        None,
    )
    assert rec.model.source == "/m" and rec.model.fingerprint == "e" * 16
    assert rec.tool_version == "" and rec.created_at is None
    assert LatentsRecord.from_dict(rec.to_dict()) == rec


def test_stage_records_keep_unknown_keys() -> None:
    d = {
        "fingerprint": "a" * 16,
        "config": LATENTS_CONFIG | {"later": 1},
        "tool_version": "9",
        "created_at": "t",
    }
    rec = LatentsRecord.from_dict(d | {"note": "x"})
    assert rec.extra == {"note": "x"} and rec.config["later"] == 1
    assert rec.to_dict() == d | {"note": "x"}


def test_features_record_missing_optional_keys() -> None:
    rec = FeaturesRecord.from_dict(
        {"fingerprint": "b" * 16, "config": {"latents": "a" * 16, "transformers": ["c"]}}
    )
    assert (rec.output_fn, rec.dtype, rec.objective, rec.draws) == (
        "loss",
        "float32",
        {"kind": "uniform"},
        {},
    )
    assert rec.blocks({"blocks": [8]}) == [8]
    motion = {"kind": "motion", "floor": 0.1}
    rec = FeaturesRecord.from_dict(
        {
            "fingerprint": "b",
            "config": {"transformers": ["c", "d"], "projector": {"dim": 4}, "objective": motion},
        }
    )
    assert rec.objective == motion and rec.blocks({}) == [4, 4]


def test_index_info_missing_optional_keys_and_unknown_keys(featurized_run: Path) -> None:
    d = _stored(RunDir(featurized_run).index_info_path)
    optional = (
        "nprobe", "live_digest", "rerank_vectors", "objective", "created_at", "tool_version", "extra",
        "shards", "build",
    )  # fmt: skip
    old = {k: v for k, v in d.items() if k not in optional} | {"unknown": 1}  # unknown keys: ignored
    old["encode"] = {k: v for k, v in d["encode"].items() if k not in ("vae_tiling", "motion_masks")}
    info = IndexInfo.from_dict(old)
    assert info.objective == {"kind": "uniform"} and info.nprobe is None and info.extra == {}
    assert info.shards == 1 and info.build == {"executor": "local", "parts": 1}  # before --index-shards
    assert info.encode.vae_tiling is False and info.encode.motion_masks is None
    assert "unknown" not in info.to_dict()


def test_index_summary_of_an_old_index() -> None:
    s = IndexSummary.from_dict({"schema_version": 1})
    assert (s.fingerprint, s.count, s.dim, s.preconditioner_kind) == (None, None, None, None)


def test_plan_doc_missing_optional_keys() -> None:
    """A plan from before --output-fn and --objective; a file that is not a plan has no proposal."""
    doc = PlanDoc.from_dict({"proposal": {"bins": []}, "density": "uniform", "pilot": {"clips": 3}})
    assert (doc.output_fn, doc.objective, doc.schema) == ("loss", "uniform", PLAN_SCHEMA)
    assert doc.rest == {"pilot": {"clips": 3}} and PlanDoc.from_dict(doc.to_dict()) == doc
    assert PlanDoc.from_dict({}).proposal is None and "proposal" not in PlanDoc.from_dict({}).to_dict()


@pytest.mark.parametrize("record", [ModelRecord, EncodeFacts])
def test_small_records_round_trip(record: type) -> None:
    facts = EncodeFacts.from_latents_config(LATENTS_CONFIG | {"motion_masks": "flow-v1", "vae_tiling": True})
    x = facts if record is EncodeFacts else ModelRecord.from_dict(LATENTS_CONFIG["model"])
    assert record.from_dict(x.to_dict()) == x
