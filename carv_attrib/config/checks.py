"""Validation helpers of the stage configs: each refuses a bad value with a `UsageError` (exit 2)
naming the flag, and the parsers turn a flag's text into the value the library takes."""

from __future__ import annotations

from typing import Any

from carv_attrib.choices import EXECUTORS
from carv_attrib.errors import UsageError


def check_choice(flag: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value}: choose one of {', '.join(choices)}")


def check_min(flag: str, value: float, low: float) -> None:
    if value < low:
        raise UsageError(f"{flag} {value}: must be >= {low:g}")


def parse_size(text: str) -> tuple[int, int]:
    """'832x480' → (width, height)."""
    try:
        w, h = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise UsageError(f"--size {text}: expected WxH, e.g. 64x64") from None
    return w, h


def parse_kron_dims(text: str | None) -> tuple[int, int] | None:
    """'16x8' → (16, 8) = (k_out, k_in)."""
    if text is None:
        return None
    try:
        k_out, k_in = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise UsageError(f"--kron-dims {text}: expected OUTxIN, e.g. 16x8") from None
    if k_out < 1 or k_in < 1:
        raise UsageError(f"--kron-dims {text}: both sizes must be >= 1")
    return k_out, k_in


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' → (I, N) with 0 <= I < N; None stays None. UsageError naming --shard otherwise."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise UsageError(f"--shard {text}: give I/N, e.g. 0/4 for the first of 4 parts") from None
    if not 0 <= i < n:
        raise UsageError(
            f"--shard {text}: I must be in 0..N-1 (here 0..{n - 1})"
            if n > 0
            else f"--shard {text}: N must be at least 1"
        )
    return i, n


def check_distribution(cfg: Any) -> None:
    """The --shard / --executor / --parts combination of an encode or featurize config."""
    parse_shard(cfg.shard)
    check_choice("--executor", cfg.executor, EXECUTORS)
    if cfg.shard is not None and cfg.executor != "local":
        raise UsageError("--shard is a part of a local run; --executor ray makes its own parts")
    if cfg.shard is not None and cfg.overwrite:
        raise UsageError(
            "--overwrite with --shard would let each part discard the others' work; start the parts "
            "on a new --run (or delete the stage's folder first)"
        )
    if cfg.parts is not None:
        check_min("--parts", cfg.parts, 1)


def parse_top_k(text: str) -> int | None:
    """'10' → 10, 'all' → None (every training clip)."""
    if str(text).lower() == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        raise UsageError(f"--top-k {text!r}: a positive integer or 'all'") from None
    if k < 1:
        raise UsageError("--top-k must be >= 1 or 'all'")
    return k
