"""Host memory available now: what `encode --vae-tiling auto` and the index size check compare with.
Torch- and faiss-free, so both sides can use it."""

from __future__ import annotations

from pathlib import Path


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux /proc/meminfo MemAvailable), None when
    unknown (another OS, an unreadable /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
