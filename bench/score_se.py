"""Are score's error bars right, and does `--refine` beat spending the same draws on every clip?

Worlds: the demo job (`carv-attrib demo`: the tiny Wan2.1 pipeline trained 150 flow-matching steps on
24 generated clips) under several estimator settings (draw scheme × preconditioner × noise); each world
is built once under bench/_work/score_se/. Every training clip is a query (its cached latent and
caption), scored against the other clips. The reference is the same projected score from K = 256
draws (one fixed seed): what the estimator estimates, up to its own error ~1/√32 of a K = 8 one.

Per world and estimator seed (the draw rule's seed; the projector is the index's, fixed):
* coverage: the share of (query, clip) pairs whose reference score lies in the K-draw interval
  score ± t·se (`search.uncertainty`; t from the variance's degrees of freedom, nominal 90 %), for the
  cheap se (clip side mirrored) and the exact one (clip side from its own draws); the same for the gap
  between neighbours in the K-draw ranking against se_gap;
* p_top_k's Brier score against membership of the reference top-k, beside the 0/1 K-draw top-k's;
* refine vs uniform: recall@k of the reference top-k and Spearman over all clips, for `search.refine`
  with score's default budget, and for every clip featurized at K' = K + (mean draws refine spent per
  query)/N, the same total draws per query (the index's N·K plus refine's), rounded to a valid K'.
Error bars: SE over seeds of the per-seed means (queries averaged inside a seed), and the mean SE
over queries inside a seed.

    .venv/bin/python bench/score_se.py            # ~6 min on 2 cores; writes bench/results/score_se.json
    .venv/bin/python bench/score_se.py --quick    # 2 worlds, 2 seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carv_attrib.attrib.featurizer import Featurizer, load_featurizer
from carv_attrib.carv.draws import DrawRule
from carv_attrib.config import DemoConfig
from carv_attrib.pipeline.demo import run_demo
from carv_attrib.pipeline.score import candidates_for, default_refine_budget
from carv_attrib.search import uncertainty as unc
from carv_attrib.search.precondition import fit_preconditioner
from carv_attrib.search.refine import NOT_REFINABLE, QUERY, refine
from carv_attrib.search.stability import ranking_agreement
from carv_attrib.store.latents import iter_cached
from carv_attrib.store.run import RunDir

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "score_se"
OUT = HERE / "results" / "score_se.json"
K_REF = 256
TOP_K = 5
# name -> the demo's estimator settings
WORLDS: dict[str, dict[str, Any]] = {
    "stratified-is+normalize": {"timesteps": "stratified-is", "precondition": "normalize"},
    "iid+cosine": {"timesteps": "iid", "precondition": "cosine"},
    "stratified+identity": {"timesteps": "stratified", "precondition": "identity"},
    "stratified-is+trak": {"timesteps": "stratified-is", "precondition": "trak"},
    # a run 4x larger than the candidates: where refining 2k + 10 clips is cheaper than all N
    "stratified-is+normalize-96": {"timesteps": "stratified-is", "precondition": "normalize", "clips": 96},
    # the same run at score's default k = 10 (2k + 10 = 30 candidates of 96)
    "stratified-is+normalize-96@10": {"dir": "stratified-is+normalize-96", "top_k": 10},
}


def world_run(name: str) -> RunDir:
    spec = WORLDS[name]
    if "dir" in spec:  # another k on a world built under another name
        return world_run(spec["dir"])
    out = WORK / name
    if not (out / "run" / "index" / "index_info.json").exists():
        settings = {k: v for k, v in spec.items() if k != "top_k"}
        run_demo(
            DemoConfig(
                out=out, plan_pilot_clips=4 if settings["timesteps"] == "stratified-is" else 0, **settings
            )
        )
    return RunDir(out / "run")


class Parts:
    """Per-draw parts (K, D) of every clip under a rule, computed once per (rule, clip)."""

    def __init__(self, fz: Featurizer, clips: list[Any]) -> None:
        self.fz, self.clips, self.cache = fz, clips, {}

    def get(self, rule: DrawRule, c: int) -> np.ndarray:
        key = (rule, c)
        if key not in self.cache:
            self.fz.use_rule(rule)
            clip = self.clips[c]
            parts, _ = self.fz.draw_parts(clip.clip_id, clip.latent, clip.text_emb, clip.motion)
            self.cache[key] = parts.numpy().astype(np.float64)  # (K, D)
        return self.cache[key]

    def level(self, rule: DrawRule, c: int, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(parts (m, D), u (m,)) of level `level` of the rule's nested strata (`carv.nested`)."""
        key = (rule, c, "level", level)
        if key not in self.cache:
            self.fz.use_rule(rule)
            clip = self.clips[c]
            parts, u = self.fz.level_parts(clip.clip_id, clip.latent, clip.text_emb, clip.motion, level)
            self.cache[key] = (parts.numpy().astype(np.float64), u)
        return self.cache[key]

    def totals(self, rule: DrawRule) -> np.ndarray:
        return np.stack([self.get(rule, c).sum(axis=0) for c in range(len(self.clips))])  # (N, D)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return ranking_agreement(a[:, None], b[:, None])[1]


def _recall(est: np.ndarray, ref: np.ndarray, k: int) -> float:
    return len(set(np.argsort(-est)[:k]) & set(np.argsort(-ref)[:k])) / k


def measure_seed(
    parts: Parts,
    rule0: DrawRule,
    pre_kind: str,
    blocks: list[int],
    seed: int,
    ref_scores: np.ndarray,
    top_k: int = TOP_K,
) -> dict[str, Any]:
    """One estimator seed: coverage, Brier, refine vs uniform, averaged over queries (each clip)."""
    rule = dataclasses.replace(rule0, seed=1000 + seed)
    n = len(parts.clips)
    feats = parts.totals(rule)
    dim = feats.shape[1]
    pre = fit_preconditioner(pre_kind, feats, dim=dim, blocks=blocks)
    psi_train = pre.prepare_train(feats).astype(np.float64)  # (N, D)
    psi_query = pre.prepare_query(feats).astype(np.float64)
    t = unc.t_quantile(unc.degrees_of_freedom(rule.k, rule))
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "cov_cheap",
            "cov_exact",
            "gap_cheap",
            "gap_exact",
            "brier_p",
            "brier_01",
            "recall_k",
            "spearman_k",
            "recall_refine",
            "spearman_refine",
            "draws_refine",
        )
    }
    refine_runs = []
    for q in range(n):
        others = np.array([c for c in range(n) if c != q])
        psi_c = psi_train[others]
        s = psi_c @ psi_query[q]  # (N-1,)
        ref = ref_scores[q, others]
        dq, phi_q = unc.centred_draws(parts.get(rule, q))
        xq = unc.query_terms(pre.linearize(dq, phi_q, "query"), psi_c)  # (N-1, K)
        cheap = unc.variance_basis(xq + unc.mirrored_clip_terms(pre, dq, phi_q, psi_c, psi_query[q]), rule)
        xi = np.stack(
            [
                unc.clip_terms(pre.linearize(*_centred(parts.get(rule, c)), "train"), psi_query[q])
                for c in others
            ]
        )
        exact = unc.variance_basis(xq + xi, rule)
        order = np.argsort(-s)
        for name, basis in (("cheap", cheap), ("exact", exact)):
            se = unc.standard_error(basis)
            rows[f"cov_{name}"].append(float(np.mean(np.abs(s - ref) <= t * se)))
            b = basis[order]
            gse = unc.standard_error(b[:-1] - b[1:])
            gap, gap_ref = s[order][:-1] - s[order][1:], ref[order][:-1] - ref[order][1:]
            rows[f"gap_{name}"].append(float(np.mean(np.abs(gap - gap_ref) <= t * gse)))
        in_ref = np.zeros(len(others))
        in_ref[np.argsort(-ref)[:top_k]] = 1.0
        in_est = np.zeros(len(others))
        in_est[order[:top_k]] = 1.0
        p = unc.p_top_k(s, cheap, None, top_k)
        rows["brier_p"].append(float(np.mean((p - in_ref) ** 2)))
        rows["brier_01"].append(float(np.mean((in_est - in_ref) ** 2)))
        rows["recall_k"].append(_recall(s, ref, top_k))
        rows["spearman_k"].append(_spearman(s, ref))
        # refine over score's candidates (the top 2k + 10 of the K-draw scores)
        cand = order[: candidates_for(top_k)]

        def parts_of(
            c: int, level: int, q: int = q, cand: np.ndarray = cand, others: np.ndarray = others
        ) -> tuple[np.ndarray, np.ndarray]:
            return parts.level(rule, q if c == QUERY else int(others[cand[c]]), level)

        if pre_kind in NOT_REFINABLE:  # score refuses --refine here: nothing to measure
            continue
        out = refine(
            pre, rule, top_k, psi_c[cand], parts.get(rule, q), parts_of, default_refine_budget(top_k, rule.k)
        )
        # as score reports them: the candidates by their refined scores, then the rest by K-draw order
        refined = s - 4.0 * (np.abs(s).max() + np.abs(out.scores).max()) - 1.0
        refined[cand] = out.scores
        rows["recall_refine"].append(_recall(refined, ref, top_k))
        rows["spearman_refine"].append(_spearman(refined, ref))
        rows["draws_refine"].append(float(out.draws))
        refine_runs.append({"settled": out.settled, "rounds": out.rounds})
    # uniform K' with the same total draws per query: N·K + mean refine draws = N·K'
    spent = np.mean(rows["draws_refine"]) if rows["draws_refine"] else 0.0  # none: --refine refused
    k_uniform = rule.k + int(round(spent / n))
    if rule.antithetic and k_uniform % 2:
        k_uniform += 1
    rule_u = dataclasses.replace(rule, k=k_uniform)
    feats_u = parts.totals(rule_u)
    pre_u = fit_preconditioner(pre_kind, feats_u, dim=dim, blocks=blocks)
    su_all = (
        pre_u.prepare_query(feats_u).astype(np.float64) @ pre_u.prepare_train(feats_u).astype(np.float64).T
    )
    rec_u, sp_u = [], []
    for q in range(n):
        others = np.array([c for c in range(n) if c != q])
        rec_u.append(_recall(su_all[q, others], ref_scores[q, others], top_k))
        sp_u.append(_spearman(su_all[q, others], ref_scores[q, others]))
    rows["recall_uniform"], rows["spearman_uniform"] = rec_u, sp_u
    # uniform 2K and 4K for every clip: what refine's recall would cost without it (N·K' draws)
    for mult in (2, 4):
        rule_m = dataclasses.replace(rule, k=rule.k * mult)
        feats_m = parts.totals(rule_m)
        pre_m = fit_preconditioner(pre_kind, feats_m, dim=dim, blocks=blocks)
        sm = (
            pre_m.prepare_query(feats_m).astype(np.float64)
            @ pre_m.prepare_train(feats_m).astype(np.float64).T
        )
        rows[f"recall_uniform_{mult}k"] = [
            _recall(
                sm[q, [c for c in range(n) if c != q]], ref_scores[q, [c for c in range(n) if c != q]], top_k
            )
            for q in range(n)
        ]
    summary: dict[str, Any] = {
        k: {"mean": float(np.mean(v)), "se_queries": float(np.std(v, ddof=1) / math.sqrt(len(v)))}
        for k, v in rows.items()
        if v  # refine's rows stay empty where score refuses --refine
    }
    summary["k_uniform"] = k_uniform
    summary["draws_index"] = n * rule.k  # the index's own draws, which every setting spends
    summary["settled_share"] = float(np.mean([r["settled"] for r in refine_runs])) if refine_runs else None
    return summary


def _centred(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return unc.centred_draws(parts)


def measure_world(name: str, seeds: int) -> dict[str, Any]:
    run = world_run(name)
    info = run.index_info()
    rule0 = DrawRule.from_dict(info.draws)
    fz = load_featurizer(
        info.model_source, info.checkpoint_paths, rule0, info.output_fn, "cpu", info.feature_dtype,
        projector_specs=[info.projector] * len(info.checkpoint_paths), objective=info.objective,
    )  # fmt: skip
    clips = list(iter_cached(run))
    parts = Parts(fz, clips)
    pre_kind = info.preconditioner["kind"]
    blocks = list(info.blocks)
    ref_rule = dataclasses.replace(rule0, seed=77, k=K_REF)
    feats_ref = parts.totals(ref_rule)
    pre_ref = fit_preconditioner(pre_kind, feats_ref, dim=feats_ref.shape[1], blocks=blocks)
    ref_scores = (
        pre_ref.prepare_query(feats_ref).astype(np.float64)
        @ pre_ref.prepare_train(feats_ref).astype(np.float64).T
    )
    top_k = int(WORLDS[name].get("top_k", TOP_K))
    per_seed = [measure_seed(parts, rule0, pre_kind, blocks, s, ref_scores, top_k) for s in range(seeds)]
    keys = [k for k in per_seed[0] if isinstance(per_seed[0][k], dict)]
    out: dict[str, Any] = {
        "world": name,
        "top_k": top_k,
        "clips": len(clips),
        "rule": rule0.to_dict(include_proposal=False),
        "preconditioner": pre_kind,
        "seeds": seeds,
    }
    for k in keys:
        means = [p[k]["mean"] for p in per_seed]
        out[k] = {
            "mean": float(np.mean(means)),
            "se_seeds": float(np.std(means, ddof=1) / math.sqrt(len(means))) if len(means) > 1 else None,
            "se_queries": float(np.mean([p[k]["se_queries"] for p in per_seed])),
        }
    out["k_uniform"] = [p["k_uniform"] for p in per_seed]
    out["draws_index"] = per_seed[0]["draws_index"]
    shares = [p["settled_share"] for p in per_seed if p["settled_share"] is not None]
    out["settled_share"] = float(np.mean(shares)) if shares else None
    return out


def _pm(cell: dict[str, Any], digits: int = 2) -> str:
    se = cell["se_seeds"] if cell.get("se_seeds") is not None else cell["se_queries"]
    return f"{cell['mean']:.{digits}f} ± {se:.{digits}f}"


def table(doc: dict[str, Any]) -> str:
    """README's tables from the JSON: coverage and Brier, then refine against uniform K."""
    lines = [
        "| world | score coverage, cheap / exact | gap coverage, cheap / exact | Brier p_top_k / 0-1 top-k |",
        "|---|---|---|---|",
    ]
    for w in doc["worlds"]:
        lines.append(
            f"| {w['world']} ({w['clips']} clips) | {_pm(w['cov_cheap'])} / {_pm(w['cov_exact'])} | "
            f"{_pm(w['gap_cheap'])} / {_pm(w['gap_exact'])} | {_pm(w['brier_p'], 3)} / {_pm(w['brier_01'], 3)} |"
        )
    lines += [
        "",
        "| world | draws per query: index + refine | recall@k: K / refine / uniform K' (same draws) / 2K / 4K | Spearman: K / refine / uniform K' | settled |",
        "|---|---|---|---|---|",
    ]
    for w in doc["worlds"]:
        kk = sorted(set(w["k_uniform"]))
        if "recall_refine" not in w:  # score refuses --refine on this index (search.refine.NOT_REFINABLE)
            lines.append(f"| {w['world']} | refused: {NOT_REFINABLE[w['preconditioner']]} | | | |")
            continue
        lines.append(
            f"| {w['world']}, k = {w.get('top_k', doc['top_k'])} | {w['draws_index']} + {w['draws_refine']['mean']:.0f} (K' = {', '.join(map(str, kk))}) | "
            f"{_pm(w['recall_k'])} / **{_pm(w['recall_refine'])}** / {_pm(w['recall_uniform'])} / "
            f"{_pm(w['recall_uniform_2k'])} / {_pm(w['recall_uniform_4k'])} | "
            f"{_pm(w['spearman_k'], 3)} / {_pm(w['spearman_refine'], 3)} / {_pm(w['spearman_uniform'], 3)} | "
            f"{w['settled_share']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--table", action="store_true", help="print README's tables from the committed JSON")
    ap.add_argument(
        "--only", nargs="+", choices=list(WORLDS), help="measure these worlds, merged into the JSON"
    )
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return
    torch.set_num_threads(1)
    names = args.only or (list(WORLDS)[:2] if args.quick else list(WORLDS))
    seeds = 2 if args.quick else args.seeds
    t0 = time.monotonic()
    worlds = []
    for name in names:
        worlds.append(measure_world(name, seeds))
        print(
            json.dumps(
                {
                    k: worlds[-1].get(k)
                    for k in (
                        "world",
                        "cov_cheap",
                        "cov_exact",
                        "gap_cheap",
                        "recall_refine",
                        "recall_uniform",
                    )
                }
            )
        )
    if args.only and OUT.exists():  # the other worlds as measured before
        kept = [w for w in json.loads(OUT.read_text())["worlds"] if w["world"] not in names]
        order = list(WORLDS)
        worlds = sorted(kept + worlds, key=lambda w: order.index(w["world"]))
    doc = {
        "what": "coverage of score's 90% intervals against K=256, p_top_k Brier, refine vs uniform K at equal draws",
        "command": "python bench/score_se.py" + (" --quick" if args.quick else ""),
        "level": unc.LEVEL,
        "top_k": TOP_K,  # unless a world says its own
        "k_ref": K_REF,
        "worlds": worlds,
        "seconds": round(time.monotonic() - t0, 1),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
