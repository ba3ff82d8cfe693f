"""The attribution JSON schema's enums are the names of carv_attrib.choices: adding a name to an
axis without the schema (or the reverse) fails here, not at a user's validation time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carv_attrib import choices
from carv_attrib.pipeline.score import CONDITIONINGS
from carv_attrib.search import scale, sketch, uncertainty

SCHEMA = Path(__file__).resolve().parents[1] / "carv_attrib" / "schemas" / "attribution.schema.json"

# schema path of each enum -> the names it must list (None: a fixed value set of the document itself)
EXPECTED: dict[str, tuple[str, ...] | None] = {
    "index/estimator/scheme": choices.SCHEMES,
    "index/estimator/noise": choices.NOISE_MODES,
    "index/estimator/output_fn": choices.OUTPUT_FNS,
    "index/estimator/objective/kind": choices.OBJECTIVES,
    "index/projector/kind": choices.PROJECTORS,
    "index/preconditioner/kind": choices.PRECONDITIONERS,
    "index/sketch/kind": sketch.SKETCH_KINDS,
    "aggregate/method": tuple(a for a in choices.AGGREGATES if a != "none"),  # none: no aggregate key
    "queries/status": None,
    "queries/conditioning": CONDITIONINGS,
    "queries/null_prompt/status": None,
    "queries/scale/method": scale.METHODS,
    "queries/uncertainty/method": uncertainty.SE_METHODS,
    "queries/uncertainty/clip_side": uncertainty.CLIP_SIDES,
}


def _enums(node: object, path: tuple[str, ...] = ()) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if isinstance(node, dict):
        if "enum" in node:
            out["/".join(path)] = node["enum"]
        for key, value in node.items():
            # the path names the document's fields only: properties/items are the schema's grammar
            out |= _enums(value, path if key in ("properties", "items") else (*path, key))
    return out


def test_every_schema_enum_is_checked() -> None:
    assert set(_enums(json.loads(SCHEMA.read_text()))) == set(EXPECTED)


@pytest.mark.parametrize("path", [p for p, names in EXPECTED.items() if names is not None])
def test_schema_enum_equals_the_choices(path: str) -> None:
    assert tuple(_enums(json.loads(SCHEMA.read_text()))[path]) == EXPECTED[path]


def test_failure_kinds_are_listed_in_readme_and_the_decoder_docstring() -> None:
    """Each per-clip status `FAILURE_KINDS` names is in README's failure list and decode's docstring
    (or the pool's / VAE's, which set the rest), so a new kind cannot reach users undocumented."""
    import re

    from carv_attrib.video import decode
    from carv_attrib.video.failures import FAILURE_KINDS

    readme = (SCHEMA.parents[2] / "README.md").read_text()
    paragraph = readme[readme.index("becomes a recorded per-clip failure") :].split("\n\n")[0]
    assert [k for k in re.findall(r"`([a-z_]+)`", paragraph) if k != "status"] == list(FAILURE_KINDS)
    listed = set(re.findall(r"^- `([a-z_]+)`", decode.__doc__ or "", re.M))
    listed |= set(re.findall(r"`([a-z_]+)`, `([a-z_]+)`: set by `DecodePool`", decode.__doc__ or "")[0])
    assert set(FAILURE_KINDS) - listed == {"encode_error"}  # the VAE's, documented in clip_encoder
