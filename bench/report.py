"""Markdown tables for README from the committed benchmark JSON (nothing is recomputed).

.venv/bin/python bench/report.py factors   # LDS per world and factor (bench/results/factors.json)
.venv/bin/python bench/report.py ecm       # honest ECM (bench/results/ecm.json)
.venv/bin/python bench/report.py incremental   # a grown run (bench/results/incremental.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _cell(row: dict) -> str:
    lds = row["lds"]
    return f"{lds['mean']:.3f} [{lds['ci95'][0]:.2f}, {lds['ci95'][1]:.2f}]"


LABELS = {
    "default": "old default (loss, kron 8x8, stratified-is, cosine)",
    "kron-16x16-sqnorm": "**new default** (sqnorm, kron 16x16, stratified-is, cosine)",
}


def factors() -> None:
    doc = json.loads((RESULTS / "factors.json").read_text())
    worlds = doc["worlds"]
    names = list(worlds)
    print("| setting | draws | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    order = list(next(iter(worlds.values()))["variants"])
    for v in order:
        cells = []
        for w in names:
            row = worlds[w]["variants"].get(v)
            if row is None:
                cells.append("")
                continue
            ref = worlds[w]["variants"]["exact-256"]["lds"]["mean"]
            cells.append(f"{_cell(row)} ({row['lds']['mean'] / ref:.2f}×)")
        draws = next(worlds[w]["variants"][v]["draws"] for w in names if v in worlds[w]["variants"])
        print(f"| {LABELS.get(v, v)} | {draws} | " + " | ".join(cells) + " |")
    print(
        "| random scores (mean ± sd) | | "
        + " | ".join(f"{worlds[w]['random']['mean']:.3f} ± {worlds[w]['random']['sd']:.3f}" for w in names)
        + " |"
    )


def ecm(name: str = "ecm_sqnorm.json") -> None:
    doc = json.loads((RESULTS / name).read_text())
    s = doc["summary"]
    rho = s["costs"]["rho"]
    wheres = list(rho)
    print(
        "| method | Var_a/Var raw | stored | score | "
        + " | ".join(f"ECM stored, ρ {rho[w]:.3g} ({w})" for w in wheres)
        + " | bias p (Bonferroni) |"
    )
    print("|---|---|---|---|" + "---|" * len(wheres) + "---|")
    for name, r in doc["methods"].items():
        v = r["variance_factor_vs_baseline"]
        e = " | ".join(f"{r['ecm'][w]['stored']:.2f}" for w in wheres)
        z = r.get("bias_p_bonferroni")
        print(
            f"| {name} | {v['raw']:.2f} | {v['stored']:.2f} | {v['score']:.2f} | {e} | {'' if z is None else f'{z:.3f}'} |"
        )
    print()
    print("reuse factor K(ρ+1)/(ρ+K): " + ", ".join(f"{w} {x:.2f}" for w, x in s["reuse_factor"].items()))


def incremental() -> None:
    doc = json.loads((RESULTS / "incremental.json").read_text())
    c, m, r = doc["config"], doc["median"], doc["incremental_over_scratch"]
    print("| side | clips computed | encode s | featurize s | index s | total s |")
    print("|---|---|---|---|---|---|")
    labels = {
        "from_scratch": f"from scratch ({c['base_clips'] + c['added_clips']} clips)",
        "incremental": f"incremental (+{c['added_clips']} on {c['base_clips']})",
        "unchanged_rerun": "rerun, nothing changed",
    }
    for side, label in labels.items():
        x = m[side]
        print(
            f"| {label} | {x['encoded']} / {x['featurized']} | {x['encode_s']:.2f} | {x['featurize_s']:.2f} "
            f"| {x['index_s']:.3f} | {x['total_s']:.2f} |"
        )
    print(
        f"| **incremental / scratch** | | **{r['encode_s']:.2f}** | **{r['featurize_s']:.2f}** | "
        f"{r['index_s']:.2f} | **{r['total_s']:.2f}** |"
    )
    fit = doc["fit_fixed_plus_per_clip"]
    print()
    print(
        "fixed + per-clip fit: "
        + "; ".join(f"{k[:-2]} {v['fixed_s']:.2f} s + {v['per_clip_s']:.3f} s/clip" for k, v in fit.items())
    )


if __name__ == "__main__":
    {"factors": factors, "ecm": ecm, "incremental": incremental}[sys.argv[1]](*sys.argv[2:])
