"""Figures and HTML of the neuron inspector and the rank-stability view (numbers come from core)."""
from __future__ import annotations

import html
from collections.abc import Sequence

import plotly.graph_objects as go

from core.measure.outputs import shown_tokens

from .figures import LAYOUT, _finish, color

# legend under the plot: three or more entries would wrap into the title of a half-width chart
BELOW = {"legend": {"orientation": "h", "yanchor": "top", "y": -0.2, "x": 0},
         "margin": {**LAYOUT["margin"], "b": 120}}


def contexts_html(contexts: Sequence[dict]) -> str:
    """Each top-activating context as a line of text; every token shaded by a_j (orange > 0, blue < 0,
    strength relative to the largest |a_j| shown), the firing token outlined; hover shows a_j."""
    if not contexts:
        return '<div class="neuron-contexts">No contexts.</div>'
    scale = max(abs(v) for c in contexts for v in c["activations"]) or 1.0
    lines = []
    for number, c in enumerate(contexts, start=1):
        spans = []
        for i, (token, value) in enumerate(zip(c["tokens"], c["activations"])):
            alpha = min(1.0, abs(value) / scale)
            rgb = "213,94,0" if value >= 0 else "0,114,178"
            edge = " outline: 2px solid #212529;" if i == c["center"] else ""
            text = html.escape(token).replace("\n", "↵")
            spans.append(f'<span class="tok" title="a = {value:+.4g}" style="background: rgba({rgb},{alpha:.3f});'
                         f'{edge}">{text}</span>')
        change = (f"{html.escape(repr(c['top1_before']))} → {html.escape(repr(c['top1_after']))}"
                  if c["top1_before"] != c["top1_after"] else f"{html.escape(repr(c['top1_before']))} (unchanged)")
        lines.append(f'<div class="neuron-context"><div class="ctx-head">#{number} · window {c["window"]}, token '
                     f'{c["position"]} · a = {c["activation"]:+.4g} · KL if removed {c["kl"]:.4g} nats · top-1 '
                     f'{change}</div><div class="ctx-text">{"".join(spans)}</div></div>')
    return ('<div class="neuron-contexts" style="font-family: ui-monospace, monospace; line-height: 1.9">'
            + "".join(lines) + "</div>")


def menu_change(menu: Sequence[dict], title: str) -> go.Figure:
    """Next-token probabilities before and after removing the neuron, for the same candidates."""
    labels = shown_tokens([r["token"] for r in menu])
    fig = go.Figure([go.Bar(x=labels, y=[r["p_before"] for r in menu], name="dense", marker_color=color(0)),
                     go.Bar(x=labels, y=[r["p_after"] for r in menu], name="this neuron removed",
                            marker_color=color(1))])
    return _finish(fig, barmode="group", height=360, title=title, xaxis_title="candidate next token",
                   yaxis_title="probability")


def stability_rho(layer_rows: Sequence[dict], within: Sequence[str], across: Sequence[str]) -> go.Figure:
    """Per-layer Spearman ρ: solid lines between draws of one criterion, dashed between criteria on
    the same draw. Criteria that differ more than draws do sit below the solid lines."""
    layers = [r["layer"] for r in layer_rows]
    fig = go.Figure()
    for i, name in enumerate(within):
        fig.add_trace(go.Scatter(x=layers, y=[r[f"ρ {name} (draws)"] for r in layer_rows], mode="lines+markers",
                                 name=f"{name}: draw vs draw", marker_color=color(i)))
    for j, name in enumerate(across):
        label = name.replace("|", " vs ")
        fig.add_trace(go.Scatter(x=layers, y=[r[f"ρ {label}"] for r in layer_rows], mode="lines+markers",
                                 name=f"{label}: same draw", line={"dash": "dash"},
                                 marker_color=color(len(within) + j)))
    return _finish(fig, height=440, title="Rank agreement per layer: draws vs criteria", xaxis_title="layer",
                   yaxis_title="Spearman ρ", yaxis_range=[-0.05, 1.05], **BELOW)


def stability_overlap(layer_rows: Sequence[dict], within: Sequence[str], across: Sequence[str],
                      ratio: str) -> go.Figure:
    """Per-layer share of removals two score sets agree on, at ``ratio``."""
    layers = [r["layer"] for r in layer_rows]
    fig = go.Figure()
    for i, name in enumerate(within):
        fig.add_trace(go.Bar(x=layers, y=[r[f"overlap {name} (draws) @{ratio}"] for r in layer_rows],
                             name=f"{name}: draw vs draw", marker_color=color(i)))
    for j, name in enumerate(across):
        label = name.replace("|", " vs ")
        fig.add_trace(go.Bar(x=layers, y=[r[f"overlap {label} @{ratio}"] for r in layer_rows],
                             name=f"{label}: same draw", marker_color=color(len(within) + j),
                             marker_pattern_shape="/"))
    return _finish(fig, barmode="group", height=440, title=f"Removal overlap per layer at ratio {ratio}",
                   xaxis_title="layer", yaxis_title="share of removals in common", yaxis_range=[0, 1], **BELOW)
