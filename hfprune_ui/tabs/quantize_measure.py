"""Tab 6 — Quantize & measure: quantize variants, zero-shot accuracy (lm-eval), measured speed / memory / size."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.errors import HFPruneError, Stopped
from core.measure.speed import MIN_SPREAD_REPEATS, TARGET_SPREAD, SpeedBudget, SpeedUp
from core.measure.timing import zeroshot_seconds
from core.measure.zeroshot import resolvable_difference, separates
from core.measure.zeroshot_tasks import SHIPPED_TASKS
from core.quantize.backends import METHODS

from .. import figures, texts
from ..context import PLAIN, TRACK, Ctx, model_events, stop_on_click
from ..guard import ACTIVITY, session_id, user_errors
from ..progress import JobProgress, duration, stream_worker
from ..services import Services
from ..status import count, readable
from .llamacpp import build_panel
from .side_by_side import chosen_variants

SPEED_COLUMNS = {"variant": "variant", "device": "device", "method": "weights", "params": "params",
                 "weight_bytes": "weight MB", "disk_bytes": "disk MB", "peak_memory_bytes": "peak memory MB",
                 "prefill_ms": "prefill ms (1×N, median)", "decode_tokens_per_s": "decode tok/s (median)",
                 "repeats": "repeats", "spread": "spread reached (IQR / median)", "ideal_speedup": "FLOP ideal",
                 "prefill_speedup": "prefill speed-up", "decode_speedup": "decode speed-up", "speedup_note": "note"}
MB_COLUMNS = ("weight_bytes", "disk_bytes", "peak_memory_bytes")
MAX_REPEATS = 15  # repeats go on (up to this, within the budget) until the spread of the timings is known
PERPLEXITY_WINDOWS, PERPLEXITY_LEN = 4, 64  # held-out tokens for the size-vs-quality plot
REDRAW_S = 1.0  # the table redraws at most this often while models are measured


def make_sources(services: Services):
    def sources(request: gr.Request = None):
        """Offer 'original' and this session's variants as quantization sources and measured variants."""
        names = list(services.sessions.get(session_id(request)).variants)
        return gr.update(choices=["original", *names], value="original"), gr.update(choices=names, value=names)
    return sources


def make_quantize(services: Services):
    @user_errors
    def quantize(source: str, method: str, request: gr.Request = None, progress=PLAIN):
        session = services.sessions.get(session_id(request))
        progress(0.2, desc=f"quantizing {source} with {method}")
        variant, evicted = services.quantize(session, source or "original", method)
        note = f" '{evicted}' was dropped to make room (its run stays on disk)." if evicted else ""
        names = list(session.variants)
        return (f"Made **{variant.name}**; it is now in the Compare tab and in the lists below.{note}",
                gr.update(choices=["original", *names]), gr.update(choices=names, value=names))
    return quantize


def zeroshot_frame(rows: list[dict], tasks: list[str]) -> pd.DataFrame:
    """One row per model: each task's accuracies as 'value ± standard error', its n and chance level."""
    out = []
    for row in rows:
        cells = {"variant": row["variant"]}
        for task in tasks:
            for metric in ("acc", "acc_norm"):
                value = row.get(f"{task} {metric}")
                if value is not None:
                    se = row.get(f"{task} {metric}_stderr")
                    cells[f"{task} {metric}"] = f"{value:.3f}" + (f" ± {se:.3f}" if se is not None else "")
            cells[f"{task} n"] = row.get(f"{task} n")
            chance = row.get(f"{task} chance")
            cells[f"{task} chance"] = "—" if chance is None else f"{chance:.2f}"
        out.append(cells)
    return pd.DataFrame(out)


def zeroshot_note(rows: list[dict], tasks: list[str]) -> str:
    """Chance levels, and a warning for every variant whose difference from the original is within noise."""
    if not rows:
        return ""
    chance = [f"{t} {rows[0][f'{t} chance']:.2f}" for t in tasks if rows[0].get(f"{t} chance") is not None]
    lines = [f"Chance (guessing): {', '.join(chance)}. ± is one binomial standard error." if chance else
             "± is one binomial standard error."]
    base, unresolved = rows[0], []
    for row in rows[1:]:
        for task in tasks:
            a, b = base.get(f"{task} acc"), row.get(f"{task} acc")
            n1, n2 = base.get(f"{task} n") or 0, row.get(f"{task} n") or 0
            if a is None or b is None:
                continue
            if not separates(a, n1, b, n2):
                unresolved.append(f"{task}: original {a:.2f} vs {row['variant']} {b:.2f} "
                                  f"(needs > {resolvable_difference(a, n1, b, n2):.2f})")
    if unresolved:
        n = min(base.get(f"{t} n") or 0 for t in tasks)
        lines.append(f"⚠ **Too few items to separate these variants** (n = {n} per task; two accuracies must differ by "
                     f"more than 2 combined standard errors): {'; '.join(unresolved)}. Raise *Items per task*.")
    elif len(rows) > 1:
        lines.append("Every variant's difference from the original is larger than 2 combined standard errors.")
    return "  \n".join(lines)


def make_zeroshot(services: Services):
    @user_errors
    def zeroshot(names: list | None, tasks: list | None, limit: float, request: gr.Request = None,
                 progress=TRACK):
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        picked = chosen_variants(session, names)
        tracker = JobProgress(progress, "Zero-shot", stages=1 + len(picked))
        rows = services.zeroshot(session, picked, list(tasks or []), int(limit), stop=job.is_set,
                                 on_model=lambda k, n, name: tracker.stage(k, name))
        chosen = [t for t in (tasks or []) if any(f"{t} n" in r for r in rows)]
        return zeroshot_frame(rows, chosen), zeroshot_note(rows, chosen)
    return zeroshot


def spread_text(row: dict) -> str:
    """'prefill 2.1 %, decode 7.4 % (budget spent)': the IQR / median each timing reached."""
    text = f"prefill {100 * row.get('prefill_spread', 0.0):.1f} %, decode {100 * row.get('decode_spread', 0.0):.1f} %"
    if row.get("budget_ended"):
        return text + " (budget spent)"
    return text if row.get("spread_known", True) else text + " (most repeats)"


def speed_frame(rows: list[dict]) -> pd.DataFrame:
    """The measured table: medians, repeats, the spread reached, FLOP ideal, both speed-ups as
    'median× (q1–q3)', a verdict. No rows: the empty table with its headers."""
    if not rows:
        return pd.DataFrame(columns=list(SPEED_COLUMNS.values()))
    out = []
    for row in rows:
        cells = {key: row.get(key) for key in SPEED_COLUMNS if key not in ("prefill_speedup", "decode_speedup",
                                                                         "speedup_note", "spread")}
        for column in MB_COLUMNS:
            cells[column] = None if cells[column] is None else round(cells[column] / 1e6, 1)
        cells["params"] = count(cells["params"])
        cells["ideal_speedup"] = f"{cells['ideal_speedup']:.2f}×" if cells.get("ideal_speedup") else "—"
        cells["spread"] = spread_text(row)
        notes = []
        for phase in ("prefill", "decode"):
            value = row.get(f"{phase}_speedup")
            cells[f"{phase}_speedup"] = "baseline" if value is None else SpeedUp(
                value["median"], value["low"], value["high"], value["ideal"]).text()
            if value and value["verdict"]:
                notes.append(f"{phase}: {value['verdict']}")
        cells["speedup_note"] = "; ".join(notes)
        out.append(cells)
    return readable(pd.DataFrame(out)[list(SPEED_COLUMNS)].rename(columns=SPEED_COLUMNS), digits=3)


def speedup_bars(rows: list[dict]):
    return figures.speedups([r["variant"] for r in rows[1:]], [r["prefill_speedup"] for r in rows[1:]],
                            [r["decode_speedup"] for r in rows[1:]], [r["ideal_speedup"] for r in rows[1:]])


def bench_note(rows: list[dict], models: int, budget: float, how: str = "") -> str:
    """'2 of 3 models measured (5 s budget each) …', or after a Stop / failure what is kept."""
    seconds = sum(r.get("seconds", 0.0) for r in rows)
    each = f"{budget:g} s budget each" if budget else "no time budget"
    done = f"{len(rows)} of {models} models measured in {duration(seconds)} ({each})"
    spent = [r["variant"] for r in rows if r.get("budget_ended")]
    wide = (f"; the budget ended the repeats of {', '.join(spent)} before the spread was within "
            f"{100 * TARGET_SPREAD:.0f} % — the spread reached is in the table" if spent else "")
    if how:
        return f"**{how}** — {done}: the rows above are kept{wide}."
    return f"{done}{wide}."


def make_bench(services: Services, measured: dict[str, tuple[int, int]] | None = None):
    measured = {} if measured is None else measured

    @user_errors
    def bench(names: list | None, prefill: float, decode: float, repeats: float,
              budget: float = SpeedBudget.budget_s, request: gr.Request = None, progress=TRACK):
        """Stream the speed/memory table, one row as each model finishes (each within its time budget),
        with prefill and decode speed-ups side by side; then perplexity on 4 × 64 held-out tokens for
        the size-vs-quality plot. A Stop keeps the rows already measured."""
        sid = session_id(request)
        session = services.sessions.get(sid)
        budget = SpeedBudget(budget_s=budget).budget_s
        job = session.new_job()
        picked = chosen_variants(session, names)
        models = 1 + len(picked)
        spec = session.model_spec
        each, total = (services.bench_seconds(spec, models, int(prefill), int(decode), int(repeats), budget,
                                              PERPLEXITY_WINDOWS * PERPLEXITY_LEN)
                       if spec and services.models.cached(spec) else (None, None))  # what the tab showed
        # each model weighs its estimated seconds and the closing perplexity what is left of the total, so the
        # bar (and the time left read from its rate) does not treat a ~10 s evaluation like a model's timings
        weights = [each] * models + [max(total - models * each, 0.05 * each)] if each else None
        tracker = JobProgress(progress, "Measure", stages=models + 1, estimate_s=total, weights=weights)
        rows: list[dict] = []
        measured[sid] = (0, models)

        def work(emit) -> dict:
            ACTIVITY.begin(sid)  # the worker's time counts as this session's activity: a Stop waits for it
            try:
                for row in services.bench(session, picked, int(prefill), int(decode), int(repeats),
                                          max_repeats=MAX_REPEATS, budget_s=budget, stop=job.is_set,
                                          on_model=lambda k, n, name: tracker.stage(k, name),
                                          on_step=lambda phase, done, most, share: tracker.step(
                                              f"{phase} repeat", done, most, share)):
                    emit(row)
                tracker.stage(models, "perplexity for the size-vs-quality plot")
                return {r["variant"]: r["perplexity"]
                        for r in services.evaluate_variants(session, picked, PERPLEXITY_WINDOWS, PERPLEXITY_LEN)}
            finally:
                ACTIVITY.end(sid)

        def draw(new: list[dict], finished: bool) -> tuple:
            rows.extend(new)
            measured[sid] = (len(rows), models)
            note = bench_note(rows, models, budget) + ("" if finished else " Measuring…")
            return speed_frame(rows), speedup_bars(rows), gr.update(), note

        yield (speed_frame([]), speedup_bars([]), figures.empty("The size-vs-quality plot follows the last model."),
               f"Measuring {models} models ({budget:g} s budget each)…" if budget else f"Measuring {models} models…")
        try:
            quality = yield from stream_worker(work, draw, job, REDRAW_S, name="hfprune-measure")
        except (Stopped, HFPruneError) as exc:
            if not rows:
                raise
            how = "Stopped" if isinstance(exc, Stopped) else f"Failed ({exc})"
            yield speed_frame(rows), speedup_bars(rows), gr.update(), bench_note(rows, models, budget, how)
            return
        plot = figures.pareto([r["variant"] for r in rows], [r["weight_bytes"] / 1e6 for r in rows],
                              [quality[r["variant"]] for r in rows],
                              f"perplexity ({PERPLEXITY_WINDOWS} × {PERPLEXITY_LEN} held-out tokens)")
        yield speed_frame(rows), speedup_bars(rows), plot, bench_note(rows, models, budget)
    return bench


def bench_kept(measured: dict[str, tuple[int, int]]):
    """What a Stop of the measurement says stays: '2 of 4 models were measured; their rows stay in the table.'"""
    def kept(sid: str) -> str:
        done, total = measured.get(sid, (0, 0))
        return f"{done} of {total} models were measured; their rows stay in the table." if total else ""
    return kept


def bench_estimate(each: float, total: float, models: int, repeats: int, budget: float) -> str:
    """'About 3 models × 5 s, with the perplexity ≈ 17 s …' before Start: each model's budget, or longer where
    the fewest repeats need more (``each``), and the whole (``total``, the perplexity included)."""
    fewest = min(repeats, MIN_SPREAD_REPEATS)
    if not budget:
        return (f"At least {models} models × {duration(each)}, with the perplexity ≈ **{duration(total)}** with no "
                f"time budget: the repeats go on, up to {MAX_REPEATS}, until the spread is within "
                f"{100 * TARGET_SPREAD:.0f} %.")
    over = (f" (on this machine the warm-up and {fewest} repeats of each timing need more than the {budget:g} s "
            "budget)" if each > budget * 1.05 else "")
    return (f"About {models} models × {duration(each)}, with the perplexity ≈ **{duration(total)}**{over}: each "
            f"model's repeats stop once the spread is within {100 * TARGET_SPREAD:.0f} % of the median (at least "
            f"{fewest}, at most {MAX_REPEATS}) or its {budget:g} s are spent.")


def make_estimates(services: Services):
    def estimates(names: list | None, limit: float, prefill: float, decode: float, repeats: float,
                  budget: float = SpeedBudget.budget_s, request: gr.Request = None):
        """Time estimates for the zero-shot run and the measurement, from a probe timed on this machine now."""
        session = services.sessions.get(session_id(request))
        if not session.model_spec or not services.models.cached(session.model_spec):
            return "", ""
        per_token = services.seconds_per_token(session.model_spec)
        models = 1 + len([n for n in (names or []) if n in session.variants] or session.variants)
        zs = zeroshot_seconds(per_token, models, int(limit) * 2)
        each, total = services.bench_seconds(session.model_spec, models, int(prefill), int(decode), int(repeats),
                                             float(budget or 0), PERPLEXITY_WINDOWS * PERPLEXITY_LEN)
        return (f"About {duration(zs)} for {models} models × {int(limit)} items per task on this machine.",
                bench_estimate(each, total, models, int(repeats), float(budget or 0)))
    return estimates


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("Quantize & measure", id="evaluate") as tab:
        gr.Markdown(texts.EVALUATE, elem_classes="teach")
        with gr.Row():
            source = gr.Dropdown(["original"], value="original", allow_custom_value=True, label="Quantize this model",
                                 scale=2)
            method = gr.Dropdown(list(METHODS), value="torchao-int8", label="Method", scale=2,
                                 info="torch-dynamic-int8 is the deprecated legacy baseline (very lossy here)")
            quantize_button = gr.Button("Quantize", variant="primary", scale=1, elem_id="quantize-button")
        quantize_status = gr.Markdown("", elem_id="quantize-status")
        variants = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                               label="Variants to evaluate with the original (empty = all)")
        with gr.Accordion("Zero-shot accuracy (lm-eval, offline tasks from held-out articles)", open=True):
            with gr.Row(equal_height=True):
                tasks = gr.CheckboxGroup(list(SHIPPED_TASKS), value=list(SHIPPED_TASKS), label="Tasks", scale=2)
                limit = gr.Slider(10, 1000, value=100, step=10, label="Items per task", scale=2,
                                  info="10 items give about ±0.15 per accuracy; 100 about ±0.05")
                zeroshot_button = gr.Button("Run zero-shot", variant="primary", scale=1, elem_id="zeroshot-button")
                zeroshot_stop = gr.Button("Stop", variant="stop", scale=1, min_width=90)
            zeroshot_estimate = gr.Markdown("", elem_id="zeroshot-estimate")
            zeroshot_note = gr.Markdown("", elem_id="zeroshot-note")
            zeroshot_table = gr.Dataframe(label="acc / acc_norm ± standard error (lm-eval's names), n and chance",
                                          headers=["variant", *(f"{task} {column}" for task in SHIPPED_TASKS
                                                                for column in ("acc", "acc_norm", "n", "chance"))],
                                          interactive=False, elem_id="zeroshot-table")
        with gr.Accordion("Speed, memory and size (measured)", open=True):
            with gr.Row(equal_height=True):
                prefill = gr.Slider(16, 2048, value=512, step=16, label="Prefill tokens (1 × N)")
                decode = gr.Slider(4, 256, value=32, step=4, label="Decode tokens")
                repeats = gr.Slider(3, 10, value=5, step=1, label="Repeats (at least)",
                                    info=f"more follow, up to {MAX_REPEATS}, until the spread is known")
                budget = gr.Slider(label="Time budget per model (s)", elem_id="bench-budget",
                                   **SpeedBudget.ui("budget_s"))
                bench_button = gr.Button("Measure", variant="primary", elem_id="bench-button")
                bench_stop = gr.Button("Stop", variant="stop", min_width=90)
            bench_estimate = gr.Markdown("", elem_id="bench-estimate")
            bench_status = gr.Markdown("", elem_id="bench-note")
            bench_table = gr.Dataframe(label="Measured on this machine (speed-ups: median× (quartile interval))",
                                       headers=list(SPEED_COLUMNS.values()), interactive=False, elem_id="bench-table")
            speedup_plot = gr.Plot(label="Prefill and decode speed-ups", elem_id="speedup-plot")
            pareto_plot = gr.Plot(label="Size vs quality", elem_id="pareto-plot")
        build_panel(services, variants)  # llama.cpp: the variants as GGUF files, measured in llama.cpp itself
    tab.select(make_sources(services), None, [source, variants], api_name="evaluate_refresh")
    estimate_inputs = [variants, limit, prefill, decode, repeats, budget]
    tab.select(make_estimates(services), estimate_inputs, [zeroshot_estimate, bench_estimate],
               api_name="measure_estimates")  # public: benchmarks/dashboard.py records the estimate the tab shows
    for component in estimate_inputs:
        component.input(make_estimates(services), estimate_inputs, [zeroshot_estimate, bench_estimate],
                        api_visibility="private")
    quantize_event = quantize_button.click(make_quantize(services), [source, method],
                                           [quantize_status, source, variants], api_name="quantize",
                                           show_progress_on=quantize_status, **model_events())
    ctx.after(quantize_event)
    # one progress bar per job: Gradio draws one on every output unless told where (show_progress_on)
    zeroshot_event = zeroshot_button.click(make_zeroshot(services), [variants, tasks, limit],
                                           [zeroshot_table, zeroshot_note], api_name="zeroshot",
                                           show_progress_on=zeroshot_table, **model_events())
    stop_on_click(services, zeroshot_stop, zeroshot_note, [zeroshot_event], what="zero-shot run")
    measured: dict[str, tuple[int, int]] = {}  # session → (models measured, models asked for) of its last Measure
    bench_event = bench_button.click(make_bench(services, measured), [variants, prefill, decode, repeats, budget],
                                     [bench_table, speedup_plot, pareto_plot, bench_status], api_name="bench",
                                     show_progress_on=bench_table, **model_events())
    stop_on_click(services, bench_stop, bench_status, [bench_event], what="measurement", kept=bench_kept(measured))
