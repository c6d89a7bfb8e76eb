"""The always-visible status line ("which state am I in?") and the number formats the tabs share."""
from __future__ import annotations

import math

import gradio as gr

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
