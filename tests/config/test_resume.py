"""config/resume.py: the precedence command line > --config > RUN/run.json > default, field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carv_attrib.config import EncodeConfig, FeaturizeConfig
from carv_attrib.config.resume import (
    RESET_EACH_TIME,
    file_options,
    merge_options,
    read_config_file,
    recorded_options,
    stored_options,
)
from carv_attrib.errors import UsageError

COMMANDS = {"encode", "featurize", "index", "score", "plan"}


def test_recorded_options_are_json_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = EncodeConfig(manifest=Path("m.json"), model="models/x", run=Path("runs/a"), frames=9)
    opts = recorded_options(cfg)
    assert json.loads(json.dumps(opts)) == opts
    assert opts["manifest"] == str(tmp_path / "m.json") and opts["run"] == str(tmp_path / "runs" / "a")
    assert opts["model"] == "models/x"  # a str field (a Hub id or a directory) is kept as typed
    assert opts["frames"] == 9


def test_stored_options_are_the_last_of_the_command(tmp_path: Path) -> None:
    entries = [
        {"command": "encode", "options": {"frames": 9}},
        {"command": "featurize", "options": {"draws": 4}},
        {"command": "encode", "options": {"frames": 17}},
        {"command": "encode"},  # an older version's entry, without options
    ]
    (tmp_path / "run.json").write_text(json.dumps({"invocations": entries}))
    assert stored_options(tmp_path, "encode") == {"frames": 17}
    assert stored_options(tmp_path, "featurize") == {"draws": 4}
    assert stored_options(tmp_path, "score") == {}
    assert stored_options(tmp_path / "nope", "encode") == {}
    (tmp_path / "run.json").write_text("{not json")
    assert stored_options(tmp_path, "encode") == {}


def test_precedence_field_by_field() -> None:
    given = {"run": Path("r"), "model": None, "draws": 8, "overwrite": False, "seed": 0}
    merged, source = merge_options(
        FeaturizeConfig,
        given | {"seed": 3},
        explicit={"run", "seed"},
        from_file={"draws": 16, "seed": 5},
        stored={"model": "/m", "draws": 4, "seed": 7, "overwrite": True},
    )
    assert merged["seed"] == 3 and source["seed"] == "command line"  # typed beats everything
    assert merged["draws"] == 16 and source["draws"] == "--config"  # the file beats the run
    assert merged["model"] == "/m" and source["model"] == "run.json"
    assert merged["overwrite"] is False and "overwrite" in RESET_EACH_TIME  # one-shot: never resumed


def test_file_options_table_and_top_level(tmp_path: Path) -> None:
    doc = {"model": "/m", "draws": 2, "encode": {"frames": 33, "batch-size": 2}, "featurize": {"draws": 16}}
    assert file_options(doc, "encode", EncodeConfig, tmp_path, COMMANDS) == {
        "model": "/m",
        "frames": 33,
        "batch_size": 2,
    }
    assert file_options(doc, "featurize", FeaturizeConfig, tmp_path, COMMANDS) == {"model": "/m", "draws": 16}


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"encode": {"framez": 5}}, r"\[encode\] framez is not an option of `carv-attrib encode`"),
        ({"ecnode": {"frames": 5}}, r"\[ecnode\] is not a command"),
    ],
)
def test_file_options_refuse_unknown_keys(tmp_path: Path, doc: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        file_options(doc, "encode", EncodeConfig, tmp_path, COMMANDS)


def test_read_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        read_config_file(tmp_path / "none.toml")
    with pytest.raises(UsageError, match="is a directory"):
        read_config_file(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[encode\nframes = ")
    with pytest.raises(UsageError, match="not valid TOML"):
        read_config_file(bad)
    good = tmp_path / "good.toml"
    good.write_text('model = "m"\n[encode]\nframes = 9\n')
    assert read_config_file(good) == {"model": "m", "encode": {"frames": 9}}


def test_score_carries_over_how_it_runs_not_what_it_asks() -> None:
    from carv_attrib.config import ScoreConfig
    from carv_attrib.config.resume import reset_fields

    stored = {"model": "/m", "device": "cpu", "top_k": 3, "prompts_file": "/p.json", "refine": True}
    given = {
        "run": Path("r"),
        "model": None,
        "device": "auto",
        "top_k": 10,
        "prompts_file": None,
        "refine": False,
    }
    merged, _ = merge_options(ScoreConfig, given, {"run"}, {}, stored, reset_fields("score"))
    assert (merged["model"], merged["device"]) == ("/m", "cpu")
    assert (merged["top_k"], merged["prompts_file"], merged["refine"]) == (10, None, False)
    assert "objective" not in reset_fields("featurize")  # the run's objective does carry over
