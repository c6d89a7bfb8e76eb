"""Tab 3 — Entropy vs cross-entropy (criteria agreement): where two criteria agree and where they part ways."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.errors import SelectionError
from core.importance.stats import (
    chance_overlap,
    disagreements,
    ranks,
    removal_overlap,
    spearman_per_layer,
)
from core.prune.allocate import uniform_widths

from .. import figures, texts
from ..context import TRACK, Ctx, model_events, stop_on_click, with_criterion_knobs
from ..guard import session_id, user_errors
from ..progress import JobProgress
from ..services import Services, criteria
from ..state import Session

DISAGREEMENTS = 12


def disagree_columns(a: str, b: str) -> list[str]:
    """The disagreement table's columns for criteria ``a`` and ``b`` (also its headers before a run)."""
    return ["layer", "neuron", f"{a} rank", f"{b} rank", "gap", "removed by"]


def draw(session: Session, a: str, b: str, layer: float, ratio: float):
    """(status, rank scatter, Spearman bars, overlap bars, disagreement table) from session scores."""
    missing = [c for c in (a, b) if c not in session.scores]
    if missing:
        message = f"Press Compare to score {' and '.join(missing)} first."
        blank = figures.empty(message)
        return message, blank, blank, blank, pd.DataFrame(columns=disagree_columns(a, b))
    sa, sb = session.scores[a].scores, session.scores[b].scores
    if not 0 <= int(layer) < len(sa):
        raise SelectionError(f"Layer {int(layer)} does not exist: this model's layers are 0–{len(sa) - 1}.")
    layer = int(layer)
    rho = spearman_per_layer(sa, sb)
    widths = uniform_widths([s.numel() for s in sa], float(ratio))
    overlap = removal_overlap(sa, sb, widths)
    removed_fraction = 1 - widths[layer] / sa[layer].numel()
    scatter = figures.rank_scatter(ranks(sa[layer]).tolist(), ranks(sb[layer]).tolist(), a, b, layer, removed_fraction)
    chance = chance_overlap(widths, [s.numel() for s in sa])
    rho_fig = figures.per_layer_bars(rho, f"Spearman ρ between {a} and {b}, per layer", "ρ", (-1, 1), "ρ",
                                     chance=0.0, chance_label="unrelated rankings")
    overlap_fig = figures.per_layer_bars([row["overlap"] for row in overlap],
                                         f"Share of {a}'s removals that {b} also removes (ratio {ratio:.2f})",
                                         "overlap", (0, 1), "overlap", chance=sum(chance) / len(chance),
                                         chance_label="two random choices")
    table = pd.DataFrame([{"layer": r["layer"], "neuron": r["neuron"], f"{a} rank": round(r["rank_a"], 3),
                           f"{b} rank": round(r["rank_b"], 3), "gap": round(r["gap"], 3),
                           "removed by": a if r["rank_a"] < removed_fraction <= r["rank_b"] else
                           b if r["rank_b"] < removed_fraction <= r["rank_a"] else "—"}
                          for r in disagreements(sa, sb, DISAGREEMENTS)], columns=disagree_columns(a, b))
    mean_rho = sum(rho) / len(rho)
    mean_overlap = sum(r["overlap"] for r in overlap) / len(overlap)
    status = (f"Mean Spearman ρ = **{mean_rho:.3f}**; at ratio {ratio:.2f} the two criteria agree on "
              f"**{100 * mean_overlap:.1f} %** of the neurons they would remove (layer {layer}: "
              f"{100 * overlap[layer]['overlap']:.1f} %); two random choices would share "
              f"{100 * sum(chance) / len(chance):.1f} % (the dashed line).")
    return status, scatter, rho_fig, overlap_fig, table


def make_compare(services: Services):
    @user_errors
    @with_criterion_knobs
    def compare(a: str, b: str, layer: float, ratio: float, model: str, source: str, upload: str | None,
                samples: float, seq_len: float, seed: float, criterion_knobs: dict,
                request: gr.Request = None, progress=TRACK):
        """Score whichever of the two criteria is missing (cached), then draw the comparison."""
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        data = services.data_spec(source, upload, samples, seq_len, seed)
        tracker = JobProgress(progress, "Compare", stages=2, unit="criterion")
        for index, c in enumerate((a, b)):
            tracker.stage(index, c)
            services.score(session, (model or "").strip(), data, c, stop=job.is_set,
                           params=criterion_knobs.get(c))
        return (*draw(session, a, b, layer, ratio), layer_update(session))
    return compare


def layer_update(session: Session):
    """Fit the layer slider to the scored model's depth."""
    if not session.scores:
        return gr.update()
    return gr.update(maximum=len(next(iter(session.scores.values())).scores) - 1)


def make_redraw(services: Services, with_layer: bool = False):
    @user_errors
    def redraw(a: str, b: str, layer: float, ratio: float, request: gr.Request = None):
        """Redraw from the session's scores (no model involved)."""
        session = services.sessions.get(session_id(request))
        out = draw(session, a, b, layer, ratio)
        return (*out, layer_update(session)) if with_layer else out
    return redraw


def build(ctx: Ctx) -> None:
    services = ctx.services
    names = criteria()
    with gr.Tab("Entropy vs cross-entropy", id="criteria") as tab:
        gr.Markdown(texts.CRITERIA, elem_classes="teach")
        with gr.Row(equal_height=True):
            a = gr.Dropdown(names, value="entropy" if "entropy" in names else names[0], label="Criterion A", scale=2)
            b = gr.Dropdown(names, value="cross_entropy" if "cross_entropy" in names else names[-1],
                            label="Criterion B", scale=2)
            go = gr.Button("Compare", variant="primary", scale=1, min_width=120, elem_id="compare-button")
            stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=100)
        with gr.Row():
            layer = gr.Slider(0, 63, value=0, step=1, label="Layer for the rank scatter",
                              info="each dot is one neuron of this layer")
            ratio = gr.Slider(0.05, 0.9, value=0.2, step=0.05, label="Ratio removed (for the overlap)",
                              info="the share of each layer's neurons both criteria would cut")
        status = gr.Markdown("", elem_id="agreement-status")
        with gr.Row():
            scatter = gr.Plot(label="Rank vs rank", elem_id="rank-plot")
            rho = gr.Plot(label="Spearman ρ per layer", elem_id="rho-plot")
        overlap = gr.Plot(label="Removal overlap per layer", elem_id="overlap-plot")
        table = gr.Dataframe(label="Neurons the two criteria disagree on most", interactive=False,
                             headers=disagree_columns(a.value, b.value), elem_id="disagree-table")
    outputs = [status, scatter, rho, overlap, table]
    ctx.add(agree_a=a, agree_b=b, agree_layer=layer, agree_ratio=ratio, agree_outputs=outputs)
    event = go.click(make_compare(services), [a, b, layer, ratio, *ctx.data_inputs, *ctx.criterion_inputs],
                     [*outputs, layer], api_name="compare_criteria", show_progress_on=status,
                     **model_events())
    ctx.after(event)
    stop_on_click(services, stop_button, status, [event], what="scoring")
    redraw = make_redraw(services)
    inputs = [a, b, layer, ratio]
    a.input(redraw, inputs, outputs, api_visibility="private")
    b.input(redraw, inputs, outputs, api_visibility="private")
    layer.release(redraw, inputs, outputs, api_visibility="private")
    ratio.release(redraw, inputs, outputs, api_visibility="private")
    tab.select(make_redraw(services, with_layer=True), inputs, [*outputs, layer], api_name="criteria_redraw")
