"""Plotly figure factories: each takes numbers the engine already computed and only draws them."""
from __future__ import annotations

import html
from collections.abc import Sequence
from itertools import pairwise

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.measure.outputs import shown_tokens
from core.models.counts import pareto_front

from .services import BASELINE

# Okabe–Ito: eight colours that stay distinct for colour-blind readers and on a projector
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C6D31")
LAYOUT = {"template": "plotly_white", "margin": {"l": 70, "r": 30, "t": 60, "b": 60}, "height": 380,
          "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
          "font": {"size": 13}}
AXES = {"automargin": True}
CHANCE_STYLE = {"color": "#868e96", "dash": "dash", "width": 1.5}


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


# legend and title geometry (px): a half-width plot at 1500 px has about this much room for a legend row
LEGEND_ROW_WIDTH = 480
WIDE = 1000  # the same for a plot across the whole page (the narrowest screen it is shown on)
LEGEND_ROW_HEIGHT = 22
TITLE_LINE_HEIGHT = 24
CHAR_WIDTH = 7.5  # a 13 px font's average character, rounded up


def legend_rows(fig: go.Figure, width: float = LEGEND_ROW_WIDTH) -> int:
    """How many rows a horizontal legend of ``fig`` takes in ``width`` px (0 when it shows none), the
    way plotly.js lays it out: one row when every entry (symbol 40 px + name) fits side by side, else
    a grid whose columns are as wide as the widest entry."""
    shown = [t for t in fig.data if t.name and t.showlegend is not False]
    if fig.layout.showlegend is False or (fig.layout.showlegend is None and len(shown) < 2):
        return 0
    entries = [40 + CHAR_WIDTH * len(html.unescape(str(t.name))) for t in shown]
    if sum(entries) <= width:
        return 1
    columns = max(1, int(width // max(entries)))
    return -(-len(entries) // columns)


def _title_lines(title) -> int:
    text = title.get("text", "") if isinstance(title, dict) else str(title or "")
    return (1 + text.count("<br>")) if text else 0


def _finish(fig: go.Figure, legend_width: float = LEGEND_ROW_WIDTH, **layout) -> go.Figure:
    """The shared look, with room at the top for the title and a legend of any length above the plot:
    the title sits at the figure's top edge, the legend just above the plotting area, and the top
    margin (and the height, so the plot keeps its size) grows with the legend's rows, so the two never
    overlap. ``legend_width``: the px a legend row has at the least (a plot across the whole page: wider).
    A legend placed elsewhere (below the plot) is left where it is."""
    merged = {**LAYOUT, **layout}
    fig.update_layout(**merged)
    legend = merged.get("legend", {})
    if legend.get("yanchor") == "bottom" and legend.get("y", 0) >= 1:
        title = merged.get("title")
        lines = _title_lines(title)
        rows = legend_rows(fig, legend_width)
        top = 16 + TITLE_LINE_HEIGHT * lines + 14 * max(0, lines - 1) + LEGEND_ROW_HEIGHT * rows
        base = merged["margin"]["t"]
        if top > base:
            fig.update_layout(margin={**merged["margin"], "t": top}, height=merged["height"] + top - base)
        if lines:
            fig.update_layout(title={**(title if isinstance(title, dict) else {"text": title}), "yref": "container",
                                     "y": 1, "yanchor": "top", "pad": {"t": 10 + 14 * (lines - 1)}})
        # subplot titles sit just above their panels: lift the legend over them
        above = any(a.yref == "paper" and (a.y or 0) >= 1 for a in fig.layout.annotations or ())
        if above and rows:
            plot_px = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
            fig.update_layout(legend_y=1 + 26 / max(plot_px, 1), margin_t=fig.layout.margin.t + 26,
                              height=fig.layout.height + 26)
    fig.update_xaxes(**AXES)
    fig.update_yaxes(**AXES)
    return fig


def empty(message: str) -> go.Figure:
    """A blank figure that says what to do next."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"size": 14})
    return _finish(fig, xaxis={"visible": False}, yaxis={"visible": False})


def _bars(edges: Sequence[float], counts: Sequence[int], name: str, colour: str, opacity: float,
          legend: bool = True, group: str | None = None) -> go.Bar:
    centers = [(a + b) / 2 for a, b in pairwise(edges)]
    return go.Bar(x=centers, y=list(counts), width=edges[1] - edges[0], name=name, opacity=opacity,
                  marker_color=colour, showlegend=legend, legendgroup=group or name)


def histograms(series: Sequence[tuple[str, Sequence[float], Sequence[int]]], log: bool, note: str = "") -> go.Figure:
    """All (name, bin edges, counts) series overlaid in one chart (the 'overlay' view)."""
    fig = go.Figure([_bars(edges, counts, name, color(i), 0.5) for i, (name, edges, counts) in enumerate(series)])
    return _finish(fig, WIDE, barmode="overlay", title=_title("Neuron importance per layer (overlay)", note),
                   xaxis_title="log10(score)" if log else "score", yaxis_title="neurons")


def histogram_facets(facets: dict[str, Sequence[tuple[int, Sequence[float], Sequence[int]]]], log: bool,
                     note: str = "") -> go.Figure:
    """Small multiples: one panel per criterion ({criterion: [(layer, edges, counts)]}), the same
    colour for the same layer in every panel, shared x axis so panels compare at a glance."""
    names = list(facets)
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, vertical_spacing=0.1 / max(1, len(names)),
                        subplot_titles=names)
    layers = sorted({layer for series in facets.values() for layer, _, _ in series})
    for row, name in enumerate(names, start=1):
        for layer, edges, counts in facets[name]:
            fig.add_trace(_bars(edges, counts, f"layer {layer}", color(layers.index(layer)), 0.6, legend=row == 1,
                                group=f"layer {layer}"), row=row, col=1)
        fig.update_yaxes(title_text="neurons", row=row, col=1)
    fig.update_xaxes(title_text="log10(score)" if log else "score", row=len(names), col=1)
    return _finish(fig, WIDE, barmode="overlay", height=max(380, 250 * len(names) + 80),
                   title=_title("Neuron importance per layer, one panel per criterion", note))


def _title(text: str, note: str) -> dict:
    return {"text": text + (f"<br><sup>{html.escape(note)}</sup>" if note else "")}


def heatmap(matrix: list[list[float]], criterion: str, log: bool,
            limits: tuple[float, float] | None = None) -> go.Figure:
    """Layer × neuron heatmap: each row is one layer's scores sorted high → low (relative to its mean);
    ``limits`` clip the colour scale (robust percentiles) so the bulk is not one flat colour."""
    columns = len(matrix[0]) if matrix else 0
    x = [round(100 * c / max(1, columns - 1), 1) for c in range(columns)]
    zmin, zmax = limits if limits else (None, None)
    unit = "log10(score ÷ layer mean)" if log else "score ÷ layer mean"
    fig = go.Figure(go.Heatmap(z=matrix, x=x, y=list(range(len(matrix))), colorscale="Viridis", zmin=zmin,
                               zmax=zmax, colorbar={"title": {"text": unit, "side": "right"}},
                               hovertemplate="layer %{y}<br>rank %{x} %<br>" + unit + " %{z:.3g}<extra></extra>"))
    note = "colours clipped to the 2nd–98th percentile" if limits else ""
    return _finish(fig, height=460, title=_title(f"{criterion}: each layer's neurons sorted by score", note),
                   xaxis_title="neuron rank (% from most important)", yaxis_title="layer")


def rank_scatter(rank_a: Sequence[float], rank_b: Sequence[float], name_a: str, name_b: str, layer: int,
                 removed_fraction: float) -> go.Figure:
    """Percentile rank under A vs under B for every neuron of one layer; the shaded corner is what
    both would remove at the chosen ratio."""
    fig = go.Figure(go.Scattergl(x=list(rank_a), y=list(rank_b), mode="markers", name=f"layer {layer}",
                                 marker={"size": 4, "opacity": 0.5, "color": color(0)}))
    fig.add_shape(type="rect", x0=0, y0=0, x1=removed_fraction, y1=removed_fraction, line={"width": 0},
                  fillcolor="rgba(213,94,0,0.15)")
    return _finish(fig, height=420, title=f"Layer {layer}: rank under {name_a} vs {name_b}",
                   xaxis_title=f"{name_a} rank (0 = least important)", yaxis_title=f"{name_b} rank")


def per_layer_bars(values: Sequence[float], title: str, y_title: str, y_range: tuple[float, float] | None = None,
                   name: str = "", chance: float | None = None, chance_label: str = "chance") -> go.Figure:
    """One bar per layer, with an optional dashed chance line."""
    fig = go.Figure(go.Bar(x=list(range(len(values))), y=list(values), marker_color=color(0), name=name or y_title))
    if chance is not None:
        fig.add_trace(go.Scatter(x=[-0.5, len(values) - 0.5], y=[chance, chance], mode="lines", line=CHANCE_STYLE,
                                 name=f"{chance_label} ({chance:.2f})"))
    _finish(fig, title=title, xaxis_title="layer", yaxis_title=y_title)
    if y_range:
        fig.update_yaxes(range=list(y_range))
    return fig


def widths(before: Sequence[int], after: Sequence[int], title: str = "MLP width per layer",
           note: str = "") -> go.Figure:
    """Kept MLP width per layer against the original width."""
    layers = list(range(len(before)))
    fig = go.Figure([go.Bar(x=layers, y=list(before), name="original", marker_color="#ced4da"),
                     go.Bar(x=layers, y=list(after), name="kept", marker_color=color(0))])
    return _finish(fig, barmode="overlay", title=_title(title, note), xaxis_title="layer", yaxis_title="neurons")


def token_menu(tokens: Sequence[str], probs: dict[str, Sequence[float]], entropy: dict[str, float]) -> go.Figure:
    """Grouped bars: each model's probability for the same candidate next tokens."""
    labels = shown_tokens(list(tokens))  # ' ' → '␣', '\n' → '⏎': no blank bar labels
    fig = go.Figure([go.Bar(x=labels, y=list(p), name=f"{name} (H={entropy[name]:.2f} nats)", marker_color=color(i))
                     for i, (name, p) in enumerate(probs.items())])
    return _finish(fig, height=420, barmode="group", title="Next-token distribution (the whole menu)",
                   xaxis_title="candidate next token", yaxis_title="probability")


# where a point's name may go, in order of preference: (plotly textposition, (dx, dy) of the label's
# centre from the point in px, with the label's own half width added sideways for left / right)
LABEL_SPOTS = (("top center", (0, 1)), ("bottom center", (0, -1)), ("middle right", (1, 0)),
               ("middle left", (-1, 0)), ("top right", (1, 1)), ("bottom left", (-1, -1)),
               ("top left", (-1, 1)), ("bottom right", (1, -1)))
PLOT_PX = (480, 260)  # the plotting area a label is placed in (a half-width plot), px


def label_spots(names: Sequence[str], xs: Sequence[float], ys: Sequence[float],
                plot_px: tuple[float, float] = PLOT_PX) -> list[str]:
    """A plotly textposition for each point's name so no two names' boxes overlap where that can be
    helped: points are placed in order, each at the first spot of :data:`LABEL_SPOTS` whose box (the
    name's width × one line, beside its 12 px marker) is clear of the names and markers placed so far."""
    def norm(values: Sequence[float], px: float) -> list[float]:
        low, high = min(values), max(values)
        return [px * ((v - low) / (high - low) if high > low else 0.5) for v in values]

    px, py = norm(xs, plot_px[0]), norm(ys, plot_px[1])
    markers = [(x - 7, y - 7, x + 7, y + 7) for x, y in zip(px, py, strict=True)]
    placed: list[tuple[float, float, float, float]] = []
    spots = []
    for i, (name, x, y) in enumerate(zip(names, px, py, strict=True)):
        w, h = CHAR_WIDTH * len(name) / 2 + 2, 9
        taken = [b for j, b in enumerate(markers) if j != i] + placed
        options = [(spot, (x + dx * (w + 8) - w, y + dy * (h + 8) - h, x + dx * (w + 8) + w, y + dy * (h + 8) + h))
                   for spot, (dx, dy) in LABEL_SPOTS]
        spot, box = next(((spot, box) for spot, box in options if not any(_overlap(box, b) for b in taken)),
                         options[0])
        spots.append(spot)
        placed.append(box)
    return spots


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Whether two (left, bottom, right, top) boxes overlap."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _padded(values: Sequence[float], share: float = 0.18) -> list[float]:
    """An axis range with ``share`` of the span (or of the value, for a single one) free on each side,
    so names written beside the outermost points stay inside the plot."""
    low, high = min(values), max(values)
    pad = share * ((high - low) or abs(high) or 1.0)
    return [low - pad, high + pad]


def labelled_points(names: Sequence[str], xs: Sequence[float], ys: Sequence[float]) -> list[go.Scatter]:
    """One marker per point with its name beside it (placed by :func:`label_spots`, never clipped by the
    axes)."""
    return [go.Scatter(x=[x], y=[y], mode="markers+text", text=[name], textposition=spot, cliponaxis=False,
                       marker={"size": 12, "color": color(i)}, name=name)
            for i, (name, x, y, spot) in enumerate(zip(names, xs, ys, label_spots(names, xs, ys), strict=True))]


def params_vs_perplexity(names: Sequence[str], params: Sequence[int], ppl: Sequence[float]) -> go.Figure:
    """Parameters (M) against perplexity, one named marker per model."""
    xs = [p / 1e6 for p in params]
    fig = go.Figure(labelled_points(names, xs, ppl))
    fig = _finish(fig, title="Parameters vs perplexity", xaxis_title="parameters (M)", yaxis_title="perplexity",
                  showlegend=False)
    return fig.update_layout(xaxis_range=_padded(xs), yaxis_range=_padded(ppl))


def kl_text(tokens: Sequence[str], kl: Sequence[float | None], scale: float) -> str:
    """HTML: every token on a red background whose strength grows with KL(original ‖ variant)."""
    scale = scale if scale > 0 else 1.0
    spans = []
    for token, value in zip(tokens, kl, strict=True):
        text = html.escape(token).replace("\n", "↵<br>")
        if value is None:
            spans.append(f'<span class="tok" title="no prediction">{text}</span>')
            continue
        alpha = min(1.0, value / scale)
        spans.append(f'<span class="tok" title="KL = {value:.4f} nats" '
                     f'style="background: rgba(213,94,0,{alpha:.3f})">{text}</span>')
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
                                 marker_color=color(i), line={"width": 1}))
    _finish(fig, title="Adaptive search: width tried vs increase in held-out loss",
            xaxis_title="kept width tried", yaxis_title="loss increase (nats, log)")
    fig.update_yaxes(type="log")
    return fig


# a sweep metric → (its sample std over calibration draws, its per-draw values) in core.stability.draw_summary rows
DRAW_SPREAD = {"kl_to_dense": ("kl_std", "kl_draws"), "perplexity": ("perplexity_std", "perplexity_draws"),
               "top1_agreement": ("top1_std", "top1_draws")}


def sweep_lines(rows: Sequence[dict], metric: str = "kl_to_dense") -> go.Figure:
    """One line per criterion (and allocation): ``metric`` against the pruning ratio; the random
    baseline is drawn grey and dashed. Rows over K calibration draws (they carry ``draws`` and the
    metric's std) get symmetric error bars of ± 1 sample std around the mean; the hover adds the
    per-draw min–max."""
    fig = go.Figure()
    names = list(dict.fromkeys(r["criterion"] for r in rows))
    std_key, draws_key = DRAW_SPREAD.get(metric, ("", ""))
    spread = bool(rows) and all(std_key in r for r in rows)
    label = {"kl_to_dense": "KL to dense (nats/token)", "perplexity": "perplexity",
             "top1_agreement": "top-1 agreement"}.get(metric, metric)

    def line(name: str, **style) -> go.Scatter:
        mine = sorted((r for r in rows if r["criterion"] == name), key=lambda r: r["ratio"])
        extra: dict = {}
        if spread:
            extra = {"error_y": {"type": "data", "array": [r[std_key] for r in mine], "visible": True},
                     "customdata": [[r[std_key], min(r[draws_key]), max(r[draws_key]), r["draws"]] for r in mine],
                     "hovertemplate": (f"{name}<br>ratio %{{x:.2f}}<br>{label}: %{{y:.4g}} ± %{{customdata[0]:.2g}} "
                                       "(mean ± std)<br>draws min–max: %{customdata[1]:.4g}–%{customdata[2]:.4g} "
                                       "over %{customdata[3]} draws<extra></extra>")}
        return go.Scatter(x=[r["ratio"] for r in mine], y=[r[metric] for r in mine], mode="lines+markers",
                          name=name, **style, **extra)

    for i, name in enumerate(n for n in names if n != BASELINE):
        fig.add_trace(line(name, marker_color=color(i)))
    if BASELINE in names:
        fig.add_trace(line(BASELINE, line=CHANCE_STYLE, marker_color=CHANCE_STYLE["color"]))
    title = f"{label} vs ratio"
    if spread:
        title += f" (mean; error bars ± 1 std over {max(r['draws'] for r in rows)} calibration draws)"
    _finish(fig, WIDE, title=title, xaxis_title="ratio of MLP neurons removed", yaxis_title=label)
    if metric in ("kl_to_dense", "perplexity"):
        fig.update_yaxes(type="log")  # the random baseline is often 10× worse: a log axis keeps both readable
    return fig


def pareto(names: Sequence[str], size_mb: Sequence[float], quality: Sequence[float], quality_label: str,
           lower_is_better: bool = True) -> go.Figure:
    """Size vs quality, one marker per variant; the Pareto-optimal ones (nothing both smaller and
    better) are joined by a line."""
    front = [(size_mb[i], quality[i]) for i in pareto_front(list(size_mb), list(quality), lower_is_better)]
    fig = go.Figure([go.Scatter(x=[s for s, _ in front], y=[v for _, v in front], mode="lines", name="Pareto front",
                                line={"color": "#adb5bd", "dash": "dot"})])
    fig.add_traces(labelled_points(names, size_mb, quality))
    _finish(fig, title=f"Weight size vs {quality_label}", xaxis_title="weights in memory (MB)",
            yaxis_title=quality_label, showlegend=False)
    return fig.update_layout(xaxis_range=_padded(size_mb), yaxis_range=_padded(quality))


def speedups(names: Sequence[str], prefill: Sequence[dict | None], decode: Sequence[dict | None],
             ideal: Sequence[float | None]) -> go.Figure:
    """Prefill and decode speed-ups side by side per variant, each with its quartile interval as an
    error bar, and the FLOP ideal as a marker."""
    fig = go.Figure()
    for i, (label, values) in enumerate((("prefill", prefill), ("decode", decode))):
        shown = [(n, v) for n, v in zip(names, values, strict=True) if v]
        fig.add_trace(go.Bar(x=[n for n, _ in shown], y=[v["median"] for _, v in shown], name=f"{label} speed-up",
                             marker_color=color(i), error_y={"type": "data", "symmetric": False,
                                                             "array": [v["high"] - v["median"] for _, v in shown],
                                                             "arrayminus": [v["median"] - v["low"] for _, v in shown]}))
    ideal_points = [(n, x) for n, x in zip(names, ideal, strict=True) if x]
    fig.add_trace(go.Scatter(x=[n for n, _ in ideal_points], y=[x for _, x in ideal_points], mode="markers",
                             name="FLOP ideal", marker={"symbol": "line-ew-open", "size": 28, "color": "#212529",
                                                        "line": {"width": 3}}))
    fig.add_hline(y=1.0, line=CHANCE_STYLE)
    return _finish(fig, WIDE, barmode="group",
                   title="Measured speed-up vs the original (bars: median, whiskers: quartiles)",
                   xaxis_title="variant", yaxis_title="× faster than the original")


def draw_spread(rows: Sequence[dict], overlap: dict[str, dict], criteria: Sequence[str], note: str = "") -> go.Figure:
    """A cut over K calibration draws. Left: KL to the original against the share removed, one line per
    criterion at its mean with ± 1 std error bars and every draw's value as an open marker (the two
    criteria nudged apart sideways so neither hides the other). Right: the share of removed neurons
    two criteria scored on the same draw, and two draws of one criterion, have in common, with the
    chance line (two random choices of that size share the ratio itself)."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("KL to the original (nats/token)", "Removed neurons in common"))
    for i, name in enumerate(criteria):
        mine = sorted((r for r in rows if r["criterion"] == name), key=lambda r: r["ratio"])
        if not mine:
            continue
        shift = (i - (len(criteria) - 1) / 2) * 0.8  # percentage points
        x = [100 * r["ratio"] + shift for r in mine]
        fig.add_trace(go.Scatter(x=x, y=[r["kl_mean"] for r in mine], mode="lines+markers", marker_color=color(i),
                                 name=f"{name}: mean ± std over {mine[0]['draws']} draws", legendgroup=name,
                                 error_y={"type": "data", "array": [r["kl_std"] for r in mine], "visible": True},
                                 hovertemplate=f"{name}<br>%{{y:.3f}} mean KL<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=[p for r, p in zip(mine, x) for _ in r["kl_draws"]],
                                 y=[v for r in mine for v in r["kl_draws"]], mode="markers", legendgroup=name,
                                 marker={"color": color(i), "symbol": "circle-open", "size": 8},
                                 name=f"{name}: each draw",
                                 hovertemplate=f"{name}, one draw<br>KL %{{y:.3f}}<extra></extra>"), row=1, col=1)
    ratios = sorted(overlap, key=float)
    x = [100 * float(r) for r in ratios]
    first = overlap[ratios[0]] if ratios else {"criteria": {}, "draws": {}}
    for pair in first["criteria"]:
        fig.add_trace(go.Scatter(x=x, y=[100 * overlap[r]["criteria"][pair] for r in ratios], mode="lines+markers",
                                 marker_color=color(len(criteria)), line={"width": 3},
                                 name=f"{pair.replace('|', ' vs ')}, same draw"), row=1, col=2)
    for i, name in enumerate(first["draws"]):
        fig.add_trace(go.Scatter(x=x, y=[100 * overlap[r]["draws"][name] for r in ratios], mode="lines+markers",
                                 marker_color=color(i), line={"dash": "dot"}, name=f"two draws of {name}"),
                      row=1, col=2)
    if ratios:
        fig.add_trace(go.Scatter(x=x, y=x, mode="lines", line=CHANCE_STYLE, name="chance (two random choices)"),
                      row=1, col=2)
    fig.update_xaxes(title_text="% of MLP neurons removed", tickvals=x or None)
    fig.update_yaxes(title_text="% in common", row=1, col=2)
    return _finish(fig, WIDE, height=440, title=_title("The same cut from several calibration draws", note))
