"""plan's ECM table at 80 columns: full scheme names, K columns in numeric order, what is left out said."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from carv_attrib.attrib.pilot import PILOT_SCHEMES, scheme_name
from carv_attrib.cli import render

KS = ["1", "2", "4", "8", "16", "32", "64"]


def _doc() -> dict:
    schemes = {
        scheme_name(s, a): {
            "variance_ratio_vs_iid": 0.5,
            "ecm": {k: 123.45 for k in sorted(KS)},  # text-sorted keys, as a plan.json read back has them
            "ecm_limit": 538.7,
        }
        for s, a in PILOT_SCHEMES
    }
    return {
        "costs": {"c_enc": 1.0, "c_enc_source": "x", "c_draw": 0.1, "c_enc_over_c_draw": 10.0},
        "schemes": schemes,
        "recommended": {
            "draws": 8, "ecm": 40.0, "featurize_options": {"timesteps": "iid", "draws": 8}, "scheme": "iid",
            "capped": False,
            "ranking": {"top_k": 7, "clips": 24, "curve": [{"draws": 8, "top_k_overlap": 0.93, "spearman": 0.96}]},
        },
    }  # fmt: skip


def _render(width: int, monkeypatch: pytest.MonkeyPatch) -> str:
    buf = io.StringIO()
    monkeypatch.setattr(render, "out_console", Console(file=buf, width=width, color_system=None))
    monkeypatch.setattr(render, "say", lambda *a, **k: None)
    render.plan(_doc(), 4, 64)
    return buf.getvalue()


def test_80_columns_keep_names_and_say_what_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _render(80, monkeypatch)
    assert max(len(line) for line in text.splitlines()) <= 80
    for s, a in PILOT_SCHEMES:
        assert scheme_name(s, a) in text  # never "stra…"
    header = next(line for line in text.splitlines() if "var/iid" in line)
    shown = re.findall(r"K=(\d+)", header)
    assert (
        shown == sorted(shown, key=int) and {"1", "8"} <= set(shown) and len(shown) >= 3
    )  # K=8: recommended
    assert "left out at this width" in text


def test_wide_terminals_show_every_k_in_numeric_order(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _render(200, monkeypatch)
    header = next(line for line in text.splitlines() if "var/iid" in line)
    assert re.findall(r"K=(\d+)", header) == KS
    assert "left out" not in text
