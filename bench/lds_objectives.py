"""Which attribution objective predicts retraining best? LDS of objective variants (companion of lds.py).

bench/lds.py found that LDS does not rise with the number of draws K: the K-draw average converges to
the gradient of E_σ~p[ℓ], whose norm is dominated by σ → 0 draws, while single draws at σ ≥ 0.45
carry more of the signal. This script measures, on the same models and ground truth (it reuses
lds.py's work directory, training whatever is not cached yet), the variants a user can choose or that
the product could offer:

    loss                    the product default objective: ∇ E_σ~uniform[ℓ], shared noise
    loss, per-clip noise    the same objective, independent ε per clip (no common random numbers)
    loss, logit-normal:0,1  p(σ) = logit-normal (SD3's training density: little mass near 0 and 1)
    loss, shift:3           p(σ) = uniform pushed through the flow shift σ' = 3σ/(1+2σ) (mass near 1)
    sqnorm                  output function mean(v²) instead of the loss (D-TRAK)
    loss, unit-norm draws   (1/K) Σ_k φ_k/‖φ_k‖: each draw's projected gradient normalised before the
                            average; not the gradient of any expectation, a diagnostic of the norm bias

Every variant uses the `stratified` scheme (unbiased for its own p, no proposal to refit per density),
the kron projection of lds.py, K ∈ {1, 4, 16, 64} and the same estimator seeds; scores with the
identity, trak (λ 1e-2) and cosine preconditioners; LDS exactly as lds.py (checked against dattri
there). Nothing here changes the ground truth, which stays each query's uniform-σ loss.

Run (from the repository root, after `make install` or `make test` built .venv):

    .venv/bin/python bench/lds_objectives.py   # -> bench/results/lds_objectives.json, lds_objectives.png

335 s measured with lds.py's work directory cached (run lds.py first); without it, it first runs
lds.py's data, init and training stages (about 8 minutes in lds.py's own runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lds
import numpy as np
from _util import load_avg, machine_info, write_json

KS = (1, 4, 16, 64)
SCHEME = "stratified"
DEFAULT = {"output_fn": "loss", "density": "uniform", "noise": "shared", "unit_draws": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "loss": {},
    "loss, per-clip noise": {"noise": "per-clip"},
    "loss, logit-normal:0,1": {"density": "logit-normal:0,1"},
    "loss, shift:3": {"density": "shift:3"},
    "sqnorm": {"output_fn": "sqnorm"},
    "loss, unit-norm draws": {"unit_draws": True},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def feat_path(cfg: lds.Config, variant: str, seed: int, k: int) -> Path:
    return cfg.work / "features-objectives" / f"{slug(variant)}-s{seed}-k{k}.npz"


def unit_draw_features(featurizer: Any, items: list[tuple[int, Any, Any]]) -> np.ndarray:
    """(n, D) float32: per clip (1/K) Σ_k w_k φ_k/‖φ_k‖ from one backward with per-draw hooks."""
    import torch

    from carv_attrib.attrib.gradients import per_draw_features
    from carv_attrib.models.wan import pad_context

    out = []
    for clip_id, z, emb in items:
        sigma, w, eps = featurizer.draws(clip_id, tuple(z.shape))  # σ, w (K,); ε (K, C, T, h, w)
        phi, _ = per_draw_features(
            featurizer.transformers[0], featurizer.projectors[0], z, pad_context(emb), sigma, eps,
            featurizer.output_fn,
        )  # fmt: skip
        phi = phi / phi.norm(dim=1, keepdim=True).clamp_min(1e-30)  # (K, D) unit rows
        out.append((w.to(phi.dtype)[:, None] * phi).mean(0))
    return torch.stack(out).numpy()


def feature_job(job: tuple[dict[str, Any], str, int]) -> dict[str, Any]:
    """Features of all train clips and queries for one variant and estimator seed, at every K."""
    from carv_attrib.attrib.featurizer import build_projector, load_featurizer
    from carv_attrib.carv.draws import DrawRule

    cfg_d, variant, seed = job
    cfg = lds.config_from_dict(cfg_d)
    v = DEFAULT | VARIANTS[variant]
    todo = [k for k in KS if not feat_path(cfg, variant, seed, k).exists()]
    if not todo:
        return {"variant": variant, "seed": seed, "seconds": {}}
    featurizer = load_featurizer(
        str(cfg.model), [None], DrawRule(seed=seed, scheme=SCHEME, k=1), v["output_fn"], "cpu",
        "float32",
        new_projector=lambda t: build_projector("kron", t, ("blocks.*",), lds.PROJ_SEED, None, "gaussian"),
    )  # fmt: skip
    splits = {
        s: [(c.clip_id, c.latent, c.text_emb) for c in lds.load_clips(cfg, s)] for s in ("train", "query")
    }
    seconds = {}
    for k in todo:
        t0 = time.monotonic()
        featurizer.use_rule(DrawRule(seed=seed, scheme=SCHEME, k=k, density=v["density"], noise=v["noise"]))
        arrays = {}
        for split, items in splits.items():
            if v["unit_draws"]:
                arrays[split] = unit_draw_features(featurizer, items)
            else:
                feats = [featurizer.features(items[i : i + 8])[0] for i in range(0, len(items), 8)]
                arrays[split] = np.concatenate([f.numpy() for f in feats])  # (n_split, D) float32
        path = feat_path(cfg, variant, seed, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        seconds[k] = round(time.monotonic() - t0, 2)
    return {"variant": variant, "seed": seed, "seconds": seconds}


def evaluate(cfg: lds.Config, gt_values: np.ndarray, indices: np.ndarray) -> dict[str, Any]:
    """LDS mean ± SE over seeds for every variant x preconditioner x K."""
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        out[variant] = {}
        for pre in lds.PRECONDITIONERS:
            out[variant][pre] = {}
            for k in KS:
                per_seed = []
                for seed in range(cfg.seeds):
                    with np.load(feat_path(cfg, variant, seed, k)) as z:
                        train, query = z["train"].astype(np.float64), z["query"].astype(np.float64)
                    scores = lds.score_matrix(pre, train, query)  # (N, Q)
                    per_seed.append(float(np.nanmean(lds.lds_per_query(scores, gt_values, indices))))
                out[variant][pre][str(k)] = {**lds.mean_se(per_seed), "per_seed": per_seed}
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lds.PRECONDITIONERS), figsize=(4.4 * len(lds.PRECONDITIONERS), 3.9))
    for ax, pre in zip(axes, lds.PRECONDITIONERS):
        for variant in VARIANTS:
            rows = [results[variant][pre][str(k)] for k in KS]
            ax.errorbar(KS, [r["mean"] for r in rows], yerr=[r["se"] for r in rows], marker="o", capsize=3,
                        label=variant)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(KS), [str(k) for k in KS])
        ax.set_title(pre)
        ax.set_xlabel("draws per clip K (stratified)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("LDS (mean ± SE over estimator seeds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict[str, Any]) -> None:
    print(f"{'variant':<25}{'precond':<10}" + "".join(f"{'K=' + str(k):>15}" for k in KS))
    for variant in VARIANTS:
        for pre in lds.PRECONDITIONERS:
            cells = "".join(
                f"{results[variant][pre][str(k)]['mean']:>8.3f}±{results[variant][pre][str(k)]['se']:<6.3f}"
                for k in KS
            )
            print(f"{variant:<25}{pre:<10}{cells}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="lds.py's work dir (default bench/_work/lds/full)")
    ap.add_argument("--out-dir", type=Path, help="results dir (default bench/results)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each")
    a = ap.parse_args(argv)
    root = Path(__file__).resolve().parent
    cfg = lds.Config(work=a.work or root / "_work/lds/full", out_dir=a.out_dir or root / "results")
    cfg.workers = a.workers
    cfg.work.mkdir(parents=True, exist_ok=True)
    lds.check_protocol(cfg)
    torch.set_num_threads(1)
    t0 = time.monotonic()

    # The models and ground truth of lds.py (cached there; trained here on a fresh work dir).
    lds.prepare_data(cfg)
    lds.build_init(cfg)
    indices = lds.subset_indices(cfg)  # (M, N/2)
    _, retrains = lds.run_trainings(cfg, indices)
    gt_values = -np.array([r["query_loss"] for r in retrains])  # (M, Q)
    t_models = time.monotonic() - t0

    jobs = [(asdict(cfg), v, s) for s in range(cfg.seeds) for v in VARIANTS]
    todo = [j for j in jobs if not all(feat_path(cfg, j[1], j[2], k).exists() for k in KS)]
    feat_runs = lds.run_pool(cfg, feature_job, todo, "objective features")
    t_feats = time.monotonic() - t0 - t_models
    results = evaluate(cfg, gt_values, indices)
    print_table(results)

    summary = {
        "benchmark": "lds_objectives",
        "command": "python bench/lds_objectives.py",
        "argv": sys.argv[1:],
        "protocol": cfg.protocol(),
        "scheme": SCHEME,
        "ks": list(KS),
        "seeds": cfg.seeds,
        "variants": {name: DEFAULT | v for name, v in VARIANTS.items()},
        "machine": machine_info(),
        "load_at_end": load_avg(),
        "wall_s": round(time.monotonic() - t0, 1),
        "stage_s": {"models_and_ground_truth": round(t_models, 1), "features": round(t_feats, 1)},
        "feature_seconds": feat_runs,
        "lds": results,
    }
    write_json(cfg.out_dir / "lds_objectives.json", summary)
    plot(results, cfg.out_dir / "lds_objectives.png")
    print(f"wrote {cfg.out_dir / 'lds_objectives.json'} and lds_objectives.png ({summary['wall_s']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
