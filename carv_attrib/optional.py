"""Optional dependencies: checked before the work that needs them, with the install hint."""

from __future__ import annotations

from carv_attrib.errors import UsageError


def require_matplotlib(flag: str = "--plot") -> None:
    """UsageError (exit 2) unless matplotlib (the [plot] extra) is importable."""
    try:
        import matplotlib  # noqa: F401  (probed, not used here)
    except ImportError as exc:
        raise UsageError(f"{flag} needs matplotlib: pip install 'carv-attrib[plot]'") from exc
