"""Tab — Neuron inspector, rank stability and run reports.

A neuron is picked by layer + index here, by clicking a dot of the rank scatter (Agreement tab), a
cell of the heatmap (Importance tab) or a row of the "disagree most" table; the page script
(``hfprune_ui/plot_tools.py``) writes plot clicks into the hidden ``#neuron-pick`` box. The engine
does the work through ``Services`` (``neuron``, ``stability``, ``export_report``): core.neuron (ranks,
contexts, single-neuron ablation), core.stability (draws, the verdict), core.report (the HTML report).
"""
from __future__ import annotations

import json

import gradio as gr
import pandas as pd

from core.errors import SelectionError
from core.studies.neuron import InspectOptions, neuron_at_rank
from core.studies.report import DEFAULT_CONTEXTS
from core.studies.stability import StabilityOptions, StabilityResult, stability_verdict

from .. import figures, inspect_figures
from ..context import TRACK, Ctx, model_events, stop_on_click, with_criterion_knobs
from ..guard import session_id, user_errors
from ..progress import JobProgress
from ..services import Services, criteria
from ..state import Session

OVERLAP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
REPORT_WEIGHTS = (2, 1, 2, 1)  # the report's steps (core.studies.report.REPORT_STEPS), by their rough cost
RANK_COLUMNS = ["criterion", "score", "rank in layer (1 = most important)", "percentile (0 = least important)"]
# core.stability's summary rows without their "kind" (one overlap column per ratio of the overlap)
SUMMARY_COLUMNS = ["comparison", "pairs", "mean_rho", "min_layer_rho", *(f"overlap@{r:g}" for r in OVERLAP_RATIOS)]
TEACH = ("**Neuron inspector.** Pick a neuron — type its layer and index, click a dot of the rank scatter, a cell "
         "of the heatmap or a row of the *disagree most* table — to see its score and rank under every scored "
         "criterion, the calibration tokens where it fires hardest (shaded by its activation), and what removing "
         "*that neuron alone* does to the next-token menu there (KL to the dense model). "
         "**Rank stability** scores criteria on K disjoint calibration draws: if two criteria agree about as "
         "well as two draws of one criterion, their difference is calibration noise.")


def _context(services: Services, session: Session, form: tuple) -> tuple[str, object]:
    """(model spec, data spec): the session's scored context, else the Model & data form."""
    if session.model_spec and session.data is not None:
        return session.model_spec, session.data
    model, source, upload, samples, seq_len, seed = form
    return (model or "").strip(), services.data_spec(source, upload, samples, seq_len, seed)


def _int(value, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SelectionError(f"Give the {what} as a whole number.") from None
    if not number.is_integer():
        raise SelectionError(f"The {what} must be a whole number, got {value}.")
    return int(number)


def make_inspect(services: Services):
    @user_errors
    def inspect(layer, index, top_k, model, source, upload, samples, seq_len, seed, request: gr.Request = None,
                progress=TRACK):
        """Inspect one neuron on the session's calibration windows (one forward pass + the ablation)."""
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        spec, data = _context(services, session, (model, source, upload, samples, seq_len, seed))
        # a model already loaded weighs nothing; otherwise loading takes about a third of the bar
        tracker = JobProgress(progress, "Inspect", unit="step", weights=[0 if services.models.cached(spec) else 1, 2])
        tracker.stage(0, f"loading {spec}")
        services.model(spec)
        layer, index = _int(layer, "layer"), _int(index, "neuron index")
        tracker.stage(1, f"layer {layer}, neuron {index}")
        report = services.neuron(session, spec, data, layer, index, top_k=int(top_k), stop=job.is_set,
                                 on_progress=tracker.report)
        data_out = report.to_dict()
        ranks = pd.DataFrame([{"criterion": r.criterion, "score": float(f"{r.score:.4g}"),
                               "rank in layer (1 = most important)": f"{r.rank} of {r.width}",
                               "percentile (0 = least important)": round(r.percentile, 3)} for r in report.criteria],
                             columns=RANK_COLUMNS)
        status = (f"**Layer {layer}, neuron {index}** of {report.width}: mean a = {report.activation['mean']:+.3g}, "
                  f"mean |a| = {report.activation['mean_abs']:.3g}, positive on "
                  f"{100 * report.activation['positive_share']:.0f} % of {report.tokens} calibration tokens. "
                  f"Removing it alone: mean KL {report.kl_mean:.4g} nats at the {len(report.contexts)} contexts "
                  f"below; the most likely next token changes at {report.top1_changed} of them."
                  + ("" if report.criteria else " Score a criterion (Importance tab) to see its ranks here."))
        choices = [f"#{i + 1}: {c.tokens[c.center]!r} (a = {c.activation:+.3g})" for i, c in enumerate(report.contexts)]
        first = menu_figure(data_out, 0)
        return (status, ranks, inspect_figures.contexts_html(data_out["contexts"]),
                gr.update(choices=choices, value=choices[0] if choices else None), first, data_out)
    return inspect


def menu_figure(report: dict | None, number: int):
    if not report or not report.get("contexts"):
        return figures.empty("Inspect a neuron to see the next-token menu change.")
    c = report["contexts"][max(0, min(number, len(report["contexts"]) - 1))]
    token = c["tokens"][c["center"]]
    return inspect_figures.menu_change(c["menu"], f"After {token!r} (window {c['window']}, token {c['position']}): "
                                                  f"KL {c['kl']:.3g} nats when neuron {report['index']} of layer "
                                                  f"{report['layer']} is removed")


def show_menu(choice: str | None, report: dict | None):
    """Redraw the menu change for the chosen context (no model involved)."""
    number = int(choice.split(":")[0].lstrip("#")) - 1 if choice else 0
    return menu_figure(report, number)


def make_pick(services: Services):
    @user_errors
    def pick(payload: str, agree_layer, heat_criterion, request: gr.Request = None):
        """A click on the rank scatter ({source: scatter, index}) or the heatmap ({source: heatmap,
        layer, rank %}) → layer and index boxes, and this tab shown."""
        session = services.sessions.get(session_id(request))
        try:
            event = json.loads(payload or "{}")
        except json.JSONDecodeError:
            raise SelectionError("That click did not name a neuron.") from None
        if event.get("source") == "scatter":
            layer, index = int(agree_layer), int(event["index"])
        elif event.get("source") == "heatmap":
            if heat_criterion not in session.scores:
                raise SelectionError("Score a criterion first; the heatmap cell names a rank, not a neuron.")
            layer = int(event["layer"])
            index = neuron_at_rank(session.scores[heat_criterion].scores[layer], float(event["rank"]) / 100)
        else:
            raise SelectionError("That click did not name a neuron.")
        return gr.update(selected="inspect"), layer, index
    return pick


def pick_row(evt: gr.SelectData):
    """A row of the "disagree most" table → layer and index boxes, and this tab shown."""
    row = evt.row_value or []
    if len(row) < 2:
        return gr.update(), gr.update(), gr.update()
    return gr.update(selected="inspect"), int(row[0]), int(row[1])


def make_stability(services: Services):
    @user_errors
    @with_criterion_knobs
    def stability(chosen: list[str], draws, ratio: str, model, source, upload, samples, seq_len, seed,
                  criterion_knobs: dict, request: gr.Request = None, progress=TRACK):
        """Score each chosen criterion on K disjoint draws and compare draws with criteria."""
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        if not chosen:
            raise SelectionError("Tick at least one criterion.")
        options = StabilityOptions(draws=draws, samples=samples, seq_len=seq_len, seed=seed)
        spec = (model or "").strip()
        data = services.data_spec(source, upload, samples, seq_len, seed)
        options = options.replace(source=data.source)
        tracker = JobProgress(progress, "Stability", stages=len(chosen) * options.draws, unit="scoring pass")
        steps = [f"{c}, draw {k + 1} of {options.draws}" for c in chosen for k in range(options.draws)]
        out = services.stability(
            session, spec, data, chosen, options, ratios=OVERLAP_RATIOS, params=criterion_knobs, stop=job.is_set,
            on_draw=lambda c, k: tracker.stage(chosen.index(c) * options.draws + k,
                                               steps[chosen.index(c) * options.draws + k]))
        return (*draw_stability(out, ratio), out)
    return stability


def draw_stability(result: dict | None, ratio: str):
    """(status, ρ figure, overlap figure, summary table) from a stored stability result dict."""
    if not result:
        blank = figures.empty("Press Measure to score the criteria on disjoint calibration draws.")
        return "", blank, blank, pd.DataFrame(columns=SUMMARY_COLUMNS)
    parsed = StabilityResult.from_dict(result)
    key = f"{float(ratio):g}"
    rows = parsed.layer_rows(float(ratio))
    summary = pd.DataFrame([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "kind"}
                            for row in parsed.summary()])
    within, across = list(parsed.within), list(parsed.across)
    lines = [f"**{name}**: two draws agree at mean ρ = {a.mean_rho:.3f}, overlap {a.mean_overlap[key]:.2f} at "
             f"ratio {key}" for name, a in parsed.within.items()]
    lines += [f"**{name.replace('|', ' vs ')}** on the same draw: mean ρ = {a.mean_rho:.3f}, overlap "
              f"{a.mean_overlap[key]:.2f}" for name, a in parsed.across.items()]
    verdict = stability_verdict(parsed)
    if verdict is not None:
        lines.append("→ " + verdict.sentence(emphasis="**"))
    status = "  \n".join(lines) + f"  \n({parsed.draws} disjoint draws; run `{result.get('run_id', '')}`)"
    return (status, inspect_figures.stability_rho(rows, within, across),
            inspect_figures.stability_overlap(rows, within, across, key), summary)


def run_choices(services: Services) -> list[tuple[str, str]]:
    runs = [r for r in services.runs.list() if r.kind in ("score", "prune")]
    return [(f"{r.run_id} · {r.kind} · {r.config.get('name') or r.config.get('criterion')}", r.run_id) for r in runs]


def make_report(services: Services):
    @user_errors
    def report(run_id: str | None, contexts: str, request: gr.Request = None, progress=TRACK):
        """Write the chosen run as a self-contained HTML report and offer it for download."""
        if not run_id:
            raise SelectionError("Choose a stored run first (refresh the list if it is empty).")
        texts_ = [line for line in (contexts or "").splitlines() if line.strip()] or list(DEFAULT_CONTEXTS)
        # rebuilding (a refit redone), the menus, the held-out check, the page: about 2 : 1 : 2 : 1
        tracker = JobProgress(progress, "Report", unit="step", weights=REPORT_WEIGHTS)
        html, path = services.export_report(run_id, texts_, on_step=tracker.stage)
        return f"Report of run `{run_id}` written ({len(html) / 1e6:.1f} MB, plotly.js inlined: opens offline).", \
            str(path)
    return report


def build(ctx: Ctx):
    """The tab's layout; returns ``wire()``, to be called after the ``gr.Tabs`` block: it adds the hidden
    pick box outside the tabs (a tab's children exist in the page only while it is shown, and a plot
    click happens on another tab) and wires the picks from the Importance and Agreement tabs."""
    services = ctx.services
    with gr.Tab("Neuron inspector", id="inspect") as tab:
        gr.Markdown(TEACH, elem_classes="teach")
        with gr.Row(equal_height=True):
            layer = gr.Number(0, label="Layer", precision=0, minimum=0, elem_id="inspect-layer")
            index = gr.Number(0, label="Neuron index", precision=0, minimum=0, elem_id="inspect-index")
            top_k = gr.Slider(label="Contexts shown", **InspectOptions.ui("top_k"))
            go = gr.Button("Inspect", variant="primary", elem_id="inspect-button", min_width=120)
            stop_button = gr.Button("Stop", variant="stop", min_width=100)
        status = gr.Markdown("", elem_id="inspect-status")
        ranks = gr.Dataframe(label="Score and rank under every scored criterion", interactive=False,
                             headers=RANK_COLUMNS, elem_id="inspect-ranks")
        contexts = gr.HTML(elem_id="inspect-contexts")
        choice = gr.Dropdown([], label="Next-token menu at context", allow_custom_value=True)
        menu = gr.Plot(label="Menu change when this neuron alone is removed", elem_id="inspect-menu-plot")
        report_state = gr.State(None)
        with gr.Accordion("Rank stability across calibration draws", open=True):
            with gr.Row(equal_height=True):
                defaults = [c for c in ("entropy", "cross_entropy") if c in criteria()]
                chosen = gr.CheckboxGroup(criteria(), value=defaults, label="Criteria", scale=3)
                draws = gr.Slider(label="Disjoint draws K", **StabilityOptions.ui("draws"))
                ratio = gr.Dropdown([f"{r:g}" for r in OVERLAP_RATIOS], value="0.2", label="Ratio (removal overlap)")
                measure = gr.Button("Measure", variant="primary", elem_id="stability-button", min_width=120)
                stop_stability = gr.Button("Stop", variant="stop", min_width=100)
            gr.Markdown("Each draw uses the Model & data tab's windows × tokens; draws never share a window.",
                        elem_classes="teach")
            stability_status = gr.Markdown("", elem_id="stability-status")
            with gr.Row():
                rho_plot = gr.Plot(label="Spearman ρ per layer", elem_id="stability-plot")
                overlap_plot = gr.Plot(label="Removal overlap per layer", elem_id="stability-overlap-plot")
            summary = gr.Dataframe(label="Agreement summary", headers=SUMMARY_COLUMNS, interactive=False)
            stability_state = gr.State(None)
        with gr.Accordion("Report: a stored run as one HTML file (opens offline)", open=False):
            with gr.Row(equal_height=True):
                run_id = gr.Dropdown([], label="Run", scale=3, elem_id="report-run")
                refresh = gr.Button("Refresh list", min_width=120)
                export = gr.Button("Export HTML report", variant="primary", elem_id="report-button", min_width=160)
            contexts_box = gr.Textbox("\n".join(DEFAULT_CONTEXTS), lines=2,
                                      label="Contexts for the next-token menus (prune runs; one per line)")
            report_status = gr.Markdown("")
            report_file = gr.File(label="Report", elem_id="report-file")

    inspect_event = go.click(make_inspect(services), [layer, index, top_k, *ctx.data_inputs],
                             [status, ranks, contexts, choice, menu, report_state], api_name="inspect_neuron",
                             show_progress_on=status, **model_events())
    stop_on_click(services, stop_button, status, [inspect_event], what="inspection")
    choice.input(show_menu, [choice, report_state], menu, api_visibility="private")
    outputs = [status, ranks, contexts, choice, menu, report_state]
    inputs = [layer, index, top_k, *ctx.data_inputs]
    stability_event = measure.click(make_stability(services), [chosen, draws, ratio, *ctx.data_inputs,
                                                               *ctx.criterion_inputs],
                                    [stability_status, rho_plot, overlap_plot, summary, stability_state],
                                    api_name="rank_stability", show_progress_on=stability_status, **model_events())
    stop_on_click(services, stop_stability, stability_status, [stability_event], what="stability run")
    ratio.input(draw_stability, [stability_state, ratio], [stability_status, rho_plot, overlap_plot, summary],
                api_visibility="private")

    def refresh_runs():
        choices = run_choices(services)
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    refresh.click(refresh_runs, None, run_id, api_visibility="private")
    tab.select(refresh_runs, None, run_id, api_visibility="private")
    export.click(make_report(services), [run_id, contexts_box], [report_status, report_file], api_name="export_report",
                 show_progress_on=report_status, **model_events())
    for event in (inspect_event, stability_event):
        ctx.after(event)

    def wire() -> None:
        if "tabs" not in ctx.components:
            return
        pick_box = gr.Textbox(elem_id="neuron-pick", show_label=False, container=False, visible="hidden")
        pick_inputs = [pick_box, ctx["agree_layer"] if "agree_layer" in ctx.components else layer,
                       ctx["heat_criterion"] if "heat_criterion" in ctx.components else pick_box]
        pick_box.change(make_pick(services), pick_inputs, [ctx["tabs"], layer, index],
                       api_visibility="private").then(make_inspect(services), inputs, outputs,
                                                      api_visibility="private", show_progress_on=status,
                                                      **model_events())
        if "agree_outputs" in ctx.components:
            ctx["agree_outputs"][4].select(pick_row, None, [ctx["tabs"], layer, index],
                                           api_visibility="private").then(make_inspect(services), inputs, outputs,
                                                                          api_visibility="private",
                                                                          show_progress_on=status, **model_events())
    return wire
