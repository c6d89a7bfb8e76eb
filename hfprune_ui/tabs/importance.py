"""Tab 2 — Importance: score with one or more criteria, then explore the per-layer distributions."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.errors import SelectionError
from core.importance.criteria import REGISTRY
from core.importance.criteria import describe as describe_criteria
from core.importance.stats import (
    bulk_range,
    histogram,
    layer_summaries,
    outside,
    robust_limits,
    sorted_score_matrix,
)
from core.measure.timing import scoring_seconds

from .. import figures, texts
from ..context import TRACK, Ctx, criterion_controls, model_events, stop_on_click, with_criterion_knobs
from ..guard import is_api, session_id, user_errors
from ..progress import JobProgress, duration
from ..services import Services, criteria
from ..state import Session

DEFAULT_CRITERIA = [c for c in ("entropy", "cross_entropy") if c in criteria()] or criteria()[:1]
BINS = 40
COVERAGE = 0.99  # histogram bins span the central 99 % of the scores; the rest sit in the edge bins
SUMMARY_COLUMNS = {"criterion": "criterion", "layer": "layer", "width": "width", "mean": "mean", "median": "median",
                   "std": "std", "max": "max", "max_over_mean": "max ÷ mean", "top10_share": "top-10 % share"}


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def pick_layers(layers: list | None, count: int) -> tuple[list[int], str]:
    """The user's layer choice as ints within range (default first / middle / last), and a message
    naming every entry that is not a layer of this model (empty when all were fine)."""
    chosen, bad = set(), []
    for entry in layers or []:
        text = str(entry).strip()
        if text.lstrip("-").isdigit() and 0 <= int(text) < count:
            chosen.add(int(text))
        elif text:
            bad.append(text)
    default = sorted({0, count // 2, count - 1})
    if not bad:
        return sorted(chosen) or default, ""
    shown = sorted(chosen) or default
    return shown, (f"{', '.join(repr(b) for b in bad)} {'is not a layer' if len(bad) == 1 else 'are not layers'} of "
                   f"this model (layers are 0–{count - 1}); showing layers {', '.join(map(str, shown))}.")


def draw(session: Session, layers: list | None, shown: list | None, log: bool, heat_criterion: str | None,
         together: bool = False):
    """(histogram figure, heatmap figure, summary table, message) from the session's scores; no model."""
    if not session.scores:
        message = "Press Score to compute importance scores."
        return figures.empty(message), figures.empty(message), pd.DataFrame(columns=list(SUMMARY_COLUMNS.values())), ""
    names = [c for c in (shown or []) if c in session.scores] or list(session.scores)
    count = len(next(iter(session.scores.values())).scores)
    chosen, message = pick_layers(layers, count)
    vectors = [session.scores[c].scores[layer] for c in names for layer in chosen]
    value_range = bulk_range(vectors, log, COVERAGE)
    below, above = (sum(x) for x in zip(*(outside(v, value_range, log) for v in vectors), strict=True))
    note = (f"bins cover the central {100 * COVERAGE:.0f} % of scores; {below + above} outlying neuron-scores "
            "sit in the edge bins" if below + above else "")
    facets = {c: [(layer, *histogram(session.scores[c].scores[layer], BINS, log, value_range, clamp=True))
                  for layer in chosen] for c in names}
    if together:
        hist = figures.histograms([(f"{c} · layer {layer}", edges, counts) for c, series in facets.items()
                                   for layer, edges, counts in series], log, note)
    else:
        hist = figures.histogram_facets(facets, log, note)
    heat = heat_criterion if heat_criterion in session.scores else names[0]
    matrix = sorted_score_matrix(session.scores[heat].scores, log=log)
    heat_fig = figures.heatmap(matrix.tolist(), heat, log, robust_limits(matrix))
    rows = [{"criterion": c, **{k: (_sig(v) if isinstance(v, float) else v) for k, v in row.items()}}
            for c in names for row in layer_summaries(session.scores[c].scores)]
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)).rename(columns=SUMMARY_COLUMNS)
    return hist, heat_fig, table, message


def control_updates(session: Session, layers: list | None, shown: list | None, heat_criterion: str | None):
    """Refresh the choices of the layer / criterion pickers after new scores arrived."""
    count = len(next(iter(session.scores.values())).scores)
    scored = list(session.scores)
    chosen = [str(x) for x in pick_layers(layers, count)[0]]
    names = [c for c in (shown or []) if c in scored] or scored
    heat = heat_criterion if heat_criterion in scored else scored[0]
    return (gr.update(choices=[str(i) for i in range(count)], value=chosen), gr.update(choices=scored, value=names),
            gr.update(choices=scored, value=heat))


def warn(message: str, request: gr.Request | None) -> None:
    """A message about the view (not an error): a toast in the browser, an error for API clients."""
    if message:
        if is_api(request):
            raise SelectionError(message)
        gr.Warning(message)


def make_score(services: Services):
    @user_errors
    @with_criterion_knobs
    def score(chosen: list[str], model: str, source: str, upload: str | None, samples: float, seq_len: float,
              seed: float, criterion_knobs: dict, layers: list | None,
              shown: list | None, log: bool, heat_criterion: str | None, together: bool = False,
              request: gr.Request = None, progress=TRACK):
        """Score each chosen criterion (cached per model/data/criterion) and redraw after each one."""
        if not chosen:
            raise SelectionError("Tick at least one criterion to score.")
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        data = services.data_spec(source, upload, samples, seq_len, seed)
        model = (model or "").strip()
        tracker = JobProgress(progress, "Score", stages=len(chosen), unit="criterion")
        tracker.stage(0, f"loading {model}")
        services.model(model)
        notes = []
        for index, c in enumerate(chosen):
            tracker.stage(index, c)
            result, run_id, origin = services.score(session, model, data, c, stop=job.is_set,
                                                    params=criterion_knobs.get(c))
            where = {"memory": "cached", "disk": "loaded from the run store",
                     "computed": f"computed in {result.seconds:.1f} s",
                     "precomputed": "precomputed (shipped for the Tour; its Recompute button scores here)"
                     }.get(origin, origin)
            notes.append(f"**{c}**: {where}" + (f" (run `{run_id}`)" if run_id else ""))
            shown_now = list(dict.fromkeys([*(shown or []), *chosen]))
            hist, heat, table, _ = draw(session, layers, shown_now, log, heat_criterion, together)
            yield ("  \n".join(notes), hist, heat, table, *control_updates(session, layers, shown_now, heat_criterion))
    return score


def make_redraw(services: Services):
    @user_errors
    def redraw(layers: list | None, shown: list | None, log: bool, heat_criterion: str | None,
               together: bool = False, request: gr.Request = None):
        """Redraw the plots from cached scores (instant: no model involved); a message for bad layers."""
        hist, heat, table, message = draw(services.sessions.get(session_id(request)), layers, shown, log,
                                          heat_criterion, together)
        warn(message, request)
        return hist, heat, table
    return redraw


def make_score_estimate(services: Services):
    def estimate(chosen: list | None, model: str, samples: float, seq_len: float) -> str:
        """About how long scoring the ticked criteria takes on this machine (before pressing Score)."""
        spec = (model or "").strip()
        picked = [c for c in (chosen or []) if c in REGISTRY]
        if not picked:
            return ""
        if not services.models.cached(spec):
            return "The first Score loads the model (a few seconds once it is converted); then it estimates each run."
        per_token = services.seconds_per_token(spec)
        tokens = int(samples) * int(seq_len)
        seconds = sum(scoring_seconds(per_token, tokens, REGISTRY[c].cost) for c in picked)
        return (f"Estimated scoring time on this machine: **about {duration(seconds)}** for {len(picked)} "
                f"criteria on {int(samples)} × {int(seq_len)} tokens (cached criteria are instant).")
    return estimate


def criteria_markdown() -> str:
    rows = "\n".join(f"| **{c['name']}** | {c['cost']} | {c['summary']} |" for c in describe_criteria())
    return "| criterion | cost | what it measures |\n|---|---|---|\n" + rows


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("Importance", id="importance") as tab:
        gr.Markdown(texts.IMPORTANCE, elem_classes="teach")
        with gr.Row(equal_height=True):
            chosen = gr.CheckboxGroup(criteria(), value=DEFAULT_CRITERIA, label="Criteria to score", scale=4,
                                      elem_id="criteria-chosen")
            score_button = gr.Button("Score", variant="primary", scale=1, min_width=120, elem_id="score-button")
            stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=100, elem_id="score-stop")
        with gr.Accordion("What each criterion measures", open=False):
            gr.Markdown(criteria_markdown())
        with gr.Accordion("Criterion settings (each criterion reads only its own)", open=False), gr.Row():
            knob_controls = criterion_controls()
        estimate = gr.Markdown("", elem_id="score-estimate")
        status = gr.Markdown("", elem_id="score-status")
        with gr.Row(equal_height=True):
            layers = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, label="Layers", scale=2,
                                 info="type or pick layer numbers", elem_id="layers")
            shown = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, label="Criteria shown",
                                scale=2)
            heat_criterion = gr.Dropdown([], value="", allow_custom_value=True, label="Heatmap criterion", scale=1)
        with gr.Row():
            log = gr.Checkbox(True, label="log scale", info="scores span orders of magnitude")
            together = gr.Checkbox(False, label="overlay criteria in one chart",
                                   info="default: one panel per criterion")
        hist = gr.Plot(label="Histogram", elem_id="hist-plot")
        heat = gr.Plot(label="Layer × neuron heatmap", elem_id="heat-plot")
        table = gr.Dataframe(label="Per-layer summary (see the glossary for max ÷ mean and top-10 % share)",
                             headers=list(SUMMARY_COLUMNS.values()), interactive=False, max_height=320)
    views = [layers, shown, log, heat_criterion, together]
    ctx.add(**knob_controls)
    ctx.add(hist=hist, heat=heat, summary=table,
            layers=layers, shown=shown, heat_criterion=heat_criterion, log=log, together=together,
            score_status=status)
    event = score_button.click(make_score(services), [chosen, *ctx.data_inputs, *ctx.criterion_inputs, *views],
                               [status, hist, heat, table, layers, shown, heat_criterion],
                               api_name="score", show_progress_on=status, **model_events())
    ctx.after(event)
    stop_on_click(services, stop_button, status, [event], api_name="stop", what="scoring")
    redraw = make_redraw(services)
    layers.input(redraw, views, [hist, heat, table], api_name="redraw", show_progress="minimal")
    for component in (shown, log, heat_criterion, together):
        component.input(redraw, views, [hist, heat, table], api_visibility="private", show_progress="minimal")
    ctx.add(criteria_chosen=chosen)
    estimate_inputs = [chosen, ctx["model"], ctx["samples"], ctx["seq_len"]]
    for trigger in (chosen.input, tab.select, event.then):
        trigger(make_score_estimate(services), estimate_inputs, estimate, api_visibility="private",
                show_progress="hidden")
