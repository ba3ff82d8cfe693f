"""Featurize speed: kron vs dense projection vs a plain forward+backward of the same K-draw batch.

For each Wan2.1 config in --sizes (default `small` ~4.9 M and `medium` ~20 M transformer parameters,
random weights, `carv_attrib.models.tiny`), B clips x K draws (default 4 x 8) of one realistic demo
latent (17 frames 64x64 -> (16, 5, 8, 8), 80 video tokens) and a 512-padded text context with 12
real rows, this measures seconds per clip of

    (a) kron   `kron_features` with a `KronProjector` over `blocks.*` at 8 x 8 per layer: one
               backward over the B*K draws, hooks project each layer, parameter gradients off;
    (b) dense  `dense_features` with a `DenseProjector` of the same total dimension D: one backward
               per clip with parameter gradients on, then the B flattened gradients times the
               (p x D) Gaussian matrix, regenerated chunk by chunk on every call (the reference);
    (c) plain  the same B*K forwards through `clip_objective` and one backward with parameter
               gradients ON (every parameter requires grad, .grad filled: an ordinary training step);
    (d) plain  the same with parameter gradients OFF: parameters frozen, the latent z requires grad,
               so x_sigma = (1 - sigma) z + sigma eps does and the backward runs through every layer
               down to the patch embedding computing input gradients only (the floor kron builds on);
    (e) plain  informational: as (d), but the text context requires grad too, so the backward also
               runs into the cross-attention K/V projections of the 512 context rows, which kron needs
               for the attn2.to_k / to_v features and (d) skips: kron / (e) isolates the hook cost.

After one warm-up call of each, they are repeated interleaved (a, b, c, d, e, a, b, ...) and the
median (and min) taken, so slow drifts in background load hit all of them alike; the ratios
kron/plain and dense/kron are printed and written to bench/results/featurize_speed.json with every
raw timing, the targets (kron <= 1.15 x plain fwd+bwd with parameter gradients; dense/kron >= 10 at
~20 M) and pass/fail.

Dense at 20 M regenerates p x D = 18.9 M x 5120 Gaussian entries per call (~30 min on 2 cores), so
by default each timed dense call projects only the first --dense-chunks chunks of the matrix and the
projection time is scaled to all of them (every full chunk costs the same: generate 65536 x D, one
matmul); the backward part is measured in full. --dense-full-sizes runs one complete, unmodified
`dense_features` call at those sizes (default: small) to check that extrapolation.

    .venv/bin/python bench/featurize_speed.py                     # ~8 min on 2 idle cores
    .venv/bin/python bench/featurize_speed.py --sizes small --repeats 3

Results are machine-dependent, and on a shared machine load-dependent: the JSON records the CPU,
torch version, threads and the load average at start and end.
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _util import load_avg, machine_info, stats, timed, wait_for_quiet, write_json

from carv_attrib.attrib.gradients import ClipDraws, dense_features, kron_features
from carv_attrib.attrib.projection import DenseProjector, KronProjector, select_linear_layers
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.objective import clip_objective
from carv_attrib.models.tiny import build_pipeline
from carv_attrib.models.wan import MAX_SEQUENCE_LENGTH, pad_context

KRON_TARGET = 1.15  # kron <= 1.15 x plain forward+backward (with parameter gradients)
DENSE_TARGET = 10.0  # dense / kron >= 10 at ~20 M parameters
DENSE_TARGET_SIZES = ("medium",)
METHODS = ("kron", "dense", "plain_param_grads", "plain_no_param_grads", "plain_no_param_grads_ctx")


class SampledDenseProjector(DenseProjector):
    """DenseProjector.project over only the first `max_chunks` row chunks of the matrix (None: all).

    Its output is a partial sum and is thrown away: it is a timing device only. It records the
    seconds spent projecting and the fraction of the matrix rows covered, so the caller can scale
    the projection time to the whole matrix.
    """

    def __init__(self, *args: Any, max_chunks: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_chunks = max_chunks
        self.last_seconds = 0.0
        self.last_fraction = 1.0

    def project(self, g: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        g2 = g.reshape(-1, self.grad_dim).float()  # (B, p)
        out = torch.zeros(g2.shape[0], self.dim, dtype=torch.float32, device=g.device)
        rows = 0
        for c, start in enumerate(range(0, self.grad_dim, self.chunk_rows)):
            if self.max_chunks is not None and c >= self.max_chunks:
                break
            chunk = self._chunk(c).to(g.device)  # (rows_c, dim), exactly as DenseProjector does
            out += g2[:, start : start + chunk.shape[0]] @ chunk
            rows += chunk.shape[0]
        self.last_seconds = time.perf_counter() - t
        self.last_fraction = rows / self.grad_dim
        return out.reshape(*g.shape[:-1], self.dim)


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Wan VAE: 16 channels, 4x temporal (first frame kept), 8x spatial compression."""
    return 16, (frames - 1) // 4 + 1, height // 8, width // 8


def make_batch(
    text_dim: int, clips: int, draws: int, shape: tuple[int, ...], text_len: int, seed: int
) -> list[ClipDraws]:
    """B clips with random latents and trimmed text embeddings, zero-padded to 512 like the pipeline;
    the K draws are the shared stream of the default draw rule (stratified-is, uniform p)."""
    rule = DrawRule(seed=seed, scheme="stratified-is", k=draws)
    sigma, w, eps = rule.draws_for(rule.stream_for(), shape)
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(clips):
        z = torch.randn(shape, generator=g)  # (C, T, h, w) normalised latent
        emb = torch.randn(text_len, text_dim, generator=g)  # (L, D) trimmed UMT5 embedding
        batch.append(ClipDraws(z, pad_context(emb), sigma, w, eps))
    return batch


def plain_forward_backward(
    transformer: torch.nn.Module, batch: list[ClipDraws], param_grads: bool, context_grad: bool = False
) -> None:
    """The same B*K forwards as kron_features and one backward of their sum, without any hooks."""
    for p in transformer.parameters():
        p.requires_grad_(param_grads)
        p.grad = None
    total = None
    for clip in batch:
        # Without parameter gradients nothing in the graph would require grad: make the latent a
        # leaf that does, so the backward runs through every layer (input gradients only).
        z = clip.latent if param_grads else clip.latent.clone().requires_grad_()
        ctx = clip.context.clone().requires_grad_() if context_grad else clip.context
        obj, _ = clip_objective(transformer, z, ctx, clip.sigma, clip.eps, clip.weights)
        total = obj if total is None else total + obj
    assert total is not None
    total.backward()


def profile_ops(fn: Any) -> dict[str, float]:
    """Self CPU seconds per op of one call of fn (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    totals = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def op_diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Per-op self CPU seconds of profile a minus profile b."""
    return {op: a.get(op, 0.0) - b.get(op, 0.0) for op in set(a) | set(b)}


def top(ops: dict[str, float], n: int = 12) -> dict[str, float]:
    """The n ops with the largest |seconds|, rounded for the JSON."""
    return {k: round(v, 4) for k, v in sorted(ops.items(), key=lambda kv: -abs(kv[1]))[:n]}


def bench_size(size: str, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    t_size = time.monotonic()
    transformer = build_pipeline(size, seed=0).transformer.eval()
    n_params = sum(p.numel() for p in transformer.parameters())
    B, K = args.batch_clips, args.draws
    shape = latent_shape(args.frames, args.height, args.width)
    batch = make_batch(transformer.config.text_dim, B, K, shape, args.text_len, seed=0)

    layers = select_linear_layers(transformer, ("blocks.*",))
    kron = KronProjector(transformer, layers, seed=0, k_in=8, k_out=8, patterns=["blocks.*"])
    n_chunks = math.ceil(kron.grad_dim / DenseProjector(layers, dim=kron.dim).chunk_rows)
    max_chunks = None if args.dense_chunks <= 0 or args.dense_chunks >= n_chunks else args.dense_chunks
    dense = SampledDenseProjector(layers, seed=0, dim=kron.dim, max_chunks=max_chunks)
    say(
        f"\n[{size}] {n_params / 1e6:.2f} M params, {len(layers)} Linear layers in blocks.*, D = {kron.dim}, "
        f"p = {kron.grad_dim / 1e6:.2f} M, dense matrix {n_chunks} chunks"
        + (f" (timing {max_chunks}, projection scaled x{n_chunks / max_chunks:.1f})" if max_chunks else "")
    )

    dense_parts: dict[str, list[float]] = collections.defaultdict(list)

    def run_dense() -> None:
        t = time.perf_counter()
        dense_features(transformer, layers, dense, batch)
        total = time.perf_counter() - t
        dense_parts["backward_s"].append(total - dense.last_seconds)
        dense_parts["projection_timed_s"].append(dense.last_seconds)
        dense_parts["projection_s"].append(dense.last_seconds / dense.last_fraction)

    calls = {
        "kron": lambda: kron_features(transformer, kron, batch),
        "dense": run_dense,
        "plain_param_grads": lambda: plain_forward_backward(transformer, batch, param_grads=True),
        "plain_no_param_grads": lambda: plain_forward_backward(transformer, batch, param_grads=False),
        "plain_no_param_grads_ctx": lambda: plain_forward_backward(
            transformer, batch, param_grads=False, context_grad=True
        ),
    }

    # Warm-up: one call of each (allocator, thread pools, the projector's matrices).
    warm = {name: timed(fn) for name, fn in calls.items()}
    dense_parts.clear()
    say("  warm-up s/call: " + ", ".join(f"{k} {v:.2f}" for k, v in warm.items()))

    per_call: dict[str, list[float]] = {name: [] for name in METHODS}
    for r in range(args.repeats):
        for name, fn in calls.items():
            if name == "dense":
                fn()
                per_call[name].append(dense_parts["backward_s"][-1] + dense_parts["projection_s"][-1])
            else:
                per_call[name].append(timed(fn))
        say(
            f"  round {r + 1}/{args.repeats} s/call: "
            + ", ".join(f"{k} {v[-1]:.2f}" for k, v in per_call.items())
            + f"  (load {load_avg()[0]:.2f})"
        )
    for p in transformer.parameters():
        p.requires_grad_(True)
        p.grad = None
    say(
        f"  dense per call (median): {B} per-clip backwards {statistics.median(dense_parts['backward_s']):.2f} s"
        f" + projection {statistics.median(dense_parts['projection_timed_s']):.2f} s on "
        f"{max_chunks or n_chunks} of {n_chunks} chunks -> {statistics.median(dense_parts['projection_s']):.1f} s "
        "for the whole matrix"
    )

    per_clip = {name: stats(v, 1.0 / B) for name, v in per_call.items()}
    per_clip["dense_backward"] = stats(dense_parts["backward_s"], 1.0 / B)
    per_clip["dense_projection"] = stats(dense_parts["projection_s"], 1.0 / B)
    med = {name: per_clip[name]["median"] for name in per_clip}
    mins = {name: per_clip[name]["min"] for name in per_clip}
    ratios = {
        "kron_over_plain_param_grads": med["kron"] / med["plain_param_grads"],
        "kron_over_plain_no_param_grads": med["kron"] / med["plain_no_param_grads"],
        "kron_over_plain_no_param_grads_ctx": med["kron"] / med["plain_no_param_grads_ctx"],
        "dense_over_kron": med["dense"] / med["kron"],
    }
    ratios_of_min = {
        "kron_over_plain_param_grads": mins["kron"] / mins["plain_param_grads"],
        "kron_over_plain_no_param_grads": mins["kron"] / mins["plain_no_param_grads"],
        "kron_over_plain_no_param_grads_ctx": mins["kron"] / mins["plain_no_param_grads_ctx"],
        "dense_over_kron": mins["dense"] / mins["kron"],
    }
    # Per-round ratios: each pair was measured seconds apart, so their spread shows the load noise.
    round_ratios = {
        "kron_over_plain_param_grads": [
            a / b for a, b in zip(per_call["kron"], per_call["plain_param_grads"])
        ],
        "kron_over_plain_no_param_grads": [
            a / b for a, b in zip(per_call["kron"], per_call["plain_no_param_grads"])
        ],
        "kron_over_plain_no_param_grads_ctx": [
            a / b for a, b in zip(per_call["kron"], per_call["plain_no_param_grads_ctx"])
        ],
    }
    targets = {
        "kron_over_plain_param_grads": {
            "target": f"<= {KRON_TARGET}",
            "value": ratios["kron_over_plain_param_grads"],
            "pass": ratios["kron_over_plain_param_grads"] <= KRON_TARGET,
        },
        "kron_over_plain_no_param_grads (stricter, informational)": {
            "target": f"<= {KRON_TARGET}",
            "value": ratios["kron_over_plain_no_param_grads"],
            "pass": ratios["kron_over_plain_no_param_grads"] <= KRON_TARGET,
        },
    }
    if size in DENSE_TARGET_SIZES:
        targets["dense_over_kron"] = {
            "target": f">= {DENSE_TARGET}",
            "value": ratios["dense_over_kron"],
            "pass": ratios["dense_over_kron"] >= DENSE_TARGET,
        }

    result: dict[str, Any] = {
        "params": n_params,
        "selected_layers": len(layers),
        "feature_dim": kron.dim,
        "grad_dim": kron.grad_dim,
        "dense_matrix": {
            "chunk_rows": dense.chunk_rows,
            "chunks": n_chunks,
            "chunks_timed_per_call": max_chunks or n_chunks,
            "projection_extrapolated": max_chunks is not None,
        },
        "warmup_s_per_call": warm,
        "seconds_per_clip": per_clip,
        "dense_projection_timed_s_per_call": stats(dense_parts["projection_timed_s"]),
        "ratios": ratios,
        "ratios_of_min": ratios_of_min,
        "round_ratios": round_ratios,
        "targets": targets,
    }

    if size in args.dense_full_sizes:
        say(f"  full dense check: one complete, unmodified dense_features call (B = {B}) ...")
        full = DenseProjector(layers, seed=0, dim=kron.dim)
        t = timed(lambda: dense_features(transformer, layers, full, batch))
        result["dense_full_check"] = {
            "seconds_per_clip": t / B,
            "extrapolated_median_seconds_per_clip": med["dense"],
            "full_over_extrapolated": (t / B) / med["dense"],
            "load_avg": load_avg(),
        }
        say(f"  full dense call {t:.1f} s = {t / B:.2f} s/clip (extrapolated median {med['dense']:.2f})")

    if args.profile:
        say("  profiling one kron call and one plain call of each kind ...")
        prof = {
            "kron": profile_ops(calls["kron"]),
            "plain_no_param_grads": profile_ops(calls["plain_no_param_grads"]),
            "plain_no_param_grads_ctx": profile_ops(calls["plain_no_param_grads_ctx"]),
            "plain_param_grads": profile_ops(calls["plain_param_grads"]),
        }
        for p in transformer.parameters():
            p.requires_grad_(True)
            p.grad = None
        result["profile_self_cpu_s_per_call"] = {
            "kron_minus_plain_no_param_grads": top(op_diff(prof["kron"], prof["plain_no_param_grads"])),
            "kron_minus_plain_no_param_grads_ctx": top(
                op_diff(prof["kron"], prof["plain_no_param_grads_ctx"])
            ),
            **{name: top(ops) for name, ops in prof.items()},
        }

    result["wall_s"] = time.monotonic() - t_size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,medium", help="comma-separated models.tiny SIZES")
    parser.add_argument("--draws", type=int, default=8, help="K draws per clip")
    parser.add_argument("--batch-clips", type=int, default=4, help="B clips per backward")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", default="64x64", help="video HxW; latent is H/8 x W/8")
    parser.add_argument("--text-len", type=int, default=12, help="real caption tokens before padding")
    parser.add_argument(
        "--dense-chunks", type=int, default=2, help="matrix chunks timed per dense call (0: all)"
    )
    parser.add_argument("--dense-full-sizes", default="small", help="sizes that also get one full dense call")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip torch.profiler")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load below this")
    parser.add_argument("--max-wait", type=float, default=120.0, help="... but at most this many seconds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "featurize_speed.json"))
    args = parser.parse_args()
    args.height, args.width = (int(x) for x in args.size.lower().split("x"))
    args.dense_full_sizes = [s for s in args.dense_full_sizes.split(",") if s]
    sizes = [s for s in args.sizes.split(",") if s]

    t0 = time.monotonic()
    torch.set_num_threads(args.threads)
    shape = latent_shape(args.frames, args.height, args.width)
    print(
        f"featurize speed: sizes {sizes}, B = {args.batch_clips} clips x K = {args.draws} draws, latent {shape} "
        f"({shape[1] * shape[2] * shape[3] // 4} video tokens), context (1, {MAX_SEQUENCE_LENGTH}, text_dim) "
        f"with {args.text_len} real rows, {args.threads} torch threads, {args.repeats} interleaved rounds"
    )
    quiet = wait_for_quiet(args.max_load, args.max_wait)
    load_start = load_avg()
    print(f"load average at start {load_start} (waited {quiet['waited_s']} s)")

    results = {size: bench_size(size, args, print) for size in sizes}
    load_end = load_avg()

    print(f"\nseconds per clip (median of {args.repeats}; min in brackets), {args.threads} threads")
    print(
        "(c) plain+pgrad: fwd+bwd with parameter gradients; (d) plain-pgrad: without, latent requires grad;"
    )
    print("(e) plain-pgrad+ctx: as (d) with the text context requiring grad too (informational)")
    head = f"{'size':8} {'params':>7} {'kron':>14} {'dense':>16} {'(c)':>14} {'(d)':>14} {'(e)':>14}"
    print(head + f" {'kron/(c)':>9} {'kron/(d)':>9} {'kron/(e)':>9} {'dense/kron':>10}")
    for size, r in results.items():
        s, q = r["seconds_per_clip"], r["ratios"]
        cell = {m: f"{s[m]['median']:.3f} [{s[m]['min']:.3f}]" for m in METHODS}
        print(
            f"{size:8} {r['params'] / 1e6:6.1f}M {cell['kron']:>14} {cell['dense']:>16} "
            f"{cell['plain_param_grads']:>14} {cell['plain_no_param_grads']:>14} "
            f"{cell['plain_no_param_grads_ctx']:>14} {q['kron_over_plain_param_grads']:9.3f} "
            f"{q['kron_over_plain_no_param_grads']:9.3f} {q['kron_over_plain_no_param_grads_ctx']:9.3f} "
            f"{q['dense_over_kron']:10.1f}"
        )
    print("\ntargets")
    for size, r in results.items():
        for name, t in r["targets"].items():
            print(
                f"  {size:8} {name:58} {t['value']:8.3f} {t['target']:>7}  {'PASS' if t['pass'] else 'MISS'}"
            )
        print(f"  {size:8} wall {r['wall_s']:.0f} s")

    notes = [
        "(d) plain without parameter gradients: every parameter has requires_grad False and the latent z is "
        "made a leaf that requires grad, so the backward computes input gradients through every layer down to "
        "the patch embedding and no weight gradient. kron's backward stops at the first selected layer "
        "(blocks.0) but also back-propagates into the cross-attention K/V projections of the 512-row text "
        "context, which (d) skips because the context does not require grad.",
        "dense: per clip = (B per-clip backwards with parameter gradients of the selected layers + one "
        "projection of the B stacked gradients) / B; the projection regenerates the Gaussian matrix.",
    ]
    for size, r in results.items():
        dm = r["dense_matrix"]
        if dm["projection_extrapolated"]:
            notes.append(
                f"{size}: dense projection time per call timed on {dm['chunks_timed_per_call']} of {dm['chunks']} "
                f"chunks and scaled by {dm['chunks'] / dm['chunks_timed_per_call']:.1f} (linear in chunks)"
                + (
                    f"; a full call measured {r['dense_full_check']['full_over_extrapolated']:.2f} x the extrapolation"
                    if "dense_full_check" in r
                    else ""
                )
            )
        q, med = r["ratios"], {m: v["median"] for m, v in r["seconds_per_clip"].items()}
        if q["kron_over_plain_param_grads"] > KRON_TARGET:
            notes.append(
                f"{size}: kron target MISSED: kron/plain(param grads) = {q['kron_over_plain_param_grads']:.3f} "
                f"> {KRON_TARGET}"
            )
        notes.append(
            f"{size}: kron - (d) = {med['kron'] - med['plain_no_param_grads']:+.4f} s/clip, split as "
            f"(e) - (d) = {med['plain_no_param_grads_ctx'] - med['plain_no_param_grads']:+.4f} (backward into "
            f"the context K/V projections, which kron needs and (d) skips) and kron - (e) = "
            f"{med['kron'] - med['plain_no_param_grads_ctx']:+.4f} (the hooks: x~ = [x;1] P_in in forward, "
            "P_out^T delta and the k_out x k_in accumulation in backward, per layer and clip); per-op "
            "differences in profile_self_cpu_s_per_call"
        )
    spread = [statistics.pstdev(r["round_ratios"]["kron_over_plain_param_grads"]) for r in results.values()]
    notes.append(
        f"1-min load average {load_start[0]} at start (before any work) and {load_end[0]} at end; the end "
        f"figure and the per-round loads include this benchmark's own {args.threads} threads"
    )
    if load_start[0] > args.max_load:
        notes.append(
            f"machine was loaded by other jobs at the start (1-min load {load_start[0]} on "
            f"{machine_info()['cpu_count']} cores): absolute times are inflated and noisy; the interleaved "
            f"ratios are the figures to read (per-round kron/plain spread, std: {[round(x, 3) for x in spread]})"
        )

    out = {
        "benchmark": "featurize_speed",
        "config": {
            "sizes": sizes,
            "draws": args.draws,
            "batch_clips": args.batch_clips,
            "repeats": args.repeats,
            "threads": args.threads,
            "frames": args.frames,
            "size_hw": [args.height, args.width],
            "latent_shape": list(shape),
            "context": [1, MAX_SEQUENCE_LENGTH, "text_dim"],
            "text_len": args.text_len,
            "draw_rule": DrawRule(seed=0, scheme="stratified-is", k=args.draws).to_dict(),
            "kron": {"patterns": ["blocks.*"], "k_out": 8, "k_in": 8, "matrix": "gaussian"},
            "dense": {
                "dim": "same as kron",
                "matrix": "gaussian",
                "chunks_timed_per_call": args.dense_chunks,
            },
            "dense_full_sizes": args.dense_full_sizes,
            "unit": "seconds per clip (per-call time / batch_clips)",
        },
        "machine": machine_info(),
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "waited_for_quiet": quiet,
        "targets": {
            "kron_over_plain_param_grads": f"<= {KRON_TARGET} (every size)",
            "dense_over_kron": f">= {DENSE_TARGET} at {', '.join(DENSE_TARGET_SIZES)} (~20 M)",
        },
        "sizes": results,
        "notes": notes,
        "wall_s": time.monotonic() - t0,
    }
    path = write_json(args.out, out)
    print(f"\nwrote {path} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
