"""The always-visible status line ("which state am I in?") and the number formats the tabs share."""
from __future__ import annotations

import math
from collections.abc import Sequence

import gradio as gr
import pandas as pd

from core.models.counts import count_params

from .guard import session_id
from .state import MAX_VARIANTS_PER_SESSION, Session


def count(n: float | None, digits: int = 1) -> str:
    """134515008 → '134.5 M', 1536 → '1,536', None → '—'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    for size, suffix in ((1e12, " T"), (1e9, " B"), (1e6, " M")):
        if abs(n) >= size:
            return f"{n / size:.{digits}f}{suffix}"
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.{digits + 2}g}"


def digits_needed(values: Sequence[float | None], digits: int = 4, most: int = 12) -> int:
    """The fewest significant digits, at least ``digits`` (at most ``most``), at which the values
    that differ all read differently (None and NaN are left out)."""
    finite = {v for v in values if v is not None and math.isfinite(v)}
    return next((d for d in range(digits, most) if len({_sig(v, d) for v in finite}) == len(finite)), most)


def distinct(values: Sequence[float | None], digits: int = 4) -> list[float | None]:
    """The values rounded to :func:`digits_needed` significant digits: [1.20341, 1.20348] →
    [1.2034, 1.2035], [0.91234, 1.70011] → [0.9123, 1.7]. None and NaN pass through; the results
    stay numbers, so a table still sorts them as numbers."""
    d = digits_needed(values, digits)
    return [v if v is None or not math.isfinite(v) else _sig(v, d) for v in values]


def _sig(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


def readable(frame: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """``frame`` with every float column passed through :func:`distinct` (a copy): the one rounding
    the dashboard's tables use, so two variants that differ never show the same number."""
    out = frame.copy()
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = distinct([None if pd.isna(v) else float(v) for v in out[column]], digits)
    return out


def number(value: float | None, among: Sequence[float | None] = (), digits: int = 4) -> str:
    """``value`` as text with enough significant digits to tell it from every value in ``among`` that
    differs (at least ``digits``); '—' for None or NaN."""
    if value is None or not math.isfinite(value):
        return "—"
    d = digits_needed([value, *among], digits)
    return f"{value:,.0f}" if abs(value) >= 10 ** d else f"{value:.{d}g}"


def megabytes(n: float | None) -> str:
    """Bytes → '538 MB' (decimal, as disk sizes are usually quoted)."""
    return "—" if n is None else f"{n / 1e6:,.0f} MB"


def status_markdown(services, session: Session) -> str:
    """One line: model, data (source, windows × tokens, seed), criteria scored, variants held; a
    second line when scores were set aside by a change of model or data."""
    if not session.model_spec:
        return ("**Nothing loaded yet.** Press **Score** on the Importance tab (it loads the model), or follow the "
                "**Tour**.")
    spec = session.model_spec
    params = ""
    if services.models.cached(spec):
        params = f" ({count(count_params(services.model(spec).model)['params'])} parameters)"
    data = session.data.short() if session.data else "—"
    scored = ", ".join(name + (" (precomputed)" if result.config.get("precomputed") else "")
                       for name, result in session.scores.items()) or "none yet"
    held = len(session.variants)
    variants = f"{held} of {MAX_VARIANTS_PER_SESSION}" + (f": {', '.join(session.variants)}" if held else "")
    nxt = session.next_to_drop()
    if nxt:
        variants += (f" — full: the next one replaces **{nxt}**, unless it is what that action reads from (choose "
                     "under Prune ▸ Variants held)")
    line = (f"**Model** {spec}{params} · **Data** {data} · **Scored** {scored} · **Variants** {variants}")
    if session.set_aside:
        line += f"  \n⚠ {session.set_aside}"
    return line


def make_refresh(services):
    """Handler: redraw the status line and show, once, any notice the last action left (as a toast)."""
    def refresh(request: gr.Request = None) -> str:
        session = services.sessions.get(session_id(request))
        for notice in session.take_notices():
            gr.Warning(notice)
        return status_markdown(services, session)
    return refresh
