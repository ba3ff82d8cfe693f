"""`curate`: turn many queries' attributions into a data decision.

From one or more attribution JSONs (`score` over a prompt suite, all against one index), aggregate per
training clip and write the chosen subset of the training data in the form it ships, plus the aggregate
as CSV. The training data is what `encode` read (`store.inputs.detect_input`): a manifest file gives a
subset manifest in its own format (every column kept); WebDataset tar shards, a saved Hugging Face
dataset or a folder of videos with `.txt` sidecars give a folder of the same kind holding only the kept
clips (`store.subsets.write_subset`: tars with the kept samples' members byte-copied under the input
shard names, `Dataset.select` + `save_to_disk`, linked videos and copied sidecars).

Per clip, over the Q scored queries (k_q results each):
  mean      mean score over queries; a clip absent from a query's top-k counts that query's k-th
            score (an upper bound of its own, so absent clips are never favoured);
  rank-sum  Σ_q rank_q, absent = k_q + 1 (lower = more influential; Borda count);
  vote      the number of queries with the clip in their top-k (Motive, arXiv 2601.08828, §4).
`--top P` keeps the P % most influential clips, `--bottom P` the P % least (candidates for removal;
meaningful with `score --top-k all`), `--threshold X` those with mean or vote ≥ X. Ties are broken by
clip id, so the subset is stable. `--exclude` writes the complement instead: every clip of the
training data but the selected ones (`--bottom 10 --exclude`: the data without its 10 % least
supportive clips), clips that no query returned included.

    from carv_attrib.pipeline.curate import CurateConfig, run_curate
    summary = run_curate(CurateConfig(attributions=["a.json"], manifest="train.json", out="keep.json", top=10))
    summary = run_curate(CurateConfig(attributions=["a.json"], manifest="shards/{00000..00009}.tar",
                                      out="keep-shards", top=10))  # keep-shards/00000.tar ... 00009.tar
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carv_attrib.config import CurateConfig
from carv_attrib.errors import UsageError
from carv_attrib.store.inputs import detect_input, read_clips
from carv_attrib.store.manifest import ManifestOptions, nfc, read_rows, write_rows
from carv_attrib.store.shards import atomic_path
from carv_attrib.store.subsets import check_subset_target, write_subset

__all__ = ["CurateConfig", "CurateSummary", "aggregate_clips", "run_curate"]


@dataclass
class ClipAggregate:
    clip_id: int
    vid: str
    caption: str | None
    appearances: int = 0
    score_sum: float = 0.0
    rank_sum: float = 0.0
    mean: float = 0.0
    votes: int = 0


@dataclass
class CurateSummary:
    queries: int
    clips: int  # clips seen in any query's results
    selected: int
    written: int  # manifest rows / clips written (the selected, or with exclude the other, clips found)
    method: str
    out: str
    csv: str | None
    per_query: list[dict[str, Any]] = field(default_factory=list)  # path, selected clips in its top-k
    kind: str = "manifest"  # the input's kind (store.inputs.INPUT_KINDS), so the subset's
    files: int | None = None  # files under OUT (a folder subset); None for a manifest
    bytes: int | None = None  # their total size, bytes
    shards: int | None = None  # tar shards written (webdataset)
    not_in_input: int = 0  # selected clips MANIFEST does not hold (all of them is refused)
    exclude: bool = False  # the subset is every clip but the selected ones


def _load(paths: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    docs, fps = [], set()
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{p}: not a readable attribution JSON ({exc})") from None
        if not isinstance(doc, dict) or "queries" not in doc or "index" not in doc:
            raise UsageError(f"{p}: not an attribution JSON from `carv-attrib score` (no queries/index)")
        fps.add(doc["index"].get("fingerprint"))
        docs.append((Path(p), doc))
    if len(fps) > 1:
        raise UsageError(
            f"the attribution JSONs were scored against different indexes ({', '.join(sorted(map(str, fps)))}); "
            "curate one run at a time"
        )
    return docs


def aggregate_clips(docs: list[dict[str, Any]]) -> tuple[dict[int, ClipAggregate], list[dict[str, Any]]]:
    """Per clip id: appearances, mean score (absent = the query's k-th score), rank sum (absent =
    k+1), votes; and the scored queries (path, their results)."""
    queries = [q for d in docs for q in d["queries"] if q.get("status") == "ok" and q.get("results")]
    if not queries:
        raise UsageError("no scored queries in the attribution JSONs")
    clips: dict[int, ClipAggregate] = {}
    for q in queries:
        for r in q["results"]:
            cid = int(r.get("clip_id_str") or r["clip_id"])  # the string is exact in any reader
            clips.setdefault(cid, ClipAggregate(cid, r.get("vid"), r.get("caption")))
    for q in queries:
        res = q["results"]
        kth, k = res[-1]["score"], len(res)
        seen: dict[int, tuple[int, float]] = {
            int(r.get("clip_id_str") or r["clip_id"]): (r["rank"], r["score"]) for r in res
        }
        for cid, a in clips.items():
            rank, score = seen.get(cid, (k + 1, kth))
            a.score_sum += score
            a.rank_sum += rank
            if cid in seen:
                a.appearances += 1
                a.votes += 1
    for a in clips.values():
        a.mean = a.score_sum / len(queries)
    return clips, queries


def _ranked(clips: dict[int, ClipAggregate], method: str) -> list[ClipAggregate]:
    """Most influential first; ties by clip id (stable subsets)."""
    key = {
        "mean": lambda a: (-a.mean, a.clip_id),
        "rank-sum": lambda a: (a.rank_sum, a.clip_id),
        "vote": lambda a: (-a.votes, -a.mean, a.clip_id),
    }[method]
    return sorted(clips.values(), key=key)


def run_curate(cfg: CurateConfig) -> CurateSummary:
    """Aggregate, select, and write the subset (and the CSV). UsageError (exit 2) for unreadable
    inputs, attributions of different indexes, a manifest without the id column, or a folder OUT that
    overlaps the input or is not empty (without --overwrite); refused before anything is written, and
    a folder subset is written whole or not at all."""
    cfg.validate()
    docs = _load(list(cfg.attributions))
    opts = ManifestOptions(
        id_column=cfg.id_column,
        caption_column=cfg.caption_column,
        path_column=cfg.path_column,
        fmt=cfg.manifest_format,
    )
    kind = detect_input(cfg.manifest, opts)
    rows: list[dict[str, Any]] = []
    if kind == "manifest":
        rows, fmt = read_rows(cfg.manifest, cfg.manifest_format)
        if rows and cfg.id_column not in rows[0]:
            raise UsageError(f"manifest {cfg.manifest}: no column {cfg.id_column!r} (--id-column)")
    else:
        check_subset_target(cfg.manifest, kind, cfg.out, cfg.overwrite)
    clips, queries = aggregate_clips([d for _, d in docs])
    ranked = _ranked(clips, cfg.method)
    if cfg.top is not None:
        selected = ranked[: math.ceil(len(ranked) * cfg.top / 100)]
    elif cfg.bottom is not None:
        selected = ranked[len(ranked) - math.ceil(len(ranked) * cfg.bottom / 100) :]
    else:
        value = (lambda a: a.mean) if cfg.method == "mean" else (lambda a: a.votes)
        selected = [a for a in ranked if value(a) >= cfg.threshold]
    extra: dict[str, Any] = {"kind": kind, "exclude": cfg.exclude}
    # The selection comes from the attributions, the subset from MANIFEST: a MANIFEST that is not the
    # one the run was encoded from (or read with another --id-column) would match nothing, and the
    # subset would silently be empty (or, with --exclude, everything). Checked before any write.
    if kind == "manifest":
        held = {nfc(str(r.get(cfg.id_column))) for r in rows}
        missing = sum(1 for a in selected if a.vid is None or nfc(str(a.vid)) not in held)
    else:
        held_ids = set(read_clips(cfg.manifest, None, opts).clip_id)
        missing = sum(1 for a in selected if a.clip_id not in held_ids)
    if selected and missing == len(selected):
        raise UsageError(
            f"none of the {len(selected)} selected clips is in {cfg.manifest} (matched by "
            f"{'--id-column ' + repr(cfg.id_column) if kind == 'manifest' else 'clip id'}): give the input "
            "the run was encoded from, read with the same --id-column"
        )
    extra["not_in_input"] = missing
    if kind == "manifest":
        chosen = {nfc(str(a.vid)) for a in selected if a.vid is not None}
        subset = [r for r in rows if (nfc(str(r[cfg.id_column])) in chosen) != cfg.exclude]
        write_rows(cfg.out, subset, fmt)
        written = len(subset)
    else:  # the clip ids encode gave the clips of this input (store.inputs: clip_id_for(id))
        chosen_ids = {a.clip_id for a in selected}
        w = write_subset(cfg.manifest, kind, chosen_ids, cfg.out, opts, cfg.overwrite, cfg.exclude)
        written = w.clips
        extra.update(files=w.files, bytes=w.bytes, shards=w.shards)
    if cfg.csv is not None:
        _write_csv(Path(cfg.csv), ranked, {a.clip_id for a in selected})
    chosen_ids = {a.clip_id for a in selected}
    per_query = [
        {
            "path": q["path"],
            "selected_in_top_k": sum(
                int(r.get("clip_id_str") or r["clip_id"]) in chosen_ids for r in q["results"]
            ),
            "k": len(q["results"]),
        }
        for q in queries
    ]
    return CurateSummary(
        queries=len(queries),
        clips=len(clips),
        selected=len(selected),
        written=written,
        method=cfg.method,
        out=str(cfg.out),
        csv=None if cfg.csv is None else str(cfg.csv),
        per_query=per_query,
        **extra,
    )


def _write_csv(path: Path, ranked: list[ClipAggregate], selected: set[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "order",
                "clip_id_str",
                "vid",
                "caption",
                "appearances",
                "mean_score",
                "rank_sum",
                "votes",
                "selected",
            ]
        )
        for i, a in enumerate(ranked, start=1):
            w.writerow([i, str(a.clip_id), a.vid, a.caption, a.appearances, f"{a.mean:.6g}", a.rank_sum, a.votes,
                        int(a.clip_id in selected)])  # fmt: skip
