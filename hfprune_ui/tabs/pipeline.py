"""Pipeline tab: prune → quantize → distil in a chosen order (one run), or all six orders at the same settings
(the ablation), with the rows shown as they finish.

The engine (``core.pipeline``) runs in a worker thread through ``Services.pipeline`` /
``Services.pipeline_ablation``, which take the model lock themselves; the click handler is a generator
that only polls a queue of events and rows and redraws, so no lock is ever held across a ``yield``.
Stop sets the job's flag: the engine ends at its next check (a stage boundary, a training step, a batch
or a timing repeat) and writes nothing half-done; ablation rows already finished are stored as runs and
reused when the same ablation is started again.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable

import gradio as gr
import plotly.graph_objects as go

from core.data.text import CalibrationOptions
from core.errors import Stopped
from core.methods.pipeline import (
    ALL_ORDERS,
    MeasureOptions,
    PipelineOptions,
    Shared,
    describe_order,
    row_label,
)
from core.paths import cache_dir
from core.quantize.fake import (
    FORMATS,
)
from core.train.loop import TrainOptions

from .. import figures
from ..context import Ctx, model_events, stop_on_click
from ..guard import session_id, user_errors
from ..progress import stream_worker
from ..services import Services

TEACHING = (
    "Pruning removes neurons but the pruned matmuls still run in fp32; INT8 is what makes a CPU fast, and it "
    "costs accuracy. Distillation pays both back — and the order matters: distilling *after* quantizing trains "
    "the student in its final number format (fake-quantised weights and activations, straight-through "
    "gradients), so nothing it learns is rounded away afterwards. The ablation runs all six orders with the "
    "same data, widths, format and training budget and measures each exported model on this machine."
)
ORDER_CHOICES = [(describe_order(o), o) for o in ALL_ORDERS]
COLUMNS = ["order", "format", "disk MB", "prefill ms", "prefill ×", "decode tok/s", "decode ×", "FLOP ideal",
           "peak MB", "perplexity", "KL to dense", "cloze acc", "nextsent acc"]
REDRAW_S = 1.0
# Fixed settings of a dashboard run (the CLI exposes them all): MeasureOptions / CalibrationOptions fields.
MEASURE: dict = {}
CALIBRATION: dict = {}


def table_rows(rows: list[dict]) -> list[list]:
    """The measured rows as table cells (speed-ups against the dense row)."""
    def num(value, digits):
        return None if value is None else round(float(value), digits)

    def base(r: dict) -> float | None:  # the dense row is the baseline: 1.00×
        return 1.0 if not r.get("order") else None

    out = []
    for r in rows:
        out.append([row_label(r.get("order") or ""), r.get("format"),
                    num((r.get("disk_bytes") or 0) / 1e6, 0) if r.get("disk_bytes") else None,
                    num(r.get("prefill_ms"), 0), num(r.get("prefill_speedup") or base(r), 2),
                    num(r.get("decode_tokens_per_s"), 1), num(r.get("decode_speedup") or base(r), 2),
                    num(r.get("ideal_speedup"), 2), num((r.get("peak_memory_bytes") or 0) / 1e6, 0),
                    num(r.get("perplexity"), 2), num(r.get("kl_to_dense"), 4), num(r.get("wiki_cloze_acc"), 2),
                    num(r.get("wiki_nextsent_acc"), 2)])
    return out


def rows_figure(rows: list[dict]) -> go.Figure:
    """KL to dense (bars, left axis) and measured prefill / decode speed-ups (markers, right axis) per row."""
    if not rows:
        return figures.empty("Run the pipeline or the ablation to see its rows here.")
    labels = [r.get("order") or "dense" for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=labels, y=[r.get("kl_to_dense") or 0.0 for r in rows], name="KL to dense (nats/token)",
                         marker_color=figures.color(0)))
    for index, (key, name) in enumerate((("prefill_speedup", "prefill speed-up"),
                                         ("decode_speedup", "decode speed-up"))):
        fig.add_trace(go.Scatter(x=labels, y=[r.get(key) or 1.0 for r in rows], name=name, mode="markers",
                                 marker={"size": 12, "color": figures.color(index + 1)}, yaxis="y2"))
    fig.update_layout(yaxis={"title": "KL to the dense model"},
                      yaxis2={"title": "measured speed-up vs dense fp32", "overlaying": "y", "side": "right"})
    return figures._finish(fig, title={"text": "Orders: fidelity and measured CPU speed", "x": 0})


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def baseline_of(row: dict) -> str:
    """What a finished run's speed-ups are over: the dense model in torch, or its F16 file in llama.cpp."""
    return "the dense F16 file in llama.cpp" if row.get("engine") == "llama.cpp" else "dense fp32"


def make_start(services: Services, ablation: bool):
    @user_errors
    def start(model_spec: str, order: str, ratio: float, criterion: str, allocation: str, quant: str, params: str,
              minutes: float, steps: float, lr: float, zeroshot_limit: float, request: gr.Request = None):
        """Run the pipeline (or the ablation) in a worker thread; yields (status, table, plot)."""
        session = services.sessions.get(session_id(request))
        steps, minutes = int(steps or 0), float(minutes or 0)
        options = PipelineOptions(order=order, ratio=float(ratio), criterion=criterion, allocation=allocation,
                                  quant=quant, params=params)  # a bad value is one sentence before any work
        train_options = TrainOptions(steps=steps, minutes=0.0 if steps else minutes, lr=float(lr),
                                     warmup_steps=TrainOptions.warmup_for(steps), eval_every=10)
        measure = MeasureOptions(**{**MEASURE, "zeroshot_limit": int(zeroshot_limit)})
        calibration = CalibrationOptions(**CALIBRATION)
        job = session.new_job()
        shared = Shared()  # a single run measures the dense model too: its row is shown first
        root = cache_dir() / "pipelines"
        root.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        state = "Starting"

        def work(emit: Callable[[tuple[str, dict]], None]):
            if ablation:
                return services.pipeline_ablation(
                    model_spec, options, out_root=root / f"ablation-{_safe(model_spec)}", calibration=calibration,
                    train_options=train_options, measure=measure, stop=job.is_set,
                    on_event=lambda e: emit(("event", e)), on_row=lambda r: emit(("row", r)))
            out = root / f"{_safe(model_spec)}-{options.order}-{time.strftime('%Y%m%d-%H%M%S')}"
            result = services.pipeline(model_spec, options, out=out, shared=shared, calibration=calibration,
                                       train_options=train_options, measure=measure, stop=job.is_set,
                                       on_event=lambda e: emit(("event", e)))
            emit(("row", shared.dense_row))
            emit(("row", result.row))
            return result

        def draw(new: list[tuple[str, dict]], finished: bool) -> tuple:
            nonlocal state
            for kind, payload in new:
                if kind == "row":
                    rows.append(payload)
                elif payload.get("state") in ("start", "resumed"):
                    state = f"{payload.get('order') or 'dense'}: {payload.get('stage')} {payload.get('state')}"
            prefix = "Stopping" if job.is_set() else ("Running" if not finished else "Finished")
            return f"**{prefix}** — {state} · {len(rows)} row(s) done", table_rows(rows), rows_figure(rows)

        try:
            result = yield from stream_worker(work, draw, job, REDRAW_S, name="hfprune-pipeline")
        except Stopped:
            yield (f"**Stopped**: {len(rows)} finished row(s) are shown{' and stored as runs' if ablation else ''}; "
                   "nothing half-done was written.", table_rows(rows), rows_figure(rows))
            return
        if not ablation:
            row = result.row
            nan = float("nan")
            yield (f"**Done**: {describe_order(options.order)} → {result.record['format']}, KL to dense "
                   f"{row.get('kl_to_dense', nan):.4f}, prefill {row.get('prefill_speedup') or nan:.2f}× / decode "
                   f"{row.get('decode_speedup') or nan:.2f}× vs {baseline_of(row)}. Exported to `{result.out}`.",
                   table_rows(rows), rows_figure(rows))
            return
        resumed = sum(1 for r in result.rows if r.get("resumed"))
        yield (f"**Ablation done**: {len(result.rows)} rows ({resumed} reused from stored runs, settings "
               f"`{result.settings_key}`).", table_rows(result.rows), rows_figure(result.rows))
    return start


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("Pipeline", id="pipeline"):
        gr.Markdown(TEACHING, elem_classes="teach")
        with gr.Row():
            order = gr.Dropdown(ORDER_CHOICES, value="pqd", label="Order", elem_id="pipeline-order")
            quant = gr.Dropdown(list(FORMATS), value="int8-dynamic", label="Final number format",
                                info="; ".join(f"{f.name}: {f.description}" for f in FORMATS.values()))
            ratio = gr.Slider(label="Share of MLP neurons removed", **PipelineOptions.ui("ratio"))
        with gr.Row():
            criterion = gr.Dropdown(label="Criterion", **PipelineOptions.ui("criterion"))
            allocation = gr.Dropdown(label="Allocation", **PipelineOptions.ui("allocation"))
            params = gr.Radio(["full", "mlp"], value="full", label="What trains in the distil stage")
        with gr.Row():
            minutes = gr.Slider(0.25, 30, value=1, step=0.25, label="Distil budget: minutes (per order)")
            steps = gr.Number(0, precision=0, minimum=0, label="…or steps (0 = use the minutes)")
            lr = gr.Number(TrainOptions.ui("lr")["value"], minimum=1e-7, label="Peak learning rate")
            zeroshot = gr.Slider(0, 200, value=40, step=10, label="Zero-shot items per task (0 = skip)")
        with gr.Row():
            run_button = gr.Button("Run pipeline", variant="primary", elem_id="pipeline-run")
            ablation_button = gr.Button("Run six-order ablation", elem_id="pipeline-ablation")
            stop_button = gr.Button("Stop", variant="stop", elem_id="pipeline-stop")
        status = gr.Markdown("", elem_id="pipeline-status")
        table = gr.Dataframe(headers=COLUMNS, label="Measured rows (speed-ups against the dense fp32 model)",
                             interactive=False, elem_id="pipeline-table")
        plot = gr.Plot(label="Fidelity and speed per order", elem_id="pipeline-plot")
    inputs = [ctx["model"], order, ratio, criterion, allocation, quant, params, minutes, steps, lr, zeroshot]
    one = run_button.click(make_start(services, False), inputs, [status, table, plot], api_name="pipeline",
                           show_progress_on=status, **model_events())
    many = ablation_button.click(make_start(services, True), inputs, [status, table, plot],
                                 api_name="pipeline_ablation", show_progress_on=status, **model_events())
    stop_on_click(services, stop_button, status, [one, many], api_name="pipeline_stop", what="pipeline")
    ctx.after(one)
    ctx.after(many)
