"""pipeline/curate.py on hand-made attribution documents: aggregation (mean with absent = k-th score,
rank-sum with absent = k+1, votes), selection, the subset in the manifest's own format, the CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from carv_attrib.config import CurateConfig
from carv_attrib.errors import UsageError
from carv_attrib.pipeline.curate import aggregate_clips, run_curate
from carv_attrib.store.manifest import clip_id_for, read_rows

VIDS = ["a", "b", "c", "d", "e"]


def _doc(fp: str, queries: list[list[tuple[str, float]]]) -> dict:
    def res(ranked):
        return [
            {"rank": i, "clip_id": clip_id_for(v), "clip_id_str": str(clip_id_for(v)), "vid": v,
             "caption": f"cap {v}", "path": f"/v/{v}.mp4", "score": s}
            for i, (v, s) in enumerate(ranked, start=1)
        ]  # fmt: skip

    return {
        "schema_version": "1.1",
        "index": {"fingerprint": fp},
        "queries": [
            {"path": f"q{i}.mp4", "prompt": "p", "status": "ok", "results": res(q)}
            for i, q in enumerate(queries)
        ]
        + [{"path": "bad.mp4", "prompt": "p", "status": "error", "error": "x", "results": []}],
    }


QUERIES = [
    [("a", 0.9), ("b", 0.8), ("c", 0.7)],
    [("a", 0.95), ("c", 0.6), ("d", 0.5)],
    [("b", 0.9), ("a", 0.85), ("e", 0.1)],
]


def test_aggregates_follow_their_definitions() -> None:
    clips, queries = aggregate_clips([_doc("f", QUERIES)])
    by = {a.vid: a for a in clips.values()}
    assert len(queries) == 3  # the failed query is skipped
    assert by["a"].votes == 3 and by["a"].rank_sum == 1 + 1 + 2
    assert by["a"].mean == pytest.approx((0.9 + 0.95 + 0.85) / 3, rel=0, abs=4 * 2.0**-52)
    # d appears once (rank 3, 0.5); elsewhere it counts k+1 = 4 and the k-th scores 0.7, 0.1
    assert by["d"].votes == 1 and by["d"].rank_sum == 4 + 3 + 4
    assert by["d"].mean == pytest.approx((0.7 + 0.5 + 0.1) / 3, rel=0, abs=4 * 2.0**-52)


@pytest.mark.parametrize("fmt", ["vidgen", "jsonl", "csv", "parquet"])
def test_the_subset_keeps_the_manifests_format_and_columns(tmp_path: Path, fmt: str) -> None:
    rows = [{"vid": v, "caption": f"cap {v}", "extra": f"x{v}"} for v in VIDS]
    ext = {"vidgen": "json", "jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}[fmt]
    manifest = tmp_path / f"train.{ext}"
    if fmt == "vidgen":
        manifest.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        with open(manifest, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["vid", "caption", "extra"])
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), manifest)
    (tmp_path / "a.json").write_text(json.dumps(_doc("f", QUERIES[:2])))
    (tmp_path / "b.json").write_text(json.dumps(_doc("f", QUERIES[2:])))
    out = tmp_path / f"keep.{ext}"
    s = run_curate(
        CurateConfig(
            attributions=[tmp_path / "a.json", tmp_path / "b.json"], manifest=manifest, out=out, top=40,
            csv=tmp_path / "agg.csv",
        )
    )  # fmt: skip
    got, got_fmt = read_rows(out)
    assert got_fmt == fmt and [r["vid"] for r in got] == ["a", "b"]  # manifest order, all columns
    assert got[0]["extra"] == "xa"
    assert (s.queries, s.clips, s.selected, s.written) == (3, 5, 2, 2)
    assert [q["selected_in_top_k"] for q in s.per_query] == [2, 1, 2]
    table = list(csv.DictReader(open(tmp_path / "agg.csv")))
    assert [r["vid"] for r in table][:2] == ["a", "b"] and table[0]["clip_id_str"] == str(clip_id_for("a"))


def test_bottom_threshold_and_refusals(tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"vid": v, "caption": "c"} for v in VIDS]))
    (tmp_path / "a.json").write_text(json.dumps(_doc("f", QUERIES)))

    def curate(**kw):
        return run_curate(
            CurateConfig(attributions=[tmp_path / "a.json"], manifest=manifest, out=tmp_path / "o.json", **kw)
        )

    curate(bottom=20)
    assert [r["vid"] for r in json.loads((tmp_path / "o.json").read_text())] == ["e"]
    curate(threshold=2, method="vote")
    assert [r["vid"] for r in json.loads((tmp_path / "o.json").read_text())] == ["a", "b", "c"]
    curate(top=20, method="rank-sum")
    assert [r["vid"] for r in json.loads((tmp_path / "o.json").read_text())] == ["a"]
    (tmp_path / "b.json").write_text(json.dumps(_doc("other-index", QUERIES)))
    with pytest.raises(UsageError, match="different indexes"):
        run_curate(CurateConfig(attributions=[tmp_path / "a.json", tmp_path / "b.json"], manifest=manifest,
                                out=tmp_path / "x.json", top=10))  # fmt: skip
    with pytest.raises(UsageError, match="exactly one of"):
        curate(top=10, bottom=10)
    assert not (tmp_path / "x.json").exists()


def test_a_manifest_that_holds_none_of_the_selection_is_refused(tmp_path: Path) -> None:
    """Another input (or another --id-column) would give an empty subset, or with --exclude all of
    it, silently: refused before anything is written; a partial match is counted in the summary."""
    (tmp_path / "a.json").write_text(json.dumps(_doc("f", QUERIES)))
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"vid": f"z{i}", "caption": "c"} for i in range(5)]))
    for exclude in (False, True):
        with pytest.raises(UsageError, match="none of the 5 selected clips is in"):
            run_curate(CurateConfig(attributions=[tmp_path / "a.json"], manifest=other,
                                    out=tmp_path / "o.json", top=100, exclude=exclude))  # fmt: skip
    assert not (tmp_path / "o.json").exists()
    some = tmp_path / "some.json"
    some.write_text(json.dumps([{"vid": v, "caption": "c"} for v in ("a", "b", "q")]))
    s = run_curate(
        CurateConfig(attributions=[tmp_path / "a.json"], manifest=some, out=tmp_path / "o.json", top=100)
    )
    assert (s.selected, s.written, s.not_in_input) == (5, 2, 3)
