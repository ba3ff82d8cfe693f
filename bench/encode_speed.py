"""Encode speed on the demo: decode-only vs encode-only vs the overlapped encode stage, in clips/s.

On N demo clips (default 48, `carv_attrib.lds.synthetic`) and the `tiny` Wan2.1 pipeline, this measures

    decode-only   `DecodePool` with the default FramePolicy (17 frames, 64x64, fps 8), results
                  consumed and thrown away; workers = --workers (default 2) and workers = 0
                  (in-process). Pool start-up (forkserver workers) is included and also given alone.
    encode-only   on frames decoded beforehand: VAE (`encode_video`, batches of --batch-size,
                  uint8 -> [-1, 1] conversion included, as the stage does) and text
                  (`encode_prompts` of the distinct captions, as the stage's caption cache does),
                  each alone and summed.
    overlapped    the real stage `run_encode(EncodeConfig(...))` end to end into a fresh run
                  directory (model load, manifest, decode in workers ahead of the VAE, Parquet
                  writes), with workers = --workers and 0; its own shard timers (time waiting for
                  decodes, VAE, text) are kept.

Encode-only and overlapped run once per torch thread count in --threads (default 1,2): on a 2-core
machine decode workers and torch threads compete for the same cores. Everything is repeated
--repeats times (default 3) interleaved after one warm-up, and medians are reported; the table is
printed and written to bench/results/encode_speed.json with the config, machine and load average.

    .venv/bin/python bench/encode_speed.py              # a few minutes on 2 cores
    .venv/bin/python bench/encode_speed.py --clips 24 --repeats 3 --threads 2

Results are machine-dependent (and load-dependent on a shared machine). The work directory
(default bench/_work/encode_speed, gitignored) keeps the model and clips between runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from _util import load_avg, machine_info, stats, timed, wait_for_quiet, write_json

# torch and carv_attrib are imported inside the functions, not here: DecodePool's forkserver workers
# re-run this script's top level (as __mp_main__) when they start, so heavy imports here would add
# a torch import to every worker start. The `carv-attrib` console script imports no torch at its
# top level either, so this keeps the measured pool start-up like the CLI's.

BENCH = Path(__file__).parent


def decode_only(paths: list[str], policy: Any, workers: int) -> dict[str, float]:
    """Seconds to decode every clip through a DecodePool (start-up included), the start-up alone, and
    the time to the first result (worker processes import decord/numpy before their first decode)."""
    from carv_attrib.video.decode import ClipFailure
    from carv_attrib.video.pool import DecodePool

    t0 = time.perf_counter()
    ok, first = 0, None
    with DecodePool(policy, workers=workers) as pool:
        startup = time.perf_counter() - t0
        for _, result in pool.imap(list(enumerate(paths))):
            first = first or time.perf_counter() - t0
            ok += not isinstance(result, ClipFailure)
    return {"seconds": time.perf_counter() - t0, "startup_s": startup, "first_result_s": first, "ok": ok}


def decode_all(paths: list[str], policy: Any) -> list[Any]:
    """uint8 (F, H, W, 3) frames of every clip, decoded once in this process."""
    from carv_attrib.video.pool import DecodePool

    with DecodePool(policy, workers=0) as pool:
        return [result.frames for _, result in pool.imap(list(enumerate(paths)))]


def vae_only(vae: Any, frames: list[Any], batch_size: int) -> float:
    """Seconds to VAE-encode pre-decoded clips in batches, as the stage's ClipEncoder.encode_frames does."""
    import torch

    from carv_attrib.models.wan import encode_video
    from carv_attrib.video.decode import frames_to_tensor

    t0 = time.perf_counter()
    for start in range(0, len(frames), batch_size):
        x = torch.stack([frames_to_tensor(f) for f in frames[start : start + batch_size]])  # (B, 3, F, H, W)
        encode_video(vae, x)
    return time.perf_counter() - t0


def overlapped(cfg: Any) -> dict[str, Any]:
    """The encode stage end to end into a fresh run directory; its summary and shard timers."""
    from carv_attrib.pipeline.encode import run_encode
    from carv_attrib.store.shards import ShardStore

    shutil.rmtree(cfg.run, ignore_errors=True)
    t = time.perf_counter()
    summary = run_encode(cfg)
    wall = time.perf_counter() - t
    timers: dict[str, float] = {}
    for shard in ShardStore(Path(cfg.run), "latents").read_stats():
        for key in ("wait_decode_s", "vae_s", "text_s", "wall_s"):
            timers[key] = timers.get(key, 0.0) + shard.get(key, 0.0)
    shutil.rmtree(cfg.run, ignore_errors=True)
    return {"seconds": wall, "stage_seconds": summary.seconds, "ok": summary.ok, "shard_timers": timers}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(BENCH / "_work" / "encode_speed"))
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--workers", type=int, default=2, help="decode worker processes")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per VAE call")
    parser.add_argument("--threads", default="1,2", help="torch thread counts for encode-only and overlapped")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load below this")
    parser.add_argument("--max-wait", type=float, default=120.0, help="... but at most this many seconds")
    parser.add_argument("--out", default=str(BENCH / "results" / "encode_speed.json"))
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t]
    t0 = time.monotonic()

    import torch

    from carv_attrib.lds.synthetic import make_demo_data
    from carv_attrib.models.tiny import make_model
    from carv_attrib.models.wan import encode_prompts, load_wan
    from carv_attrib.pipeline.encode import EncodeConfig
    from carv_attrib.store.manifest import read_manifest
    from carv_attrib.video.decode import FramePolicy

    # -- setup: model and demo clips (kept in the work dir) ------------------------------------------
    work = Path(args.work)
    model_dir, data_dir = work / f"model-{args.model_size}", work / f"data-{args.clips}"
    if not (model_dir / "model_index.json").exists():
        make_model(str(model_dir), args.model_size)
    manifest = make_demo_data(data_dir, clips=args.clips)
    videos = data_dir / "videos"
    table = read_manifest(manifest, videos)
    policy = FramePolicy()
    n = len(table)
    captions = list(dict.fromkeys(table.caption))
    wan = load_wan(str(model_dir), ("vae", "text_encoder", "tokenizer"), device="cpu")
    frames = decode_all(table.path, policy)  # the input of encode-only
    setup_s = time.monotonic() - t0
    print(
        f"encode speed: {n} demo clips ({len(captions)} distinct captions), {args.model_size} model, "
        f"policy {policy.frames} frames {policy.height}x{policy.width} fps {policy.fps:g}, "
        f"VAE batch {args.batch_size}, decode workers {args.workers}/0, torch threads {threads}; "
        f"setup {setup_s:.1f} s"
    )

    def config(workers: int, tag: str) -> Any:
        return EncodeConfig(
            manifest=manifest,
            model=str(model_dir),
            run=work / "runs" / tag,
            videos=videos,
            frames=policy.frames,
            size=f"{policy.width}x{policy.height}",
            fps=policy.fps,
            batch_size=args.batch_size,
            workers=workers,
            device="cpu",
        )

    worker_counts = [args.workers, 0] if args.workers else [0]
    # One measurement: name -> callable returning seconds (or a dict with "seconds").
    plan: list[tuple[str, int, Any]] = []
    for w in worker_counts:
        plan.append((f"decode_only_w{w}", 0, lambda w=w: decode_only(table.path, policy, w)))
    for t in threads:
        plan.append((f"vae_only_t{t}", t, lambda: vae_only(wan.vae, frames, args.batch_size)))
        plan.append((f"text_only_t{t}", t, lambda: timed(lambda: encode_prompts(wan, captions))))
        for w in worker_counts:
            plan.append((f"overlapped_w{w}_t{t}", t, lambda w=w, t=t: overlapped(config(w, f"w{w}-t{t}"))))

    def run(t: int, fn: Any) -> dict[str, Any]:
        torch.set_num_threads(t or max(threads))
        out = fn()
        return out if isinstance(out, dict) else {"seconds": out}

    quiet = wait_for_quiet(args.max_load, args.max_wait)
    load_start = load_avg()
    print(f"load average at start {load_start} (waited {quiet['waited_s']} s)")
    warm = {}
    for name, t, fn in plan:
        warm[name] = run(t, fn)["seconds"]
    print("warm-up s: " + ", ".join(f"{k} {v:.2f}" for k, v in warm.items()))

    raw: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
    for r in range(args.repeats):
        for name, t, fn in plan:
            raw[name].append(run(t, fn))
        print(
            f"round {r + 1}/{args.repeats} s: "
            + ", ".join(f"{k} {v[-1]['seconds']:.2f}" for k, v in raw.items())
            + f"  (load {load_avg()[0]:.2f})"
        )
    load_end = load_avg()

    # -- rates -----------------------------------------------------------------------------------------
    seconds = {name: [m["seconds"] for m in runs] for name, runs in raw.items()}
    rates: dict[str, float] = {name: n / median(s) for name, s in seconds.items()}
    for t in threads:
        both = [a + b for a, b in zip(seconds[f"vae_only_t{t}"], seconds[f"text_only_t{t}"])]
        seconds[f"encode_only_t{t}"] = both
        rates[f"encode_only_t{t}"] = n / median(both)
    for w in worker_counts:
        ok = {m["ok"] for m in raw[f"decode_only_w{w}"]}
        assert ok == {n}, f"decode-only with {w} workers decoded {ok} of {n} clips"
    for t in threads:
        for w in worker_counts:
            ok = {m["ok"] for m in raw[f"overlapped_w{w}_t{t}"]}
            assert ok == {n}, f"run_encode with {w} workers encoded {ok} of {n} clips"

    print(f"\nclips/s (median of {args.repeats}; {n} clips; higher is better)")
    first = {w: median([m["first_result_s"] for m in raw[f"decode_only_w{w}"]]) for w in worker_counts}
    print(
        f"  {'decode-only':34}"
        + "".join(f"  workers={w}: {rates[f'decode_only_w{w}']:7.2f}" for w in worker_counts)
        + "   (first result after "
        + ", ".join(f"{first[w]:.2f} s" for w in worker_counts)
        + ")"
    )
    for t in threads:
        print(
            f"  {f'encode-only, torch threads {t}':34}  VAE: {rates[f'vae_only_t{t}']:7.2f}"
            f"  text: {rates[f'text_only_t{t}']:7.2f}  VAE+text: {rates[f'encode_only_t{t}']:7.2f}"
        )
    for t in threads:
        print(
            f"  {f'overlapped run_encode, threads {t}':34}"
            + "".join(f"  workers={w}: {rates[f'overlapped_w{w}_t{t}']:7.2f}" for w in worker_counts)
        )
    print("\nrun_encode shard timers (median s): wait for decode / VAE / text / stage wall")
    timers: dict[str, dict[str, float]] = {}
    for t in threads:
        for w in worker_counts:
            name = f"overlapped_w{w}_t{t}"
            timers[name] = {
                k: median([m["shard_timers"].get(k, 0.0) for m in raw[name]])
                for k in ("wait_decode_s", "vae_s", "text_s", "wall_s")
            }
            timers[name]["stage_seconds"] = median([m["stage_seconds"] for m in raw[name]])
            tm = timers[name]
            print(
                f"  {name:22} {tm['wait_decode_s']:6.2f} / {tm['vae_s']:6.2f} / {tm['text_s']:6.2f} / "
                f"{tm['wall_s']:6.2f}   (run_encode total incl. model load {tm['stage_seconds']:.2f})"
            )

    out = {
        "benchmark": "encode_speed",
        "config": {
            "clips": n,
            "distinct_captions": len(captions),
            "model_size": args.model_size,
            "policy": policy.to_dict(),
            "batch_size": args.batch_size,
            "workers": worker_counts,
            "torch_threads": threads,
            "repeats": args.repeats,
            "work": str(work),
            "unit": "clips per second = clips / median seconds",
        },
        "machine": machine_info(),
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "waited_for_quiet": quiet,
        "setup_s": setup_s,
        "warmup_s": warm,
        "clips_per_s": rates,
        "seconds": {name: stats(s) for name, s in seconds.items()},
        "decode_pool_startup_s": {
            f"workers={w}": {
                "pool_enter": median([m["startup_s"] for m in raw[f"decode_only_w{w}"]]),
                "first_result": median([m["first_result_s"] for m in raw[f"decode_only_w{w}"]]),
            }
            for w in worker_counts
        },
        "run_encode_shard_timers_median_s": timers,
        "notes": [
            "decode-only includes DecodePool start-up (forkserver workers); encode-only excludes decoding "
            "and model loading; overlapped is run_encode's whole call (model load, manifest, hashing, "
            "Parquet writes included) on a fresh run directory.",
            "text-only embeds the distinct captions once, as run_encode's caption cache does; its clips/s "
            "is clips / that time.",
            "DecodePool's forkserver workers re-run the calling script's top level (as __mp_main__) on every "
            "start: this script imports torch/carv_attrib only inside functions, like the carv-attrib console "
            "script, so worker start-up here is what the CLI pays (a library caller that imports torch at "
            "its top level pays a torch import per worker start on top).",
        ],
        "wall_s": time.monotonic() - t0,
    }
    out["notes"].append(
        f"1-min load average {load_start[0]} at start (before any work) and {load_end[0]} at end; the end "
        "figure and the per-round loads include this benchmark's own threads and decode workers"
    )
    if load_start[0] > args.max_load:
        out["notes"].append(
            f"machine was loaded by other jobs at the start (1-min load {load_start[0]}): absolute rates "
            "are depressed and noisy"
        )
    path = write_json(args.out, out)
    print(f"\nwrote {path} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
