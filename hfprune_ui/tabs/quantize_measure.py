"""Tab 6 — Evaluate (quantize and measure): quantize variants, zero-shot accuracy (lm-eval), measured speed / memory / size."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.quantize import METHODS
from core.zeroshot_tasks import SHIPPED_TASKS

from .. import figures, texts
from ..context import Ctx, model_events
from ..guard import session_id, user_errors
from ..services import Services
from .side_by_side import chosen_variants

SPEED_COLUMNS = {"variant": "variant", "device": "device", "method": "weights", "params": "params",
                 "weight_bytes": "weight MB", "disk_bytes": "disk MB", "peak_memory_bytes": "peak memory MB",
                 "prefill_ms": "prefill ms (1×N)", "decode_tokens_per_s": "decode tok/s",
                 "ideal_speedup": "ideal speed-up (FLOPs)", "measured_speedup": "measured speed-up"}
MB_COLUMNS = ("weight_bytes", "disk_bytes", "peak_memory_bytes")


def make_sources(services: Services):
    def sources(request: gr.Request = None):
        """Offer 'original' and this session's variants as quantization sources and measured variants."""
        names = list(services.sessions.get(session_id(request)).variants)
        return gr.update(choices=["original", *names], value="original"), gr.update(choices=names, value=names)
    return sources


def make_quantize(services: Services):
    @user_errors
    def quantize(source: str, method: str, request: gr.Request = None, progress=gr.Progress()):
        session = services.sessions.get(session_id(request))
        progress(0.2, desc=f"quantizing {source} with {method}")
        variant, evicted = services.quantize(session, source or "original", method)
        note = f" The oldest variant '{evicted}' was dropped from memory." if evicted else ""
        names = list(session.variants)
        return (f"Made **{variant.name}**; it is now in the Compare tab and in the lists below.{note}",
                gr.update(choices=["original", *names]), gr.update(choices=names, value=names))
    return quantize


def make_zeroshot(services: Services):
    @user_errors
    def zeroshot(names: list | None, tasks: list | None, limit: float, request: gr.Request = None,
                 progress=gr.Progress(track_tqdm=True)):
        session = services.sessions.get(session_id(request))
        rows = services.zeroshot(session, chosen_variants(session, names), list(tasks or []), int(limit))
        return pd.DataFrame(rows).round(4)
    return zeroshot


def make_bench(services: Services):
    @user_errors
    def bench(names: list | None, prefill: float, decode: float, repeats: float, request: gr.Request = None,
              progress=gr.Progress(track_tqdm=True)):
        """Speed/memory table, then perplexity on 4 × 64 held-out tokens for the size-vs-quality plot."""
        session = services.sessions.get(session_id(request))
        picked = chosen_variants(session, names)
        progress(0.1, desc="timing prefill and decode")
        rows = services.bench(session, picked, int(prefill), int(decode), int(repeats))
        progress(0.8, desc="perplexity for the Pareto plot")
        quality = {r["variant"]: r["perplexity"] for r in services.evaluate_variants(session, picked, 4, 64)}
        frame = pd.DataFrame(rows)[list(SPEED_COLUMNS)]
        for column in MB_COLUMNS:
            frame[column] = frame[column].map(lambda b: None if b is None else round(b / 1e6, 1))
        frame = frame.rename(columns=SPEED_COLUMNS).round(3)
        plot = figures.pareto([r["variant"] for r in rows], [r["weight_bytes"] / 1e6 for r in rows],
                              [quality[r["variant"]] for r in rows], "perplexity (4 × 64 held-out tokens)")
        return frame, plot
    return bench


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("Evaluate", id="evaluate") as tab:
        gr.Markdown(texts.EVALUATE, elem_classes="teach")
        with gr.Row():
            source = gr.Dropdown(["original"], value="original", allow_custom_value=True, label="Quantize this model", scale=2)
            method = gr.Dropdown(list(METHODS), value="torchao-int8", label="Method", scale=2,
                                 info="torch-dynamic-int8 is the deprecated legacy baseline (very lossy here)")
            quantize_button = gr.Button("Quantize", variant="primary", scale=1, elem_id="quantize-button")
        quantize_status = gr.Markdown("", elem_id="quantize-status")
        variants = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                               label="Variants to evaluate with the original (empty = all)")
        with gr.Accordion("Zero-shot accuracy (lm-eval, offline tasks from held-out articles)", open=True):
            with gr.Row():
                tasks = gr.CheckboxGroup(list(SHIPPED_TASKS), value=list(SHIPPED_TASKS), label="Tasks")
                limit = gr.Slider(10, 1000, value=100, step=10, label="Items per task")
                zeroshot_button = gr.Button("Run zero-shot", variant="primary")
            zeroshot_table = gr.Dataframe(label="acc / acc_norm (lm-eval's names)", interactive=False)
        with gr.Accordion("Speed, memory and size (measured)", open=True):
            with gr.Row():
                prefill = gr.Slider(16, 2048, value=512, step=16, label="Prefill tokens (1 × N)")
                decode = gr.Slider(4, 256, value=32, step=4, label="Decode tokens")
                repeats = gr.Slider(1, 10, value=3, step=1, label="Repeats (median)")
                bench_button = gr.Button("Measure", variant="primary")
            bench_table = gr.Dataframe(label="Measured on this machine", interactive=False)
            pareto_plot = gr.Plot(label="Size vs quality", elem_id="pareto-plot")
    tab.select(make_sources(services), None, [source, variants], api_name="evaluate_refresh")
    quantize_button.click(make_quantize(services), [source, method], [quantize_status, source, variants],
                          api_name="quantize", **model_events())
    zeroshot_button.click(make_zeroshot(services), [variants, tasks, limit], zeroshot_table, api_name="zeroshot",
                          **model_events())
    bench_button.click(make_bench(services), [variants, prefill, decode, repeats], [bench_table, pareto_plot],
                       api_name="bench", **model_events())
