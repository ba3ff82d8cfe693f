"""Caption versus video on the demo run: how much of a query's top-k stays when its caption is replaced
by the empty text (`score --null-prompt`)?

Queries, against the demo run's index (`carv-attrib demo`: 24 synthetic clips, the tiny Wan2.1 trained
150 steps, K = 8 stratified-is draws, kron projection, normalize index):
- generated: G videos the demo's trained pipeline generates (`pipeline.generate.generate_video`: 17
  frames 64x64, 12 steps, guidance 3 against negative prompt "", seed 0, the demo's own settings) for
  the captions of training clips 0..G-1, each scored with that caption (the demo's generated.mp4 is
  the first);
- training: every training clip, scored with its own caption.
All are scored in one `run_score(ScoreConfig(null_prompt=True, explain=True, top_k=10))`, the same as

    carv-attrib score --prompts prompts.json --run RUN --null-prompt --explain -k 10 -o null.json

and once more without --null-prompt, to check that the captioned rankings do not change with it.

Per query: top-k overlap |top-k ∩ null top-k| / k for k = 5, 10; the rank of the query clip itself
(training queries); precision@5 of appearance (same colour and shape as the query's caption) and of
motion (same direction) in both rankings; the `explain.by_kind` shares of the top-5 results' scores
(by_kind[kind] / total, averaged over the query's top 5); the mean top-5 overlap between the rankings
of two different queries (near 1: the ranking hardly depends on the query). Reported as mean ± SE
(sd / √n) over the queries of each group, beside chance (random top-k lists share k/N of their clips).

    .venv/bin/python bench/null_prompt.py                   # builds bench/_work/null_prompt/demo-run
    .venv/bin/python bench/null_prompt.py --demo /tmp/demo  # copies a finished demo dir (never writes it)
    # -> bench/results/null_prompt.json

The generated videos are kept in bench/_work/null_prompt/generated (a rerun reuses them: its
"generate" seconds count only the videos it made). Timings are wall seconds on a shared machine
(`load_avg`), not a cost measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import load_avg, machine_info, write_json  # noqa: E402

from carv_attrib.config import ScoreConfig  # noqa: E402
from carv_attrib.lds.synthetic import write_mp4  # noqa: E402
from carv_attrib.pipeline.generate import generate_video  # noqa: E402
from carv_attrib.pipeline.score import run_score  # noqa: E402
from carv_attrib.search.explain import KINDS  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "null_prompt"
OUT = Path(__file__).resolve().parent / "results" / "null_prompt.json"
CAPTION = re.compile(r"^an? (\w+) (\w+) moving (\w+) over an? (\w+) background$")  # lds.synthetic's
TOP_K = 10
KS = (5, 10)


def mean_se(xs: list[float]) -> dict[str, Any]:
    """{mean, se, n}: se = sd / √n (None for n < 2)."""
    n = len(xs)
    if n == 0:
        return {"mean": None, "se": None, "n": 0}
    se = statistics.stdev(xs) / math.sqrt(n) if n > 1 else None
    return {"mean": statistics.fmean(xs), "se": se, "n": n}


def attributes(caption: str) -> tuple[str, str, str, str]:
    """(colour, shape, direction, background) of a demo caption; ValueError for another form."""
    m = CAPTION.match(caption)
    if m is None:
        raise ValueError(f"not a demo caption: {caption!r}")
    return m.group(1), m.group(2), m.group(3), m.group(4)


def overlap(a: list[dict[str, Any]], b: list[dict[str, Any]], k: int) -> float:
    """|top-k of a ∩ top-k of b| / k by clip id."""
    return len({r["clip_id"] for r in a[:k]} & {r["clip_id"] for r in b[:k]}) / k


def precision(rows: list[dict[str, Any]], caption: str, k: int = 5) -> dict[str, float]:
    """Share of the top-k clips whose caption has the query caption's colour and shape (appearance) /
    its direction (motion)."""
    colour, shape, direction, _ = attributes(caption)
    got = [attributes(r["caption"]) for r in rows[:k]]
    return {
        "appearance": sum(g[0] == colour and g[1] == shape for g in got) / k,
        "motion": sum(g[2] == direction for g in got) / k,
    }


def chance(manifest: list[dict[str, Any]], caption: str) -> dict[str, float]:
    """The precision a random top-k would have: the share of all training clips with the caption's colour
    and shape / its direction."""
    colour, shape, direction, _ = attributes(caption)
    got = [attributes(r["caption"]) for r in manifest]
    return {
        "appearance": sum(g[0] == colour and g[1] == shape for g in got) / len(got),
        "motion": sum(g[2] == direction for g in got) / len(got),
    }


def cross_query_overlap(rows: list[list[dict[str, Any]]], k: int = 5) -> dict[str, Any]:
    """Mean top-k overlap between the rankings of two different queries, over all pairs: near 1, the
    ranking hardly depends on the query (a common direction dominates every query's gradient)."""
    pairs = [overlap(a, b, k) for i, a in enumerate(rows) for b in rows[i + 1 :]]
    return {"mean": statistics.fmean(pairs) if pairs else None, "pairs": len(pairs)}


def kind_shares(rows: list[dict[str, Any]], k: int = 5) -> dict[str, float]:
    """Mean over the top-k results of by_kind[kind] / total (the explain split's shares; a share can be
    negative or exceed 1 where terms cancel)."""
    return {
        kind: statistics.fmean(r["explain"]["by_kind"][kind] / r["explain"]["total"] for r in rows[:k])
        for kind in KINDS
    }


def per_query(q: dict[str, Any], self_vid: str | None, manifest: list[dict[str, Any]]) -> dict[str, Any]:
    """One query's measures from its document entry (captioned `results`, null `null_prompt.results`)."""
    cap, null = q["results"], q["null_prompt"]["results"]
    out: dict[str, Any] = {
        "path": Path(q["path"]).name,
        "prompt": q["prompt"],
        **{f"top{k}_overlap": overlap(cap, null, k) for k in KS},
        "doc_top_k_overlap": q["null_prompt"]["top_k_overlap"],
        "precision5": {
            "caption": precision(cap, q["prompt"]),
            "null": precision(null, q["prompt"]),
            "chance": chance(manifest, q["prompt"]),
        },
        "by_kind_share_top5": {"caption": kind_shares(cap), "null": kind_shares(null)},
        "top5": {"caption": [r["vid"] for r in cap[:5]], "null": [r["vid"] for r in null[:5]]},
    }
    if self_vid is not None:
        rank = lambda rows: next((r["rank"] for r in rows if r["vid"] == self_vid), None)  # noqa: E731
        out["self_rank"] = {"caption": rank(cap), "null": rank(null)}
    return out


def summary(rows: list[dict[str, Any]], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """mean ± SE over the queries of a group (`rows` from `per_query`, `docs` their document entries)."""
    out: dict[str, Any] = {f"top{k}_overlap": mean_se([r[f"top{k}_overlap"] for r in rows]) for k in KS}
    out["cross_query_top5_overlap"] = {
        "caption": cross_query_overlap([q["results"] for q in docs]),
        "null": cross_query_overlap([q["null_prompt"]["results"] for q in docs]),
    }
    for side in ("caption", "null", "chance"):
        out[f"precision5_{side}"] = {
            a: mean_se([r["precision5"][side][a] for r in rows]) for a in ("appearance", "motion")
        }
    for side in ("caption", "null"):
        out[f"by_kind_share_top5_{side}"] = {
            kind: mean_se([r["by_kind_share_top5"][side][kind] for r in rows]) for kind in KINDS
        }
    if rows and "self_rank" in rows[0]:
        for side in ("caption", "null"):
            out[f"self_at_1_{side}"] = sum(r["self_rank"][side] == 1 for r in rows)
            out[f"self_in_top10_{side}"] = sum(r["self_rank"][side] is not None for r in rows)
    return out


def demo_dir(source: Path | None) -> Path:
    """A demo directory of this bench's own: a copy of `source` (never written), else built."""
    demo = WORK / "demo-run"
    if source is not None:
        if demo.exists():
            shutil.rmtree(demo)
        WORK.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, demo)
    elif not (demo / "run" / "index").exists():
        WORK.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("carv-attrib")
        subprocess.run([str(exe), "demo", str(demo)], check=True, stdout=subprocess.DEVNULL)
    return demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=None, help="a finished `carv-attrib demo` directory to copy")
    ap.add_argument("--generated", type=int, default=8, help="generated query videos (G)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    t0 = time.monotonic()
    demo = demo_dir(args.demo)
    manifest = json.loads((demo / "data" / "manifest.json").read_text())
    videos = demo / "data" / "videos"
    gen = WORK / "generated"
    gen.mkdir(parents=True, exist_ok=True)
    prompts: dict[str, str] = {}
    kind_of: dict[str, tuple[str, str | None]] = {}  # query file name -> (group, its own training vid)
    t_gen = time.monotonic()
    for j, row in enumerate(manifest[: args.generated]):
        path = gen / f"gen-{j:02d}.mp4"
        if j == 0 and (demo / "generated.mp4").exists():  # the demo's own, for clip 0's caption
            shutil.copyfile(demo / "generated.mp4", path)
        elif not path.exists():
            frames = generate_video(str(demo / "model"), row["caption"], 17, 64, 64, 12, 0, args.device)
            write_mp4(path, frames, fps=8)
        prompts[str(path)] = row["caption"]
        kind_of[path.name] = ("generated", None)
    t_gen = time.monotonic() - t_gen
    for row in manifest:
        prompts[str(videos / f"{row['vid']}.mp4")] = row["caption"]
        kind_of[f"{row['vid']}.mp4"] = ("training", row["vid"])
    prompts_file = WORK / "prompts.json"
    prompts_file.write_text(json.dumps(prompts, indent=1))
    run = demo / "run"
    # the copy's own model (the run records the demo's original path; the fingerprints are checked)
    common = dict(
        run=run,
        queries=[],
        prompts_file=prompts_file,
        top_k=TOP_K,
        device=args.device,
        model=str(demo / "model"),
    )
    t_score = time.monotonic()
    doc = run_score(ScoreConfig(null_prompt=True, explain=True, **common), out=WORK / "null.json")
    t_score = time.monotonic() - t_score
    t_plain = time.monotonic()
    plain = run_score(ScoreConfig(**common), out=WORK / "plain.json")
    t_plain = time.monotonic() - t_plain
    same = sum(
        [r["clip_id"] for r in a["results"]] == [r["clip_id"] for r in b["results"]]
        for a, b in zip(doc["queries"], plain["queries"])
    )
    groups: dict[str, list[dict[str, Any]]] = {"generated": [], "training": []}
    entries: dict[str, list[dict[str, Any]]] = {"generated": [], "training": []}
    for q in doc["queries"]:
        group, vid = kind_of[Path(q["path"]).name]
        groups[group].append(per_query(q, vid, manifest))
        entries[group].append(q)
    out = {
        "what": "top-k overlap of each query's captioned ranking with its empty-text (--null-prompt) ranking",
        "command": "score --prompts prompts.json --run RUN --null-prompt --explain -k 10 (run_score)",
        "demo": {"clips": len(manifest), "index": doc["index"]["preconditioner"], "dim": doc["index"]["dim"]},
        "top_k": TOP_K,
        # two top-k lists drawn at random from N clips share k²/N clips on average: overlap k/N
        "chance_top_k_overlap": {f"top{k}": k / len(manifest) for k in KS},
        "captioned_rankings_unchanged_by_null_prompt": f"{same} of {len(doc['queries'])}",
        "warnings": doc["warnings"],
        "summary": {g: summary(rows, entries[g]) for g, rows in groups.items()},
        "queries": groups,
        "seconds": {
            "generate": round(t_gen, 1),
            "score_null_explain": round(t_score, 1),
            "score_plain": round(t_plain, 1),
            "total": round(time.monotonic() - t0, 1),
        },
        "load_avg": load_avg(),
        "machine": machine_info(),
    }
    write_json(OUT, out)
    for g, s in out["summary"].items():
        o5, o10 = s["top5_overlap"], s["top10_overlap"]
        print(f"{g}: n={o5['n']} top-5 overlap {o5['mean']:.3f} ± {o5['se'] or 0:.3f}, "
              f"top-10 {o10['mean']:.3f} ± {o10['se'] or 0:.3f}")  # fmt: skip
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
