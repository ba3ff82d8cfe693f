"""Markdown tables for README from the committed benchmark JSON (nothing is recomputed).

.venv/bin/python bench/report.py factors   # LDS per world and factor (bench/results/factors.json)
.venv/bin/python bench/report.py ecm       # honest ECM (bench/results/ecm.json)
.venv/bin/python bench/report.py incremental   # a grown run (bench/results/incremental.json)
.venv/bin/python bench/report.py index_scale   # factories at 10^4..10^6 (bench/results/index_scale.json)
.venv/bin/python bench/report.py real_shapes   # Wan2.1-1.3B shapes (bench/results/real_shapes.json)
.venv/bin/python bench/report.py motion        # motion vs appearance attribution (bench/results/motion.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _cell(row: dict, ratio: bool = True) -> str:
    lds = row["lds"]
    out = f"{lds['mean']:.3f} [{lds['ci95'][0]:.2f}, {lds['ci95'][1]:.2f}]"
    return out + (f" ({row['ratio']:.2f}×)" if ratio and "ratio" in row else "")


def _key(key: str) -> str:
    """A study row's key (job|features|preconditioner) for a markdown cell, where `|` splits cells."""
    return key.replace("|", " · ")


def _short(name: str) -> str:
    for long, short in (("scratch-", "s-"), ("ft-", "f-")):
        if name.startswith(long):
            return short + name[len(long) :]
    return name


def factors(which: str = "worlds") -> None:
    """Tables of bench/results/factors.json: `worlds` (per world: references, random, defaults),
    `ranked` (shippable settings by their worst world), `diagnosis` (one factor at a time),
    `projection`, `fidelity`, `calibration`."""
    doc = json.loads((RESULTS / "factors.json").read_text())
    worlds = doc["worlds"]
    sel = doc.get("selection", {})
    # label -> study row of the tool's settings (bench/factors.py SHIPPED, via the JSON)
    shipped = {v["label"]: k for k, v in sel.get("shipped", {}).items()}
    if which == "worlds":
        cols = [
            ("fixed reference, CRN (K=256)", "ref-crn-256|all/none|identity"),
            ("fixed reference, per-clip draws (K=256)", "ref-per-clip-256|all/none|identity"),
            ("unprojected loss, CRN, K=8, grad-dot", "loss-sis-8|all/none|identity"),
            *[(f"tool: {k.split('|', 1)[1]}", k) for k in worlds[next(iter(worlds))]["rows"] if k.startswith("product|")],
            *[(f"{label}: {_key(k)}", k) for label, k in shipped.items()],
        ]  # fmt: skip
        print("| world | " + " | ".join(c for c, _ in cols) + " | random (mean ± sd) |")
        print("|---|" + "---|" * len(cols) + "---|")
        for name, w in worlds.items():
            cells = [(_cell(w["rows"][k]) if k in w["rows"] else "") for _, k in cols]
            r = w["random"]
            print(f"| {name} | " + " | ".join(cells) + f" | {r['mean']:.3f} ± {r['sd']:.3f} |")
        print()
        built = json.loads((RESULTS / "worlds.json").read_text())["worlds"]
        for name, w in worlds.items():
            secs = built.get(name, {}).get("build_seconds")
            cost = f" (built in {secs / 60:.0f} min)" if secs else ""
            print(f"- **{name}**: {w['description']}{cost}")
    elif which == "parts":
        # LDS = common factor + query-specific part (evaluate.lds): the part that tells queries apart
        keys = [("fixed reference, CRN (K=256)", "ref-crn-256|all/none|identity"), *shipped.items()]
        print(
            "| world | query-gt correlation | "
            + " | ".join(f"{c}: query-specific / common factor" for c, _ in keys)
            + " |"
        )
        print("|---|---|" + "---|" * len(keys))
        for name, w in worlds.items():
            cells = []
            for _, k in keys:
                row = w["rows"].get(k, {})
                qs, cf = row.get("query_specific"), row.get("common_factor")
                cells.append(f"{qs['mean']:.3f} / {cf['mean']:.3f}" if qs and cf else "")
            print(
                f"| {name} | {w.get('query_gt_correlation', float('nan')):.2f} | " + " | ".join(cells) + " |"
            )
    elif which == "ranked":
        # selection rule (bench/factors.py select): the worst world's LDS − fixed reference LDS
        sig = sel["worlds_with_reference_signal"]
        print(
            "| setting | worst world: LDS − reference (world) | mean over worlds | "
            + " | ".join(_short(w) for w in sel["worlds"])
            + " | ratio to reference where it has signal ("
            + ", ".join(_short(w) for w in sig)
            + ") | query-specific ratio, min |"
        )
        print("|---|---|---|" + "---|" * len(sel["worlds"]) + "---|---|")
        shown = [(r["setting"], r) for r in sel["ranked"][:10]]
        shown += [(k, v) for k, v in sel.get("shipped", {}).items() if k not in dict(shown)]
        for key, row in shown:
            d = row["diff_to_reference"]
            worst = min(d, key=d.get)
            cells = " | ".join(f"{d[w]:+.3f}" for w in sel["worlds"])
            ratio = ", ".join(f"{row['ratios'][w]:.2f}×" for w in sig)
            qs = row.get("query_specific_min")
            label = next((lab for lab, k in shipped.items() if k == key), None)
            name = f"**{label}**: {_key(key)}" if label else _key(key)
            print(
                f"| {name} | {row['min_diff_to_reference']:+.3f} ({_short(worst)}) | "
                f"{row['mean_diff_to_reference']:+.3f} | {cells} | {ratio} | {'' if qs is None else f'{qs:.2f}'} |"
            )
    elif which == "diagnosis":
        keys = doc.get("diagnosis_rows", [])
        print("| setting | " + " | ".join(_short(w) for w in worlds) + " |")
        print("|---|" + "---|" * len(worlds))
        for k in keys:
            cells = [(_cell(w["rows"][k]) if k in w["rows"] else "") for w in worlds.values()]
            print(f"| {_key(k)} | " + " | ".join(cells) + " |")
    elif which == "fidelity":
        fid = {w: f for w, f in doc["fidelity"].items() if f}
        # each world's entry: the setting's features (projected) and its layers unprojected ("…/none")
        for f in fid.values():
            keys = [k for k in f if k != "target"]
            f["unprojected"] = next(f[k] for k in keys if k.endswith("/none"))
            f["projected"] = next(f[k] for k in keys if not k.endswith("/none"))
        print(
            f"worlds: {', '.join(fid)}; target: {_key(next(iter(fid.values()))['target'])} (mean of its seeds)"
        )
        for feats in ("projected", "unprojected"):
            print(
                f"\n{feats}: Spearman with the same setting's K = 256 unprojected scores (mean over worlds; min)\n"
            )
            ks = sorted({int(k) for f in fid.values() for t in f[feats].values() for k in t})
            print("| scheme | " + " | ".join(f"K={k}" for k in ks) + " |")
            print("|---|" + "---|" * len(ks))
            for scheme in ("iid", "stratified", "stratified-is"):
                cells = []
                for k in ks:
                    vals = [
                        f[feats][scheme][str(k)] for f in fid.values() if str(k) in f[feats].get(scheme, {})
                    ]
                    if not vals:
                        cells.append("")
                        continue
                    m = sum(v["mean"] for v in vals) / len(vals)
                    se = (sum(v["se"] ** 2 for v in vals) ** 0.5) / len(vals)
                    cells.append(f"{m:.3f} ± {se:.3f} ({min(v['mean'] for v in vals):.2f})")
                print(f"| {scheme} | " + " | ".join(cells) + " |")
    elif which == "calibration":
        cal = doc["calibration"]
        print(
            "| world | plan's K (two seeds agree) | LDS at that K | LDS at K=32 | curve: K: top-10 overlap / Spearman |"
        )
        print("|---|---|---|---|---|")
        for w, c in cal.items():
            at = {p["draws"]: p for p in c["curve"]}
            k = c["stable_draws"]
            fmt = lambda p: f"{p['lds']:.3f}" if p and p.get("lds") is not None else ""  # noqa: E731
            curve = ", ".join(
                f"{p['draws']}: {p['top10_overlap']:.2f}/{p['spearman']:.3f}" for p in c["curve"]
            )
            print(f"| {w} | {k} | {fmt(at.get(k))} | {fmt(at.get(32))} | {curve} |")


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


def index_scale() -> None:
    doc = json.loads((RESULTS / "index_scale.json").read_text())
    k, r = doc["config"]["k"], doc["config"]["rerank"]
    print(
        f"| N | factory | build s | index MB | + float16 vectors MB | query ms | recall@{k} | "
        f"query ms, re-ranked ({r}k) | recall@{k}, re-ranked |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for x in doc["results"]:
        rr_ms = x.get(f"query_ms_median_rerank{r}")
        rr = x.get(f"recall@{k}_rerank{r}")
        print(
            f"| {x['n']:.0e} | {x['factory']} | {x['build_s']:.1f} | {x['index_bytes'] / 2**20:.1f} | "
            f"{x['rerank_vector_bytes'] / 2**20:.0f} | {x['query_ms_median']:.2f} | {x[f'recall@{k}']:.3f} | "
            f"{'' if rr_ms is None else f'{rr_ms:.2f}'} | {'' if rr is None else (f'**{rr:.3f}**' if rr >= 0.95 else f'{rr:.3f}')} |"
        )
    h = doc.get("hnsw_extrapolated")
    if h:
        print()
        print(
            f"HNSW32 at 10^6, extrapolated ({h['law']}, a = {h['a']:.3g}, b = {h['b']:.2f}): build "
            f"{h['build_s_at_1e6'] / 60:.0f} min, {h['bytes_at_1e6'] / 2**30:.1f} GiB"
        )


def real_shapes() -> None:
    doc = json.loads((RESULTS / "real_shapes.json").read_text())
    m = doc["measured"]
    print("| case (CPU, 2 threads) | tokens | seconds | peak RSS GB |")
    print("|---|---|---|---|")
    for key, v in m.items():
        kind, mode, *rest = key.split(":")
        if kind == "transformer":
            dtype, lat = rest
            c, t, h, w = (int(x) for x in lat.split("x"))
            tok = t * (h // 2) * (w // 2)
            label = f"1.3B transformer, {mode}, {dtype}, latent {lat}"
        else:
            tok, label = "", f"VAE encode {rest[0]}, {mode}"
        print(f"| {label} | {tok} | {v['seconds']:.2f} | {v['peak_bytes'] / 1e9:.2f} |")
    print()
    print(
        "| clip | tokens | fwd+bwd TFLOP / draw | CPU s / draw (scaled) | activations GB / draw (fp32, scaled) | "
        "H100 est. c_enc s | H100 est. c_draw s | clips / GPU-hour K=1 | K=8 | K=32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    gpu = doc["h100_estimate"]["sizes"]
    for name, s in doc["scaled_to_real"].items():
        g = gpu[name]
        cph = g["clips_per_gpu_hour"]
        print(
            f"| {name} | {s['tokens']} | {s['transformer_fwd_bwd_flop'] / 1e12:.0f} | "
            f"{s['cpu_seconds_per_draw_kron']:.0f} | {s['activation_bytes_per_draw_fp32'] / 1e9:.1f} | "
            f"{g['c_enc_s']:.3f} | {g['c_draw_s']:.3f} | {cph['1']:.0f} | {cph['8']:.0f} | {cph['32']:.0f} |"
        )


def motion() -> None:
    doc = json.loads((RESULTS / "motion.json").read_text())
    st = doc["settings"]
    cells = doc["cells"]
    print(
        f"{st['worlds']} worlds x {st['seeds']} estimator seeds, {st['train']} training clips and "
        f"{st['queries']} held-out queries per world; chance (direction) {doc['chance_direction']:.3f}"
    )
    print()
    print("| k | direction P@k, uniform | direction P@k, motion | gain (paired) | cells where motion is better "
          "| appearance P@k, uniform | appearance P@k, motion |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for k, row in doc["summary"].items():

        def f(key: str, row: dict = row) -> str:
            return f"{row[key]['mean']:.3f} ± {row[key]['se_cells']:.3f}"

        print(
            f"| {k} | {f('uniform_direction')} | **{f('motion_direction')}** | {f('direction_gain')} | "
            f"{row['cells_motion_better']} / {len(cells)} | {f('uniform_appearance')} | {f('motion_appearance')} |"
        )


if __name__ == "__main__":
    tables = {
        "factors": factors,
        "ecm": ecm,
        "incremental": incremental,
        "index_scale": index_scale,
        "real_shapes": real_shapes,
        "motion": motion,
    }
    tables[sys.argv[1]](*sys.argv[2:])
