"""Tab 0 — Tour: the HFPrune story in six one-click steps on the defaults, each result also landing
in the regular tabs. Step 1 reads precomputed scores shipped in ``assets/tour`` (marked as such in
the status line; "Recompute" scores on this machine instead). Step 4 sets its live cut, made from one
draw of calibration text, beside the same cuts over several larger draws (``assets/tour/draws.json``,
precomputed); step 6 heals the entropy cut with the least-squares refit and a short recovery. Every
sentence that compares two numbers is generated from the numbers shown beside it (core.studies)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict

import gradio as gr
import pandas as pd

from core import paths
from core.errors import HFPruneError, SelectionError, Stopped
from core.measure.timing import heal_parts, heal_seconds
from core.models.loading import DEFAULT_MODEL
from core.studies.claims import Claim, heal_claims
from core.studies.stability import draw_claims, draw_rows, single_draw_claim

from .. import figures, texts
from ..context import TRACK, Ctx, model_events, stop_on_click
from ..guard import session_id, user_errors
from ..progress import JobProgress, duration, stream_worker
from ..services import Services
from ..state import DataSpec, Session
from ..status import count, readable
from . import agreement, importance
from .prune import variant_controls
from .recover import status_text as recovery_status
from .side_by_side import chosen_variants

ASSETS = paths.ASSETS / "tour"
CRITERIA = ("entropy", "cross_entropy")
RATIO = 0.3
CONTEXT = texts.DEFAULT_CONTEXT
MENU_K = 10
DEFAULT_DATA = DataSpec("wiki", "wiki", 8, 64, 0)  # the Model & data tab's defaults
TOUR_LAYERS = ["0", "15", "29"]
LIVE_LABEL = f"this one draw, {DEFAULT_DATA.samples} × {DEFAULT_DATA.seq_len}"
HEAL_CRITERION = "entropy"  # step 6 heals this criterion's cut from step 4
HEAL_MINUTES = 1.0  # step 6's recovery budget
HEAL_WINDOWS = 64  # calibration windows of the Tour's least-squares refit (half the Prune tab's 128: its time)
REDRAW_S = 1.0


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
        tracker = JobProgress(progress, "Tour step 1", stages=1, unit="criterion")
        tracker.stage(0, f"loading {DEFAULT_MODEL}")
        services.model(DEFAULT_MODEL)
        seconds = services.tour_seconds(session, DEFAULT_MODEL, DEFAULT_DATA, list(CRITERIA), ASSETS, recompute)
        tracker.replan(seconds, estimate_s=sum(seconds))  # shipped scores weigh nothing, a scoring pass its cost
        origins = services.tour_scores(session, DEFAULT_MODEL, DEFAULT_DATA, list(CRITERIA), ASSETS,
                                       recompute=recompute, stop=job.is_set,
                                       on_criterion=lambda k, c: tracker.stage(k, f"scores for {c}"))
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
                + "  \n".join(lines)), recompute_estimate(services, session)
    return step1


def recompute_estimate(services: Services, session: Session) -> str:
    """What "Recompute" would take, from a probe of the loaded model timed now (nothing before step 1 has
    loaded it: the button claims no time it has not measured)."""
    if not services.models.cached(DEFAULT_MODEL):
        return "Step 1 loads the model; then the time a recompute takes is measured here."
    seconds = services.tour_seconds(session, DEFAULT_MODEL, DEFAULT_DATA, list(CRITERIA), ASSETS, recompute=True)
    if not sum(seconds):
        return "*Recompute*: both scores were computed on this machine already (cached), so it is instant."
    return (f"*Recompute* scores both criteria here: **about {duration(sum(seconds))}** on this machine now "
            f"(from a probe of the model timed just now, so a busy machine shows a longer time).")


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


CUT_COLUMNS = ["variant", "criterion", "parameters", "perplexity (original → cut)", "KL to original (nats/token)",
               "top-1 agreement", "scores from"]


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
        live: dict[str, dict] = {}
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
                         "KL to original (nats/token)": quality["kl"] if quality else None,
                         "top-1 agreement": f"{100 * quality['top1']:.0f} %" if quality else "—"})
            rows[-1]["scores from"] = LIVE_LABEL
            live[criterion] = quality
        frame = readable(pd.DataFrame(rows, columns=CUT_COLUMNS))  # two cuts never read the same
        status = (f"Made **{', '.join(names.values())}** (30 % of the MLP neurons removed, uniform), measured on "
                  f"{services.QUICK_WINDOWS} × {services.QUICK_SEQ_LEN} held-out tokens. They are in the Prune tab's "
                  "variant list and in Compare.")
        plot, table, sentences = draws_view(services)
        return (frame, status, gr.update(choices=list(session.variants), value=list(names.values())[-1]),
                *variant_controls(session), live_text(services, live), plot, table, sentences)
    return step4


def live_text(services: Services, live: dict[str, dict]) -> str:
    """The sentence on step 4's live cut, set against the calibration draws (derived, never fixed)."""
    if not all(live.get(c) for c in CRITERIA):
        return ""
    try:
        asset = services.tour_draws(ASSETS)
        return single_draw_claim(live, asset, RATIO, DEFAULT_DATA.samples, DEFAULT_DATA.seq_len).text
    except HFPruneError as exc:
        return str(exc)


def draws_frame(rows: list[dict]) -> pd.DataFrame:
    """Step 4's second table: per ratio, each criterion's KL over the draws and what the two share."""
    out = []
    for r in rows:
        a, b = r["a"], r["b"]
        closer = a if r["kl_a"] < r["kl_b"] else b
        sign = 1 if closer == b else -1  # a draw counts for the closer criterion where a − b has this sign
        wins = sum(sign * d > 0 for d in r["paired_differences"])
        gap = abs(r["kl_a"] - r["kl_b"]) / max(r["kl_a"], r["kl_b"])
        row = {"removed": f"{100 * r['ratio']:.0f} %",
               f"KL {a} (mean ± std)": f"{r['kl_a']:.3f} ± {r['std_a']:.3f}",
               f"KL {b} (mean ± std)": f"{r['kl_b']:.3f} ± {r['std_b']:.3f}",
               "closer on average": f"{closer}, by {100 * gap:.1f} %",
               "draws it is closer in": f"{wins} of {len(r['paired_differences'])}",
               "ranges overlap": "no" if r["outside_spread"] else "yes (inside the noise)",
               "paired t-test p": None if math.isnan(r["paired_p"]) else round(r["paired_p"], 3),
               "same neurons removed: criteria, same draw": f"{100 * r['overlap_criteria']:.0f} %"}
        for name, value in r["overlap_draws"].items():
            row[f"…: two draws of {name}"] = f"{100 * value:.0f} %"
        row["…: chance"] = f"{100 * r['chance']:.0f} %"
        out.append(row)
    return pd.DataFrame(out)


def draws_view(services: Services) -> tuple:
    """Step 4's precomputed calibration-draw figure, table and sentences; a note instead when the file
    is missing."""
    try:
        asset = services.tour_draws(ASSETS)
    except HFPruneError as exc:
        return figures.empty(str(exc)), pd.DataFrame(), str(exc)
    note = (f"{asset['draws']} disjoint draws of {asset['samples']} × {asset['seq_len']} calibration tokens; KL on "
            f"{asset['eval_windows']} × {asset['eval_seq_len']} held-out tokens; precomputed")
    plot = figures.draw_spread(asset["fidelity"], asset["overlap"], asset["criteria"], note)
    head = (f"**Precomputed** over {asset['draws']} disjoint calibration draws of {asset['samples']} × "
            f"{asset['seq_len']} tokens each, KL measured on {asset['eval_windows']} × {asset['eval_seq_len']} "
            f"held-out tokens (`assets/tour/draws.json`, measured by `{asset['measured_by']}` in about "
            f"{duration(asset['seconds'])} on {asset['machine']}; `{asset['made_by']}` remakes the file).")
    sentences = "\n".join(f"- {c.text}" for c in draw_claims(asset, RATIO))
    return plot, draws_frame(draw_rows(asset)), f"{head}\n\n{sentences}"


def heal_names() -> dict[str, str]:
    """{role: variant name} of step 6's models: the entropy cut of step 4, its refit, the recovered refit."""
    cut = tour_variants()[HEAL_CRITERION]
    return {"cut": cut, "refit": f"{cut}+lsq", "recovered": f"{cut}+lsq+kd"}


HEAL_COLUMNS = ["model", "variant", "KL to original (nats/token)", "perplexity", "top-1 agreement", "parameters"]


def heal_table(services: Services, session: Session, quality: dict[str, dict]) -> pd.DataFrame:
    """Step 6's table: the original and each model measured so far, on step 4's held-out text."""
    labels = {"cut": "the cut (step 4)", "refit": "+ least-squares refit", "recovered": "+ recovery"}
    names = heal_names()
    rows = []
    if quality:
        first = next(iter(quality.values()))
        original = services.model(session.model_spec).model
        rows.append({"model": "original", "variant": "original", "KL to original (nats/token)": 0.0,
                     "perplexity": first["original_perplexity"], "top-1 agreement": "100 %",
                     "parameters": count(sum(p.numel() for p in original.parameters()))})
    for role, q in quality.items():
        variant = session.variants.get(names[role])
        rows.append({"model": labels[role], "variant": names[role],
                     "KL to original (nats/token)": q["kl"],
                     "perplexity": q["perplexity"], "top-1 agreement": f"{100 * q['top1']:.0f} %",
                     "parameters": count(sum(p.numel() for p in variant.model.parameters())) if variant else "—"})
    return readable(pd.DataFrame(rows, columns=HEAL_COLUMNS))  # models that differ never read the same


def criterion_gap(services: Services) -> float | None:
    """The average relative KL gap between the criteria at the Tour's ratio, over the calibration draws."""
    try:
        claims = draw_claims(services.tour_draws(ASSETS), RATIO)
    except HFPruneError:
        return None
    return next((c.values["relative"] for c in claims if c.kind == "draws" and math.isclose(c.ratio, RATIO)), None)


def heal_sentences(claims: list[Claim]) -> str:
    return "\n".join(f"- {c.text}" for c in claims)


def make_step6(services: Services):
    @user_errors
    def step6(request: gr.Request = None, progress=TRACK):
        """The entropy cut of step 4, refitted by least squares and then recovered for a minute, each
        measured on step 4's held-out text, with the menus after the default context. Yields (status,
        table, menu plot); the recovery runs in a worker thread (it takes the model lock itself)."""
        session = services.sessions.get(session_id(request))
        _require_scores(session)
        names = heal_names()
        if names["cut"] not in session.variants:
            raise SelectionError("Run step 4 first: this step heals its entropy cut.")
        job = session.new_job()
        began = time.monotonic()
        minutes = HEAL_MINUTES
        eval_tokens = services.QUICK_WINDOWS * services.QUICK_SEQ_LEN
        per_token = services.seconds_per_token(session.model_spec)
        refit_tokens = HEAL_WINDOWS * session.calibration.seq_len
        seconds = heal_seconds(per_token, refit_tokens, minutes, eval_tokens, 3)
        # the bar's four steps weigh their estimated seconds (the same parts as heal_seconds), so the minute of
        # recovery is most of the bar and the time left read from its rate holds through the last measurement
        weights = heal_parts(per_token, refit_tokens, minutes, eval_tokens)
        tracker = JobProgress(progress, "Tour step 6", unit="step", weights=weights, estimate_s=seconds)
        estimate = f"Estimated time: **about {duration(seconds)}** on this machine"
        quality: dict[str, dict] = {}
        keep = (names["cut"],)
        yield f"{estimate}. Measuring the cut…", heal_table(services, session, quality), figures.empty("…")
        tracker.stage(0, f"measuring {names['cut']}")
        quality["cut"] = services.quick_quality(session, names["cut"], stop=job.is_set)
        tracker.stage(1, "least-squares refit")
        services.prune(session, HEAL_CRITERION, RATIO, "uniform", 1, names["refit"], stop=job.is_set,
                       compensate_windows=HEAL_WINDOWS, replace=True, keep=keep)
        quality["refit"] = services.quick_quality(session, names["refit"], stop=job.is_set)
        yield (f"{estimate}. Refit done; recovering the MLP weights for {minutes:g} min…",
               heal_table(services, session, quality), gr.update())
        tracker.stage(2, "recovery")
        session.drop_variant(names["recovered"])  # step 6 run again remakes its own recovered variant
        points: list[dict] = []
        started = time.monotonic()

        def work(emit):
            return services.recover(session, names["refit"], params="mlp", minutes=minutes, name=names["recovered"],
                                    keep=keep, stop=job.is_set, on_step=lambda record: emit(asdict(record)))

        def draw(new: list[dict], finished: bool) -> tuple:
            points.extend(new)
            tracker.step("recovery seconds", min(time.monotonic() - started, 60 * minutes), 60 * minutes)
            state = "Stopping" if job.is_set() else "Recovering"
            return recovery_status(points, minutes, 0, state), heal_table(services, session, quality), gr.update()

        try:
            yield from stream_worker(work, draw, job, REDRAW_S, name="hfprune-tour-recover")
        except Stopped:
            yield ("**Stopped** during the recovery: the refit above is kept, no recovered model was stored.",
                   heal_table(services, session, quality), gr.update())
            return
        tracker.stage(3, "measuring")
        quality["recovered"] = services.quick_quality(session, names["recovered"], stop=job.is_set)
        order = [names["cut"], names["refit"], names["recovered"]]
        menu = services.menus(session, chosen_variants(session, order), CONTEXT, MENU_K)
        top1 = {n: (menu.top1[n], max(menu.probs[n])) for n in menu.probs}
        claims = heal_claims({names[role]: q for role, q in quality.items()}, top1, minutes=minutes,
                             names=("original", *order), criterion_gap=criterion_gap(services))
        measured = (f"Measured on the same {services.QUICK_WINDOWS} × {services.QUICK_SEQ_LEN} held-out tokens as "
                    f"step 4; the whole step took {duration(time.monotonic() - began)}.")
        yield (f"{measured}\n\n{heal_sentences(claims)}", heal_table(services, session, quality),
               figures.token_menu(menu.tokens, menu.probs, menu.entropy))
    return step6


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
            recompute = gr.Button("Recompute the scores on this machine", elem_id="tour-1-recompute")
        out1 = gr.Markdown("", elem_id="tour-1-out")
        recompute_time = gr.Markdown("Step 1 loads the model; then the time a recompute takes is measured here.",
                                     elem_id="tour-1-estimate")
        gr.Markdown(f"### 2 · {steps[1][0]}\n{steps[1][1]}")
        b2 = gr.Button("2 · Show the histograms", variant="primary", elem_id="tour-2")
        out2 = gr.Plot(label="Importance per layer, one panel per criterion", elem_id="tour-2-plot")
        gr.Markdown(f"### 3 · {steps[2][0]}\n{steps[2][1]}")
        b3 = gr.Button("3 · Compare the two rankings", variant="primary", elem_id="tour-3")
        out3_text = gr.Markdown("", elem_id="tour-3-out")
        out3_plot = gr.Plot(label="Removal overlap per layer", elem_id="tour-3-plot")
        out3_table = gr.Dataframe(label="Neurons the two criteria disagree on most", interactive=False,
                                  headers=agreement.disagree_columns(*CRITERIA), elem_id="tour-3-table")
        gr.Markdown(f"### 4 · {steps[3][0]}\n{steps[3][1]}")
        b4 = gr.Button("4 · Prune 30 % with each criterion", variant="primary", elem_id="tour-4")
        out4 = gr.Dataframe(label=f"The price of each cut from {LIVE_LABEL} calibration tokens, measured on held-out "
                                  "text", headers=CUT_COLUMNS, interactive=False, elem_id="tour-4-table")
        out4_live = gr.Markdown("", elem_id="tour-4-live")
        plot, table, sentences = draws_view(services)  # precomputed: shown before any click
        out4_plot = gr.Plot(plot, label="The same cuts from several larger calibration draws (precomputed)",
                            elem_id="tour-4-draws-plot")
        out4_table = gr.Dataframe(table, label="The cuts over the calibration draws (precomputed)", interactive=False,
                                  elem_id="tour-4-draws-table")
        out4_text = gr.Markdown(sentences, elem_id="tour-4-draws-out")
        gr.Markdown(f"### 5 · {steps[4][0]}\n{steps[4][1]}")
        b5 = gr.Button("5 · Show the next-token menus", variant="primary", elem_id="tour-5")
        out5_plot = gr.Plot(label="Next-token menus", elem_id="tour-5-plot")
        out5_text = gr.Markdown("", elem_id="tour-5-out")
        gr.Markdown(f"### 6 · {steps[5][0]}\n{steps[5][1]}")
        with gr.Row():
            b6 = gr.Button(f"6 · Refit and recover the entropy cut (about {HEAL_MINUTES + 1:g} min)", variant="primary",
                           elem_id="tour-6")
            stop6 = gr.Button("Stop", variant="stop", elem_id="tour-6-stop")
        out6_text = gr.Markdown("", elem_id="tour-6-out")
        out6_table = gr.Dataframe(label="What heals the cut, measured on step 4's held-out text", interactive=False,
                                  headers=HEAL_COLUMNS, elem_id="tour-6-table")
        out6_plot = gr.Plot(label="Next-token menus: original, cut, refit, recovered", elem_id="tour-6-plot")

    def wire() -> None:
        c = ctx
        for button, handler, name in ((b1, make_step1(services), "tour_score"),
                                      (recompute, make_step1(services, recompute=True), "tour_recompute")):
            c.after(button.click(handler, None, [out1, recompute_time], api_name=name, show_progress_on=out1,
                                 **model_events()))
        c.after(b2.click(make_step2(services), None,
                         [out2, c["hist"], c["heat"], c["summary"], c["layers"], c["shown"], c["heat_criterion"]],
                         api_name="tour_histograms", show_progress_on=out2))
        c.after(b3.click(make_step3(services), None,
                         [out3_text, out3_plot, out3_table, *c["agree_outputs"], c["agree_a"], c["agree_b"],
                          c["agree_layer"], c["agree_ratio"]], api_name="tour_disagreements",
                         show_progress_on=out3_text))
        c.after(b4.click(make_step4(services), None,
                         [out4, c["prune_status"], c["export_variant"], c["held"], c["drop_pick"], c["replace"],
                          c["held_header"], out4_live, out4_plot, out4_table, out4_text], api_name="tour_prune",
                         show_progress_on=out4, **model_events()))
        c.after(b5.click(make_step5(services), None,
                         [out5_plot, out5_text, c["menu_plot"], c["menu_text"], c["compare_variants"],
                          c["menu_context"]], api_name="tour_menus", show_progress_on=out5_plot,
                         **model_events()))
        heal = b6.click(make_step6(services), None, [out6_text, out6_table, out6_plot], api_name="tour_heal",
                        show_progress_on=out6_text, **model_events())
        c.after(heal)
        stop_on_click(services, stop6, out6_text, [heal], api_name="tour_stop", what="Tour's step 6")
    return wire
