"""Tab 0 — Tour: the HFPrune story in five one-click steps on the defaults, each result also landing
in the regular tabs. Step 1 reads precomputed scores shipped in ``assets/tour`` (marked as such in
the status line; "Recompute" scores on this machine instead)."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core import paths
from core.errors import SelectionError
from core.models.loading import DEFAULT_MODEL

from .. import figures, texts
from ..context import TRACK, Ctx, model_events
from ..guard import session_id, user_errors
from ..progress import JobProgress
from ..services import Services
from ..state import DataSpec, Session
from ..status import count
from . import agreement, importance
from .prune import variant_controls
from .side_by_side import chosen_variants

ASSETS = paths.ASSETS / "tour"
CRITERIA = ("entropy", "cross_entropy")
RATIO = 0.3
CONTEXT = texts.DEFAULT_CONTEXT
MENU_K = 10
DEFAULT_DATA = DataSpec("wiki", "wiki", 8, 64, 0)  # the Model & data tab's defaults
TOUR_LAYERS = ["0", "15", "29"]


def tour_variants() -> dict[str, str]:
    """{criterion: variant name} of the two pruned models the tour makes."""
    return {c: f"tour-{c}-{round(100 * RATIO)}%" for c in CRITERIA}


def _require_scores(session: Session) -> None:
    missing = [c for c in CRITERIA if c not in session.scores]
    if missing or session.model_spec != DEFAULT_MODEL:
        raise SelectionError("Run step 1 first: the tour needs the entropy and cross-entropy scores of the default "
                             "model.")


def make_step1(services: Services, recompute: bool = False):
    @user_errors
    def step1(request: gr.Request = None, progress=TRACK):
        """Scores for entropy and cross-entropy on the defaults: shipped (precomputed) or computed here."""
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        tracker = JobProgress(progress, "Tour step 1", stages=2, unit="step")
        tracker.stage(0, f"loading {DEFAULT_MODEL}")
        services.model(DEFAULT_MODEL)
        tracker.stage(1, "scores")
        origins = services.tour_scores(session, DEFAULT_MODEL, DEFAULT_DATA, list(CRITERIA), ASSETS,
                                       recompute=recompute, stop=job.is_set)
        lines = []
        for criterion, origin in origins.items():
            result = session.scores[criterion]
            how = {"precomputed": "**precomputed** (shipped in assets/tour, made with these exact settings)",
                   "computed": f"computed on this machine in {result.seconds:.1f} s",
                   "memory": "computed on this machine earlier (cached)",
                   "disk": "computed on this machine earlier (run store)"}.get(origin, origin)
            lines.append(f"**{criterion}**: {how}")
        neurons = sum(s.numel() for s in session.scores[CRITERIA[0]].scores)
        return (f"Scored all {count(neurons)} MLP neurons of {DEFAULT_MODEL} on {DEFAULT_DATA.short()}.  \n"
                + "  \n".join(lines))
    return step1


def make_step2(services: Services):
    @user_errors
    def step2(request: gr.Request = None):
        """Per-criterion histogram panels of three layers + the Importance tab's views."""
        session = services.sessions.get(session_id(request))
        _require_scores(session)
        hist, heat, table, _ = importance.draw(session, TOUR_LAYERS, list(CRITERIA), True, CRITERIA[0])
        pickers = importance.control_updates(session, TOUR_LAYERS, list(CRITERIA), CRITERIA[0])
        return hist, hist, heat, table, *pickers
    return step2


def make_step3(services: Services):
    @user_errors
    def step3(request: gr.Request = None):
        """Removal overlap with its chance line and the top disagreements + the Agreement tab's views."""
        session = services.sessions.get(session_id(request))
        _require_scores(session)
        status, scatter, rho, overlap, table = agreement.draw(session, CRITERIA[0], CRITERIA[1], 15, RATIO)
        return (status, overlap, table, status, scatter, rho, overlap, table, gr.update(value=CRITERIA[0]),
                gr.update(value=CRITERIA[1]), gr.update(value=15), gr.update(value=RATIO))
    return step3


def make_step4(services: Services):
    @user_errors
    def step4(request: gr.Request = None, progress=TRACK):
        """Prune 30 % uniformly with each criterion; the price of each cut at a glance."""
        session = services.sessions.get(session_id(request))
        _require_scores(session)
        job = session.new_job()
        names = tour_variants()
        tracker = JobProgress(progress, "Tour step 4", stages=2 * len(names), unit="step")
        rows = []
        for index, (criterion, name) in enumerate(names.items()):
            tracker.stage(2 * index, f"pruning with {criterion}")
            variant, _ = services.prune(session, criterion, RATIO, "uniform", 1, name, stop=job.is_set,
                                        replace=True)  # running step 4 again remakes its own two variants
            tracker.stage(2 * index + 1, f"measuring {name}")
            quality = services.quick_quality(session, name, stop=job.is_set)
            variant.metrics = {**(variant.metrics or {}), "kl": quality.get("kl"), "quick": quality}
            rows.append({"variant": name, "criterion": criterion,
                         "parameters": count(sum(p.numel() for p in variant.model.parameters())),
                         "perplexity (original → cut)": f"{quality['original_perplexity']:.1f} → "
                                                        f"{quality['perplexity']:.1f}" if quality else "—",
                         "KL to original (nats/token)": round(quality["kl"], 4) if quality else None,
                         "top-1 agreement": f"{100 * quality['top1']:.0f} %" if quality else "—"})
        frame = pd.DataFrame(rows)
        status = (f"Made **{', '.join(names.values())}** (30 % of the MLP neurons removed, uniform), measured on "
                  f"{services.QUICK_WINDOWS} × {services.QUICK_SEQ_LEN} held-out tokens. They are in the Prune tab's "
                  "variant list and in Compare.")
        return (frame, status, gr.update(choices=list(session.variants), value=list(names.values())[-1]),
                *variant_controls(session))
    return step4


def make_step5(services: Services):
    @user_errors
    def step5(request: gr.Request = None):
        """The original's and both cut models' next-token menus after the default context."""
        session = services.sessions.get(session_id(request))
        _require_scores(session)
        names = [n for n in tour_variants().values() if n in session.variants]
        if len(names) < len(CRITERIA):
            raise SelectionError("Run step 4 first: it makes the two pruned models this step compares.")
        result = services.menus(session, chosen_variants(session, names), CONTEXT, MENU_K)
        summary = " · ".join(f"**{n}**: top-1 {result.top1[n]!r} ({100 * max(result.probs[n]):.0f} %), prediction "
                             f"entropy {result.entropy[n]:.2f} nats" for n in result.probs)
        menu = figures.token_menu(result.tokens, result.probs, result.entropy)
        return menu, summary, menu, summary, gr.update(value=names), gr.update(value=CONTEXT)
    return step5


def build(ctx: Ctx):
    """The Tour tab's layout; returns ``wire()``, called once the regular tabs (whose outputs the
    steps also fill) exist."""
    services = ctx.services
    steps = texts.TOUR_STEPS
    with gr.Tab("Tour", id="tour"):
        gr.Markdown(texts.TOUR_INTRO, elem_classes="teach")
        gr.Markdown(f"### 1 · {steps[0][0]}\n{steps[0][1]}")
        with gr.Row():
            b1 = gr.Button("1 · Score with entropy and cross-entropy", variant="primary", elem_id="tour-1")
            recompute = gr.Button("Recompute the scores on this machine (~20 s)", elem_id="tour-1-recompute")
        out1 = gr.Markdown("", elem_id="tour-1-out")
        gr.Markdown(f"### 2 · {steps[1][0]}\n{steps[1][1]}")
        b2 = gr.Button("2 · Show the histograms", variant="primary", elem_id="tour-2")
        out2 = gr.Plot(label="Importance per layer, one panel per criterion", elem_id="tour-2-plot")
        gr.Markdown(f"### 3 · {steps[2][0]}\n{steps[2][1]}")
        b3 = gr.Button("3 · Compare the two rankings", variant="primary", elem_id="tour-3")
        out3_text = gr.Markdown("", elem_id="tour-3-out")
        out3_plot = gr.Plot(label="Removal overlap per layer", elem_id="tour-3-plot")
        out3_table = gr.Dataframe(label="Neurons the two criteria disagree on most", interactive=False,
                                  elem_id="tour-3-table")
        gr.Markdown(f"### 4 · {steps[3][0]}\n{steps[3][1]}")
        b4 = gr.Button("4 · Prune 30 % with each criterion", variant="primary", elem_id="tour-4")
        out4 = gr.Dataframe(label="The price of each cut, measured on held-out text", interactive=False,
                            elem_id="tour-4-table")
        gr.Markdown(f"### 5 · {steps[4][0]}\n{steps[4][1]}")
        b5 = gr.Button("5 · Show the next-token menus", variant="primary", elem_id="tour-5")
        out5_plot = gr.Plot(label="Next-token menus", elem_id="tour-5-plot")
        out5_text = gr.Markdown("", elem_id="tour-5-out")

    def wire() -> None:
        c = ctx
        for button, handler, name in ((b1, make_step1(services), "tour_score"),
                                      (recompute, make_step1(services, recompute=True), "tour_recompute")):
            c.after(button.click(handler, None, out1, api_name=name, **model_events()))
        c.after(b2.click(make_step2(services), None,
                         [out2, c["hist"], c["heat"], c["summary"], c["layers"], c["shown"], c["heat_criterion"]],
                         api_name="tour_histograms"))
        c.after(b3.click(make_step3(services), None,
                         [out3_text, out3_plot, out3_table, *c["agree_outputs"], c["agree_a"], c["agree_b"],
                          c["agree_layer"], c["agree_ratio"]], api_name="tour_disagreements"))
        c.after(b4.click(make_step4(services), None,
                         [out4, c["prune_status"], c["export_variant"], c["held"], c["drop_pick"], c["replace"],
                          c["held_header"]], api_name="tour_prune", **model_events()))
        c.after(b5.click(make_step5(services), None,
                         [out5_plot, out5_text, c["menu_plot"], c["menu_text"], c["compare_variants"],
                          c["menu_context"]], api_name="tour_menus", **model_events()))
    return wire
