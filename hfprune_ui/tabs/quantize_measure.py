"""Tab 6 — Quantize & measure: quantize variants, zero-shot accuracy (lm-eval), measured speed / memory / size."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.measure.speed import SpeedUp
from core.measure.timing import speed_seconds, zeroshot_seconds
from core.measure.zeroshot import resolvable_difference, separates
from core.measure.zeroshot_tasks import SHIPPED_TASKS
from core.quantize.backends import METHODS

from .. import figures, texts
from ..context import PLAIN, TRACK, Ctx, model_events, stop_on_click
from ..guard import session_id, user_errors
from ..progress import JobProgress, duration
from ..services import Services
from ..status import count
from .side_by_side import chosen_variants

SPEED_COLUMNS = {"variant": "variant", "device": "device", "method": "weights", "params": "params",
                 "weight_bytes": "weight MB", "disk_bytes": "disk MB", "peak_memory_bytes": "peak memory MB",
                 "prefill_ms": "prefill ms (1×N, median)", "decode_tokens_per_s": "decode tok/s (median)",
                 "repeats": "repeats", "ideal_speedup": "FLOP ideal", "prefill_speedup": "prefill speed-up",
                 "decode_speedup": "decode speed-up", "speedup_note": "note"}
MB_COLUMNS = ("weight_bytes", "disk_bytes", "peak_memory_bytes")
MAX_REPEATS = 15  # repeats go on (up to this) until the spread of the timings is known


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


def speed_frame(rows: list[dict]) -> pd.DataFrame:
    """The measured table: medians, repeats, FLOP ideal, both speed-ups as 'median× (q1–q3)', a verdict."""
    out = []
    for row in rows:
        cells = {key: row.get(key) for key in SPEED_COLUMNS if key not in ("prefill_speedup", "decode_speedup",
                                                                         "speedup_note")}
        for column in MB_COLUMNS:
            cells[column] = None if cells[column] is None else round(cells[column] / 1e6, 1)
        cells["params"] = count(cells["params"])
        cells["ideal_speedup"] = f"{cells['ideal_speedup']:.2f}×" if cells.get("ideal_speedup") else "—"
        notes = []
        for phase in ("prefill", "decode"):
            value = row.get(f"{phase}_speedup")
            cells[f"{phase}_speedup"] = "baseline" if value is None else SpeedUp(
                value["median"], value["low"], value["high"], value["ideal"]).text()
            if value and value["verdict"]:
                notes.append(f"{phase}: {value['verdict']}")
        cells["speedup_note"] = "; ".join(notes)
        out.append(cells)
    return pd.DataFrame(out)[list(SPEED_COLUMNS)].rename(columns=SPEED_COLUMNS).round(3)


def make_bench(services: Services):
    @user_errors
    def bench(names: list | None, prefill: float, decode: float, repeats: float, request: gr.Request = None,
              progress=TRACK):
        """Speed/memory table with prefill and decode speed-ups side by side, then perplexity on 4 × 64
        held-out tokens for the size-vs-quality plot."""
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        picked = chosen_variants(session, names)
        tracker = JobProgress(progress, "Measure", stages=2 + len(picked))
        rows = services.bench(session, picked, int(prefill), int(decode), int(repeats), max_repeats=MAX_REPEATS,
                              stop=job.is_set, on_model=lambda k, n, name: tracker.stage(k, name),
                              on_repeat=lambda phase, done, most: tracker.step(f"{phase} repeat", done, most))
        tracker.stage(1 + len(picked), "perplexity for the size-vs-quality plot")
        quality = {r["variant"]: r["perplexity"] for r in services.evaluate_variants(session, picked, 4, 64)}
        plot = figures.pareto([r["variant"] for r in rows], [r["weight_bytes"] / 1e6 for r in rows],
                              [quality[r["variant"]] for r in rows], "perplexity (4 × 64 held-out tokens)")
        bars = figures.speedups([r["variant"] for r in rows[1:]], [r["prefill_speedup"] for r in rows[1:]],
                                [r["decode_speedup"] for r in rows[1:]], [r["ideal_speedup"] for r in rows[1:]])
        return speed_frame(rows), bars, plot
    return bench


def make_estimates(services: Services):
    def estimates(names: list | None, limit: float, prefill: float, decode: float, repeats: float,
                  request: gr.Request = None):
        """Time estimates for the zero-shot run and the measurement, on this machine."""
        session = services.sessions.get(session_id(request))
        if not session.model_spec or not services.models.cached(session.model_spec):
            return "", ""
        per_token = services.seconds_per_token(session.model_spec)
        models = 1 + len([n for n in (names or []) if n in session.variants] or session.variants)
        zs = zeroshot_seconds(per_token, models, int(limit) * 2)
        speed = speed_seconds(per_token, models, int(prefill), int(decode), int(repeats))
        return (f"About {duration(zs)} for {models} models × {int(limit)} items per task on this machine.",
                (f"About {duration(speed)} for {models} models with {int(repeats)} repeats (more, up to "
                f"{MAX_REPEATS}, while the spread is still wide)."))
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
                                          interactive=False, elem_id="zeroshot-table")
        with gr.Accordion("Speed, memory and size (measured)", open=True):
            with gr.Row(equal_height=True):
                prefill = gr.Slider(16, 2048, value=512, step=16, label="Prefill tokens (1 × N)")
                decode = gr.Slider(4, 256, value=32, step=4, label="Decode tokens")
                repeats = gr.Slider(3, 10, value=5, step=1, label="Repeats (at least)",
                                    info=f"more follow, up to {MAX_REPEATS}, until the spread is known")
                bench_button = gr.Button("Measure", variant="primary", elem_id="bench-button")
                bench_stop = gr.Button("Stop", variant="stop", min_width=90)
            bench_estimate = gr.Markdown("", elem_id="bench-estimate")
            bench_table = gr.Dataframe(label="Measured on this machine (speed-ups: median× (quartile interval))",
                                       interactive=False, elem_id="bench-table")
            speedup_plot = gr.Plot(label="Prefill and decode speed-ups", elem_id="speedup-plot")
            pareto_plot = gr.Plot(label="Size vs quality", elem_id="pareto-plot")
    tab.select(make_sources(services), None, [source, variants], api_name="evaluate_refresh")
    estimate_inputs = [variants, limit, prefill, decode, repeats]
    tab.select(make_estimates(services), estimate_inputs, [zeroshot_estimate, bench_estimate],
               api_visibility="private")
    for component in estimate_inputs:
        component.input(make_estimates(services), estimate_inputs, [zeroshot_estimate, bench_estimate],
                        api_visibility="private")
    quantize_event = quantize_button.click(make_quantize(services), [source, method],
                                           [quantize_status, source, variants], api_name="quantize", **model_events())
    ctx.after(quantize_event)
    zeroshot_event = zeroshot_button.click(make_zeroshot(services), [variants, tasks, limit],
                                           [zeroshot_table, zeroshot_note], api_name="zeroshot", **model_events())
    stop_on_click(services, zeroshot_stop, zeroshot_note, [zeroshot_event], what="zero-shot run")
    bench_event = bench_button.click(make_bench(services), [variants, prefill, decode, repeats],
                                     [bench_table, speedup_plot, pareto_plot], api_name="bench", **model_events())
    stop_on_click(services, bench_stop, bench_estimate, [bench_event], what="measurement")
