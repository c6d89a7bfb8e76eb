"""Tab 2 — Importance: score with one or more criteria, then explore the per-layer distributions."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.score_stats import histogram, layer_summaries, shared_range, sorted_score_matrix
from core.errors import HFPruneError

from .. import figures, texts
from ..context import Ctx, criterion_params, model_events, stop_on_click
from ..guard import session_id, user_errors
from ..services import Services, criteria
from ..state import Session

DEFAULT_CRITERIA = [c for c in ("entropy", "cross_entropy") if c in criteria()] or criteria()[:1]
BINS = 40


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def pick_layers(layers: list | None, count: int) -> list[int]:
    """The user's layer choice as ints within range; default first / middle / last."""
    chosen = sorted({int(x) for x in (layers or []) if str(x).strip().lstrip("-").isdigit() and 0 <= int(x) < count})
    return chosen or sorted({0, count // 2, count - 1})


def draw(session: Session, layers: list | None, overlay: list | None, log: bool, heat_criterion: str | None):
    """(histogram figure, heatmap figure, summary table) from the session's scores; no model needed."""
    if not session.scores:
        message = "Press Score to compute importance scores."
        return figures.empty(message), figures.empty(message), pd.DataFrame()
    shown = [c for c in (overlay or []) if c in session.scores] or list(session.scores)
    count = len(next(iter(session.scores.values())).scores)
    chosen = pick_layers(layers, count)
    vectors = [session.scores[c].scores[layer] for c in shown for layer in chosen]
    value_range = shared_range(vectors, log)
    series = []
    for c in shown:
        for layer in chosen:
            edges, counts = histogram(session.scores[c].scores[layer], BINS, log, value_range)
            series.append((f"{c} · layer {layer}", edges, counts))
    heat = heat_criterion if heat_criterion in session.scores else shown[0]
    matrix = sorted_score_matrix(session.scores[heat].scores, log=log)
    rows = [{"criterion": c, **{k: (_sig(v) if isinstance(v, float) else v) for k, v in row.items()}}
            for c in shown for row in layer_summaries(session.scores[c].scores)]
    return (figures.histograms(series, log), figures.heatmap(matrix.tolist(), heat, log), pd.DataFrame(rows))


def control_updates(session: Session, layers: list | None, overlay: list | None, heat_criterion: str | None):
    """Refresh the choices of the layer / criterion pickers after new scores arrived."""
    count = len(next(iter(session.scores.values())).scores)
    scored = list(session.scores)
    chosen = [str(x) for x in pick_layers(layers, count)]
    shown = [c for c in (overlay or []) if c in scored] or scored
    heat = heat_criterion if heat_criterion in scored else scored[0]
    return (gr.update(choices=[str(i) for i in range(count)], value=chosen), gr.update(choices=scored, value=shown),
            gr.update(choices=scored, value=heat))


def make_score(services: Services):
    @user_errors
    def score(chosen: list[str], model: str, source: str, upload: str | None, samples: float, seq_len: float,
              seed: float, temperature: float, alpha: float, weight: float, layers: list | None,
              overlay: list | None, log: bool, heat_criterion: str | None,
              request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        """Score each chosen criterion (cached per model/data/criterion) and redraw after each one."""
        if not chosen:
            raise HFPruneError("Tick at least one criterion to score.")
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        data = services.data_spec(source, upload, samples, seq_len, seed)
        model = (model or "").strip()
        progress(0.0, desc=f"loading {model}")
        services.model(model)
        notes = []
        for c in chosen:
            progress(0.0, desc=f"scoring with {c}")
            result, run_id, origin = services.score(session, model, data, c, stop=job.is_set,
                                                    params=criterion_params(temperature, alpha, weight))
            where = {"memory": "cached", "disk": "loaded from the run store",
                     "computed": f"computed in {result.seconds:.1f} s"}[origin]
            notes.append(f"**{c}**: {where} (run `{run_id}`)")
            overlay_now = list(dict.fromkeys([*(overlay or []), *chosen]))
            hist, heat, table = draw(session, layers, overlay_now, log, heat_criterion)
            yield ("  \n".join(notes), hist, heat, table, *control_updates(session, layers, overlay_now, heat_criterion))
    return score


def make_redraw(services: Services):
    @user_errors
    def redraw(layers: list | None, overlay: list | None, log: bool, heat_criterion: str | None,
               request: gr.Request = None):
        """Redraw the plots from cached scores (instant: no model involved)."""
        return draw(services.sessions.get(session_id(request)), layers, overlay, log, heat_criterion)
    return redraw


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("Importance", id="importance"):
        gr.Markdown(texts.IMPORTANCE, elem_classes="teach")
        with gr.Row():
            chosen = gr.CheckboxGroup(criteria(), value=DEFAULT_CRITERIA, label="Criteria to score", scale=3)
            score_button = gr.Button("Score", variant="primary", scale=1, elem_id="score-button")
            stop_button = gr.Button("Stop", variant="stop", scale=1)
        with gr.Accordion("Criterion settings (self_distill τ and α, entropy+ce weight)", open=False):
            with gr.Row():
                temperature = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="self_distill: teacher temperature τ",
                                        info="< 1 sharpens the dense teacher; τ = 1 with α = 1 has zero gradient")
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="self_distill: α in (1−α)·CE + α·KL")
                weight = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="entropy+ce: w in w·H + (1−w)·CE")
        status = gr.Markdown("", elem_id="score-status")
        with gr.Row():
            layers = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, label="Layers", scale=2)
            overlay = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                  label="Overlay criteria", scale=2)
            log = gr.Checkbox(True, label="log scale")
            heat_criterion = gr.Dropdown([], value=None, allow_custom_value=True, label="Heatmap criterion")
        hist = gr.Plot(label="Histogram", elem_id="hist-plot")
        heat = gr.Plot(label="Layer × neuron heatmap", elem_id="heat-plot")
        table = gr.Dataframe(label="Per-layer summary", interactive=False, max_height=320)
    views = [layers, overlay, log, heat_criterion]
    ctx.add(temperature=temperature, alpha=alpha, weight=weight)
    event = score_button.click(make_score(services), [chosen, *ctx.data_inputs, *ctx.criterion_inputs, *views],
                               [status, hist, heat, table, layers, overlay, heat_criterion],
                               api_name="score", **model_events())
    stop_on_click(services, stop_button, status, [event], api_name="stop")
    redraw = make_redraw(services)
    layers.input(redraw, views, [hist, heat, table], api_name="redraw", show_progress="minimal")
    for component in (overlay, log, heat_criterion):
        component.input(redraw, views, [hist, heat, table], api_visibility="private", show_progress="minimal")
    ctx.add(criteria_chosen=chosen)
