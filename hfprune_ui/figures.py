"""Plotly figure factories: each takes numbers the engine already computed and only draws them."""
from __future__ import annotations

import html
from typing import Sequence

import plotly.graph_objects as go

from core.counts import pareto_front

PALETTE = ("#1f6feb", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c", "#5c940d")
LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=50, b=45), height=360,
              legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def empty(message: str) -> go.Figure:
    """A blank figure that says what to do next."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14))
    fig.update_layout(**LAYOUT, xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def histograms(series: Sequence[tuple[str, Sequence[float], Sequence[int]]], log: bool) -> go.Figure:
    """Overlaid per-(criterion, layer) histograms: series of (name, bin edges, counts)."""
    fig = go.Figure()
    for i, (name, edges, counts) in enumerate(series):
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        fig.add_trace(go.Bar(x=centers, y=list(counts), width=edges[1] - edges[0], name=name, opacity=0.55,
                             marker_color=color(i)))
    fig.update_layout(**LAYOUT, barmode="overlay", title="Neuron importance per layer",
                      xaxis_title="log10(score)" if log else "score", yaxis_title="neurons")
    return fig


def heatmap(matrix: list[list[float]], criterion: str, log: bool) -> go.Figure:
    """Layer × neuron heatmap: each row is one layer's scores sorted high → low (relative to its mean)."""
    columns = len(matrix[0]) if matrix else 0
    x = [round(100 * c / max(1, columns - 1), 1) for c in range(columns)]
    fig = go.Figure(go.Heatmap(z=matrix, x=x, y=list(range(len(matrix))), colorscale="Viridis",
                               colorbar=dict(title="log10(s/mean)" if log else "s/mean")))
    fig.update_layout(**{**LAYOUT, "height": 420}, title=f"{criterion}: neurons sorted by score, per layer",
                      xaxis_title="neuron rank (% from most important)", yaxis_title="layer")
    return fig


def rank_scatter(rank_a: Sequence[float], rank_b: Sequence[float], name_a: str, name_b: str, layer: int,
                 removed_fraction: float) -> go.Figure:
    """Percentile rank under A vs under B for every neuron of one layer; the shaded corner is what
    both would remove at the chosen ratio."""
    fig = go.Figure(go.Scattergl(x=list(rank_a), y=list(rank_b), mode="markers", name=f"layer {layer}",
                                 marker=dict(size=4, opacity=0.5, color=color(0))))
    fig.add_shape(type="rect", x0=0, y0=0, x1=removed_fraction, y1=removed_fraction, line=dict(width=0),
                  fillcolor="rgba(217,72,15,0.15)")
    fig.update_layout(**{**LAYOUT, "height": 400}, title=f"Layer {layer}: rank under {name_a} vs {name_b}",
                      xaxis_title=f"{name_a} rank (0 = least important)", yaxis_title=f"{name_b} rank")
    return fig


def per_layer_bars(values: Sequence[float], title: str, y_title: str, y_range: tuple[float, float] | None = None,
                   name: str = "") -> go.Figure:
    fig = go.Figure(go.Bar(x=list(range(len(values))), y=list(values), marker_color=color(0), name=name))
    fig.update_layout(**LAYOUT, title=title, xaxis_title="layer", yaxis_title=y_title)
    if y_range:
        fig.update_yaxes(range=list(y_range))
    return fig


def widths(before: Sequence[int], after: Sequence[int]) -> go.Figure:
    """Kept MLP width per layer against the original width."""
    layers = list(range(len(before)))
    fig = go.Figure([go.Bar(x=layers, y=list(before), name="original", marker_color="#ced4da"),
                     go.Bar(x=layers, y=list(after), name="kept", marker_color=color(0))])
    fig.update_layout(**LAYOUT, barmode="overlay", title="MLP width per layer", xaxis_title="layer",
                      yaxis_title="neurons")
    return fig


def token_menu(tokens: Sequence[str], probs: dict[str, Sequence[float]], entropy: dict[str, float]) -> go.Figure:
    """Grouped bars: each model's probability for the same candidate next tokens."""
    labels = [repr(t)[1:-1] or "∅" for t in tokens]
    fig = go.Figure([go.Bar(x=labels, y=list(p), name=f"{name} (H={entropy[name]:.2f} nats)", marker_color=color(i))
                     for i, (name, p) in enumerate(probs.items())])
    fig.update_layout(**{**LAYOUT, "height": 400}, barmode="group", title="Next-token distribution (the whole menu)",
                      xaxis_title="candidate next token", yaxis_title="probability")
    return fig


def params_vs_perplexity(names: Sequence[str], params: Sequence[int], ppl: Sequence[float]) -> go.Figure:
    fig = go.Figure([go.Scatter(x=[params[i] / 1e6], y=[ppl[i]], mode="markers+text", text=[names[i]],
                                textposition="top center", marker=dict(size=12, color=color(i)), name=names[i])
                     for i in range(len(names))])
    fig.update_layout(**LAYOUT, title="Parameters vs perplexity", xaxis_title="parameters (M)",
                      yaxis_title="perplexity", showlegend=False)
    return fig


def kl_text(tokens: Sequence[str], kl: Sequence[float | None], scale: float) -> str:
    """HTML: every token on a red background whose strength grows with KL(original ‖ variant)."""
    scale = scale if scale > 0 else 1.0
    spans = []
    for token, value in zip(tokens, kl):
        text = html.escape(token).replace("\n", "↵<br>")
        if value is None:
            spans.append(f'<span class="tok" title="no prediction">{text}</span>')
            continue
        alpha = min(1.0, value / scale)
        spans.append(f'<span class="tok" title="KL = {value:.4f} nats" '
                     f'style="background: rgba(217,72,15,{alpha:.3f})">{text}</span>')
    return '<div class="kl-text">' + "".join(spans) + "</div>"


def generations(prompt: str, outputs: dict[str, str]) -> str:
    """HTML cards, one per model, side by side."""
    cards = "".join(f'<div class="gen-card"><div class="gen-name">{html.escape(name)}</div>'
                    f'<div class="gen-text"><b>{html.escape(prompt)}</b>{html.escape(text)}</div></div>'
                    for name, text in outputs.items())
    return f'<div class="gen-row">{cards}</div>'


def adaptive_trace(trace: Sequence[dict], layers: Sequence[int] | None = None) -> go.Figure:
    """The adaptive search: for each shown layer, every width tried vs the fidelity-loss increase it
    caused on the held-out slice (markers joined in width order), with the final width marked."""
    shown = [t for t in trace if layers is None or t["layer"] in layers]
    fig = go.Figure()
    for i, t in enumerate(shown):
        points = sorted((int(w), float(v)) for w, v in t["tried"])
        fig.add_trace(go.Scatter(x=[w for w, _ in points], y=[max(v, 1e-9) for _, v in points],
                                 mode="lines+markers", name=f"layer {t['layer']} → {t['width']}",
                                 marker_color=color(i), line=dict(width=1)))
    fig.update_layout(**LAYOUT, title="Adaptive search: width tried vs increase in held-out loss",
                      xaxis_title="kept width tried", yaxis_title="loss increase (nats, log)")
    fig.update_yaxes(type="log")
    return fig


def sweep_lines(rows: Sequence[dict], metric: str = "kl_to_dense") -> go.Figure:
    """One line per criterion: ``metric`` against the pruning ratio."""
    fig = go.Figure()
    for i, name in enumerate(dict.fromkeys(r["criterion"] for r in rows)):
        mine = sorted((r["ratio"], r[metric]) for r in rows if r["criterion"] == name)
        fig.add_trace(go.Scatter(x=[x for x, _ in mine], y=[y for _, y in mine], mode="lines+markers", name=name,
                                 marker_color=color(i)))
    label = {"kl_to_dense": "KL to dense (nats/token)", "perplexity": "perplexity",
             "top1_agreement": "top-1 agreement"}.get(metric, metric)
    fig.update_layout(**LAYOUT, title=f"{label} vs ratio", xaxis_title="ratio of MLP neurons removed",
                      yaxis_title=label)
    return fig


def pareto(names: Sequence[str], size_mb: Sequence[float], quality: Sequence[float], quality_label: str,
           lower_is_better: bool = True) -> go.Figure:
    """Size vs quality, one marker per variant; the Pareto-optimal ones (nothing both smaller and
    better) are joined by a line."""
    front = [(size_mb[i], quality[i]) for i in pareto_front(list(size_mb), list(quality), lower_is_better)]
    fig = go.Figure([go.Scatter(x=[s for s, _ in front], y=[v for _, v in front], mode="lines", name="Pareto front",
                                line=dict(color="#adb5bd", dash="dot"))])
    for i, (name, size, value) in enumerate(zip(names, size_mb, quality)):
        fig.add_trace(go.Scatter(x=[size], y=[value], mode="markers+text", text=[name], textposition="top center",
                                 marker=dict(size=12, color=color(i)), name=name))
    fig.update_layout(**LAYOUT, title=f"Weight size vs {quality_label}", xaxis_title="weights in memory (MB)",
                      yaxis_title=quality_label, showlegend=False)
    return fig
