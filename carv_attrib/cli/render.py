"""The human views of the commands' results, in one place: each takes a library result and prints
it (data tables on stdout, summaries and advice on stderr). User and library text (captions, paths,
errors) is printed literally, never as rich markup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from carv_attrib.cli.common import err_console, out_console, say


def _changes(changes: dict[str, int], skip: str) -> str:
    return ", ".join(f"{k} {v}" for k, v in changes.items() if k != skip)


def _dry_run_lengths(length: dict[str, Any]) -> None:
    """The dry run's prediction of too_short and still_image clips, with advice that works at once."""
    about = "about " if length.get("sampled") else ""
    if length.get("too_short"):
        need = f" (they must last more than {length['needs_s']:.2f} s)" if length.get("needs_s") else ""
        err_console.print(
            Text.assemble(
                (f"{about}{length['too_short']} clips are too short", "yellow"),
                f" for the frame policy{need} and would fail too_short, e.g. "
                f"{', '.join(length['too_short_examples'])}; add --pad-short to repeat their last frame "
                "(it changes no clip already encoded), or lower --frames / --fps",
            ),
            soft_wrap=True,
        )
    if length.get("still_image"):
        err_console.print(
            Text.assemble(
                (f"{about}{length['still_image']} files are still images", "yellow"),
                f" and would fail still_image, e.g. {', '.join(length['still_image_examples'])}",
            ),
            soft_wrap=True,
        )


def encode(summary: Any, shard: str | None, run: Any) -> None:
    """An `EncodeSummary`: the dry-run estimate, or the counts, failure examples and advice."""
    changes = _changes(summary.changes, "to_encode")
    if summary.dry_run:
        files = summary.files or {}
        for kind, what in (("missing", "missing"), ("not_a_file", "not regular files")):
            if files.get(kind):
                shown = ", ".join(files[f"{kind}_examples"])
                more = f" and {files[kind] - len(files[f'{kind}_examples'])} more" if files[kind] > 5 else ""
                err_console.print(
                    Text.assemble(
                        (f"{files[kind]} video files {what}", "red"),
                        f" (encoded as failed clips): {shown}{more}",
                    ),
                    soft_wrap=True,
                )
        todo = summary.changes["to_encode"]
        present = files.get("to_encode_present", todo)
        unhashed = files.get("to_encode_unhashed", 0)
        by_stat = (
            f", {unhashed} of them because no hash is on record for their path, size and mtime (new or "
            "touched files: the encode hashes those first and skips any whose bytes it already encoded)"
            if unhashed and summary.total
            else ""
        )
        length = files.get("length") or {}
        probed = (
            f"; {length['probed']} of them probed for their length"
            + (" (an evenly spaced sample)" if length.get("sampled") else "")
            if length.get("probed")
            else ""
        )
        err_console.print(
            Text.assemble(
                ("dry run", "yellow"),
                f": would encode {todo} clips ({changes}){by_stat}; about {summary.estimated_s:.0f} s "
                f"for the {present} whose file is present; counted from sizes and mtimes, no file was "
                f"read or hashed{probed}; nothing was written",
            ),
            soft_wrap=True,
        )
        _dry_run_lengths(length)
        return
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary.failures.items())) or "none"
    err_console.print(
        Text.assemble(
            ("encoded", "green"),
            f" {summary.encoded} clips ({changes}) in {summary.seconds:.1f} s, "
            f"{summary.clips_per_s:.2f} clips/s; the run: {summary.ok}/{summary.total} clips ok, "
            f"failures: {kinds} -> {run}/latents",
        )
    )
    for ex in summary.examples:
        err_console.print(
            Text.assemble("  ", (str(ex["status"]), "red"), f" {ex['vid']}: {ex['error']}"), soft_wrap=True
        )
    for warning in summary.warnings:  # e.g. captions past 512 UMT5 tokens
        err_console.print(Text.assemble(("warning", "yellow"), f": {warning}"), soft_wrap=True)
    if shard is not None:
        say(
            f"part {shard} done; once every part is, the same command without --shard commits "
            "the run (it finds the parts' clips and encodes only what a part missed)"
        )
    if set(summary.failures) - {"missing"} and summary.changes["retried"] == 0:
        # a missing file is encoded once it is back; other failures only when asked
        say("failed clips are kept as failures; `--retry-failed` tries them again")


def featurize(result: Any, cfg: Any) -> None:
    """A `FeaturizeResult`: the dry-run estimate, a part's counts, or the counts and the index."""
    summary, info = result.summary, result.index
    changes = _changes(summary.changes, "to_compute")
    if summary.dry_run:
        err_console.print(
            Text.assemble(
                ("dry run", "yellow"),
                f": would compute {summary.changes['to_compute']} features ({changes}), about "
                f"{summary.estimated_s:.0f} s, then rebuild the index; nothing was written",
            )
        )
        return
    if info is None:  # a --shard part: the human line is printed under every format (`shard_note`)
        return
    err_console.print(
        Text.assemble(
            ("featurized", "green"),
            f" {summary.computed} clips ({changes}) in {summary.seconds:.1f} s; the run: "
            f"{summary.ok}/{summary.clips} clips ok (dim {summary.dim}, {summary.nonfinite} non-finite, "
            f"p(σ) {summary.density}); index: {info.count} clips, {info.preconditioner['kind']} -> {cfg.run}/index",
        )
    )
    if result.kept:
        kept_text = ", ".join(f"{k} {v}" for k, v in result.kept.items())
        say(f"the index kept the previous index's {kept_text} (give the option to change it)")


def featurize_part(summary: Any, cfg: Any) -> None:
    """The note of a finished `--shard` part (stderr, under every --format)."""
    say(
        f"part {cfg.shard}: computed {summary.computed} features ({_changes(summary.changes, 'to_compute')}); "
        f"once every part is done, `carv-attrib index {cfg.run}` builds the index (it refuses while clips "
        "lack features)"
    )


def index(info: Any) -> None:
    """An `IndexInfo` just built."""
    err_console.print(
        Text.assemble(
            ("indexed", "green"),
            f" {info.count} clips, dim {info.dim}",
            f" -> {info.sketch['out_dim']} ({info.sketch['kind']} sketch, seed {info.sketch.get('seed', 0)})"
            if info.sketch
            else "",
            f", {info.preconditioner['kind']}, {info.factory}",
            f", {info.shards} shards" if info.shards > 1 else "",
            f" ({info.build['parts']} Ray parts)" if info.build.get("executor") == "ray" else "",
        )
    )


def finetune(summary: Any) -> None:
    """A `FinetuneSummary`: what was trained, the loss, where it went and how to use it."""
    if summary.already_done:
        head, what = (
            ("up to date", "green"),
            f" {summary.out} already holds the {summary.steps}-step finetune; ",
        )
    else:
        rate = f", {summary.steps_per_s:.3f} steps/s" if summary.steps_per_s else ""
        resumed = f" (resumed at step {summary.resumed_from})" if summary.resumed_from else ""
        head = ("fine-tuned", "green")
        mixed = (
            f" in {summary.dtype} mixed precision"
            if getattr(summary, "dtype", "float32") != "float32"
            else ""
        )
        what = (
            f" {summary.trained_steps} steps{resumed} on {summary.clips} clips{mixed} in {summary.seconds:.1f} s{rate}; "
            f"{summary.trainable_params} trainable parameters; "
        )
    loss = (
        f"loss {summary.loss_first:.4f} -> {summary.loss_last:.4f} (mean of the last 10 steps)"
        if summary.loss_first is not None and summary.loss_last is not None
        else "no loss recorded"
    )
    err_console.print(Text.assemble(head, what, loss), soft_wrap=True)
    if summary.kind == "lora":
        say(f"{summary.out}: a diffusers LoRA adapter (WanPipeline.load_lora_weights({summary.out!r}))")
    else:
        say(
            f"{summary.out}: the fine-tuned transformer; attribute with it: carv-attrib featurize RUN -m MODEL --checkpoint {summary.out}"
        )


_FLAG_ORDER = ("timesteps", "draws", "antithetic", "output_fn", "plan", "density")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_cost(est: dict[str, Any], dry_run: bool) -> str:
    """The line `plan` prints before its pilot: how many draws, about how long, what trims it."""
    d = est["draws"]
    span = (
        _duration(est["seconds_min"])
        if round(est["seconds_min"]) == round(est["seconds_max"])
        else f"{_duration(est['seconds_min'])} to {_duration(est['seconds_max'])}"
    )
    reencode = (
        f" + a re-encode of the pilot clips ({_duration(est['reencode_s'])})" if est["reencode_s"] else ""
    )
    head = "would take" if dry_run else "will take"
    return (
        f"plan: pilot of {est['pilot_clips']} clips, ranking of {est['rank_clips']}: {head} about {span} "
        f"({d['total_min']:,} to {d['total_max']:,} draws at {est['seconds_per_draw']:.3g} s/draw, timed on "
        f"{est['timed_clips']} clips here{reencode}; the ranking stops at the first stable K). "
        "Smaller: --replicates, --rank-clips, --k-max, --pilot-clips."
    )


def _plan_columns(ks: list[str], doc: dict[str, Any], draws: int, width: int) -> list[str]:
    """The K columns of plan's ECM table that fit `width` characters beside the scheme, var/iid and
    limit columns, chosen in order of interest (the recommended K, 1, the pilot's K, the largest,
    then the rest) and shown in numeric order. Each column is as wide as its widest cell + 3
    (padding and border)."""
    rows = list(doc["schemes"].values())

    def col(k: str) -> int:
        return max(len(f"K={k}"), *(len(f"{r['ecm'][k]:.2f}") for r in rows)) + 3

    used = 1 + max(map(len, doc["schemes"])) + 3 + len("var/iid") + 3
    used += max(len("limit"), *(len(f"{r['ecm_limit']:.1f}") for r in rows)) + 3
    rec = str(doc.get("recommended", {}).get("draws", ""))
    chosen: list[str] = []
    for k in dict.fromkeys([k for k in (rec, "1", str(draws), ks[-1]) if k in ks] + ks):
        if used + col(k) > width and len(chosen) >= 2:
            break
        chosen.append(k)
        used += col(k)
    return sorted(chosen, key=int)


def plan(doc: dict[str, Any], draws: int, k_max: int) -> None:
    """A plan document: the costs line and ECM table on stdout, the recommended options on stderr.
    draws / k_max: the pilot's --draws and --k-max (named in the title and the advice)."""
    c = doc["costs"]
    out_console.print(
        f"c_enc {c['c_enc']:.4g} s/clip ({c['c_enc_source']}), c_draw {c['c_draw']:.4g} s/draw, "
        f"ratio {c['c_enc_over_c_draw']:.3g}; σ_b² = 0 (mode latents)"
    )
    # numeric order (a plan.json read back has its keys sorted as text: "1", "16", "2", ...)
    all_ks = sorted(next(iter(doc["schemes"].values()))["ecm"], key=int)
    ks = _plan_columns(all_ks, doc, draws, out_console.width)
    names = list(doc["schemes"])
    table = Table(title=f"ECM against fresh-encode iid K=1 (within-encode variance measured at K={draws})")
    table.add_column("scheme", no_wrap=True, min_width=max(map(len, names)))  # never "stra…"
    table.add_column("var/iid", justify="right", no_wrap=True)
    for k in ks:
        table.add_column(f"K={k}", justify="right", no_wrap=True)
    table.add_column("limit", justify="right", no_wrap=True)
    if len(ks) < len(all_ks):
        table.caption = (
            f"K={', '.join(k for k in all_ks if k not in ks)} left out at this width (--format json has all)"
        )
    for name, row in doc["schemes"].items():
        table.add_row(
            name,
            f"{row['variance_ratio_vs_iid']:.3f}",
            *[f"{row['ecm'][k]:.2f}" for k in ks],
            f"{row['ecm_limit']:.1f}",
        )
    out_console.print(table)
    r = doc["recommended"]
    opts = r["featurize_options"]  # in flag order even when read back from a key-sorted plan.json
    flags = [
        f"--{k.replace('_', '-')}" if opts[k] is True else f"--{k.replace('_', '-')} {opts[k]}"
        for k in _FLAG_ORDER
        if k in opts
    ]
    say(f"recommended {' '.join(flags)} (ECM {r['ecm']:.2f})", style="green")
    rk = r["ranking"]
    last = rk["curve"][-1]
    say(
        f"at K={last['draws']} two estimator seeds share {last['top_k_overlap']:.0%} of each clip's top-{rk['top_k']} "
        f"and rank the {rk['clips'] - 1} others with Spearman {last['spearman']:.3f} (stable: overlap >= 90%, "
        "Spearman >= 0.95)"
    )
    if r["capped"]:
        say(
            f"--k-max {k_max} limits K: the rankings of two seeds still differ there; raise --k-max to see "
            "the K at which they agree",
            style="yellow",
        )


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _scale_caption(scale: dict[str, Any] | None) -> str | None:
    """What pctl and z are read against: the query's scores over the run (`search.scale`)."""
    if not scale:
        return None
    how = (
        f"all {scale['clips']} clips"
        if scale["method"] == "exact"
        else f"a sample of {scale['scores']} of {scale['clips']} clips (± {scale['percentile_se']:.1f} pctl)"
    )
    return (
        f"pctl: share of this query's scores over {how} at or below the result's; "
        f"z: (score − {scale['mean']:.4g}) / {scale['sd']:.3g}"
    )


def _uncertainty_caption(unc: dict[str, Any] | None, top_k: int | None) -> str | None:
    """How to read ± se and p top (`search.uncertainty`)."""
    if not unc:
        return None
    t = unc.get("t")
    interval = f"{unc['level']:.0%} interval score ± {t:.3g}·se" if t else "no interval (one draw)"
    side = "recomputed" if unc["clip_side"] == "recomputed" else "mirrored from the query's draws"
    return (
        f"± se: Monte Carlo standard error from {unc['draws']} draws ({unc['formula']}, clip side {side}; "
        f"{interval}); shared draws move neighbours together, so their gap is surer (se_gap in the JSON); "
        f"p top: chance the clip belongs in the top {top_k}"
    )


def _null_line(null: dict[str, Any], k: int) -> str:
    """One line under a query's table: how much of its top-k the empty-text ranking keeps."""
    if null["status"] != "ok":
        return f"null prompt: {null.get('error')}"
    vids = ", ".join(str(r["vid"]) for r in null["results"][:3])
    overlap = null["top_k_overlap"]
    share = "" if overlap is None else f" (overlap {overlap:.2f})"
    n, k_null = len(null["shared"]), len(null["results"])
    return f"null prompt: {n} of these {k} stay in the empty text's top {k_null}{share}; its top 3: {vids}"


def score_tables(doc: dict[str, Any]) -> None:
    """A score document's tables on stdout: one per query (or its error), then the aggregate."""
    for q in doc["queries"]:
        if q["status"] != "ok":
            out_console.print(Text(f"{q['path']}: {q['error']}", style="red"))
            continue
        scale = q.get("scale")
        under = " (the empty text: --null-prompt)" if q.get("conditioning") == "null" else ""
        unc = q.get("uncertainty")
        caption = "\n".join(
            c for c in (_scale_caption(scale), _uncertainty_caption(unc, doc.get("top_k"))) if c
        )
        table = Table(
            title=Text(f"{q['path']} — “{q['prompt']}”{under}"),
            title_justify="left",
            caption=caption or None,
            caption_justify="left",
        )
        table.add_column("rank", justify="right")
        table.add_column("vid")
        table.add_column("score", justify="right")
        if unc:
            table.add_column("± se", justify="right")
            table.add_column("p top", justify="right")
        if scale:
            table.add_column("pctl", justify="right")
            table.add_column("z", justify="right")
        table.add_column("caption")
        for r in q["results"]:
            placed = [_num(r.get("percentile"), ".1f"), _num(r.get("z"), "+.2f")] if scale else []
            sure = [_num(r.get("se"), ".2g"), _num(r.get("p_top_k"), ".2f")] if unc else []
            table.add_row(
                str(r["rank"]),
                Text(str(r["vid"])),
                f"{r['score']:.6g}",
                *sure,
                *placed,
                Text(str(r["caption"])),
            )
        out_console.print(table)
        null = q.get("null_prompt")
        if null:
            out_console.print(Text(_null_line(null, len(q["results"]))))
    agg = doc.get("aggregate")
    if agg:
        table = Table(title=f"aggregate ({agg['method']}, {agg['queries']} queries)", title_justify="left")
        for col in ("rank", "vid", "score", "caption"):
            table.add_column(col)
        for r in agg["results"]:
            table.add_row(str(r["rank"]), Text(str(r["vid"])), f"{r['score']:.6g}", Text(str(r["caption"])))
        out_console.print(table)


def evaluate(doc: dict[str, Any]) -> None:
    """An evaluate document: one LDS row per featurize setting, with the random-scores floor."""
    p, floor = doc["protocol"], doc["random_floor"]
    ad = doc.get("adapter")
    through = (
        f" through LoRA {Path(ad['path']).name} (rank {ad['rank']}, {ad['weights_sha256'][:12]}; retrained "
        f"on the training clips)"
        if ad
        else ""
    )
    table = Table(
        title=f"LDS on {p['train_clips']} clips, {p['queries']} queries, {p['subsets']} subsets{through} "
        f"(random scores {floor['mean']:.3f} ± {floor['sd']:.3f})",
        title_justify="left",
    )
    for col in ("setting", "LDS", "95 % CI", "query-specific", "common factor", "draws/clip", "seconds"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for name, row in doc["settings"].items():
        lo, hi = row["lds"].get("ci95_subsets", row["lds"]["ci95"])
        qs = row.get("query_specific_lds", {}).get("mean")
        cf = row.get("common_factor_lds")
        table.add_row(
            Text(name),
            f"{row['lds']['mean']:.3f}",
            f"[{lo:.3f}, {hi:.3f}]",
            "" if qs is None else f"{qs:.3f}",
            "" if cf is None else f"{cf:.3f}",
            str(row["draws"]),
            f"{row['seconds']:.0f}",
        )
    out_console.print(table)
