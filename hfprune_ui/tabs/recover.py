"""Recover tab: distil a pruned variant back toward the original, with live training curves.

Training runs in a worker thread that takes the model lock itself (inside
``Services.recover``); the click handler is a generator that only polls a queue of step records and
redraws, so no lock is ever held across a ``yield``. Stop sets the job's flag; the status line says
when the worker has really ended (the engine then restores the variant's pre-run weights and stores
nothing).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import gradio as gr
import plotly.graph_objects as go

from core.errors import HFPruneError, Stopped
from core.methods.recover import TRAIN_DEFAULTS
from core.train.loop import TrainOptions
from core.train.teacher_cache import TeacherOptions

from .. import figures
from ..context import Ctx, model_events
from ..guard import session_id, user_errors
from ..progress import stream_worker
from ..services import Services
from ..status import number

TEACHING = (
    "A pruned model has lost neurons, not knowledge of what the original would say: the original still "
    "predicts a full probability for every next token, and those soft targets carry far more signal per "
    "token than the one word that actually came next, so the smaller network can be nudged to reproduce "
    "them with little text. "
    "Matching the whole distribution (KL to the original) rather than the text alone also pulls the pruned "
    "model back toward the original's behaviour — its hedges, its runner-up words — instead of toward a new "
    "model of the training text."
)
TEACHER_CHOICES = [("live: the original runs on every batch", "live"),
                   ("cached once: top-k + sampled tail of its logits, each step runs only the student", "cached")]
PARAM_CHOICES = [("MLP projections only (fast, the pruned part)", "mlp"),
                 ("LoRA adapters, merged at the end", "lora"),
                 ("every parameter (full)", "full")]
REDRAW_S = 1.0


def curves(points: list[dict]) -> go.Figure:
    """Training loss per step and held-out KL at evaluation steps, against tokens seen."""
    if not points:
        return figures.empty("Start a recovery run to see its curves here.")
    fig = go.Figure()
    trained = [p for p in points if p["loss"] is not None]
    fig.add_trace(go.Scatter(x=[p["tokens"] for p in trained], y=[p["loss"] for p in trained], mode="lines",
                             name="training loss (KD)", line={"color": figures.color(0), "width": 1.5}))
    held = [p for p in points if p["heldout"] is not None]
    fig.add_trace(go.Scatter(x=[p["tokens"] for p in held], y=[p["heldout"] for p in held], mode="lines+markers",
                             name="held-out KL to the original", line={"color": figures.color(1), "width": 2.5}))
    fig.update_layout(xaxis_title="training tokens seen", yaxis_title="nats per token")
    return figures._finish(fig, title={"text": "Recovery: KD loss and held-out KL", "x": 0})


def status_text(points: list[dict], minutes: float, steps: int, state: str) -> str:
    if not points:
        return f"{state}: preparing the training text, the held-out slice and (when cached) the teacher's logits…"
    last = points[-1]
    held = [p["heldout"] for p in points if p["heldout"] is not None]
    budget = f" of {minutes:g} min" if minutes else (f" of {steps} steps" if steps else "")
    parts = [f"**{state}** — step {last['step']}{' of ' + str(steps) if steps and not minutes else ''}",
             f"{last['tokens']:,} tokens", f"{last['elapsed'] / 60:.1f} min{budget}"]
    if last["loss"] is not None:
        parts.append(f"training loss {last['loss']:.4f}")
    if held:
        parts.append(f"held-out KL {held[-1]:.4f} (start {held[0]:.4f})")
    return " · ".join(parts)


def make_start(services: Services):
    @user_errors
    def start(source: str, params: str, minutes: float, steps: float, lr: float, name: str, tau: float, alpha: float,
              lora_rank: float, batch_size: float, seq_len: float, eval_every: float,
              teacher_logits: str = TeacherOptions.logits, request: gr.Request = None):
        """Run Services.recover in a worker thread and stream its curves; yields (status, plot, variants)."""
        session = services.sessions.get(session_id(request))
        if not source:
            raise HFPruneError("Pick a pruned variant to recover (prune one on the Prune tab first).")
        services.recover_name(session, source, params, name)  # a clear error before any thread starts
        job = session.new_job()
        minutes, steps = float(minutes or 0), int(steps or 0)
        points: list[dict] = []
        no_change = gr.update()

        def work(emit: Callable[[dict], None]) -> tuple:
            return services.recover(
                session, source, params=params, minutes=0.0 if steps else minutes, steps=steps, lr=float(lr),
                name=name, lora_rank=int(lora_rank), tau=float(tau), alpha=float(alpha),
                batch_size=int(batch_size), seq_len=int(seq_len), eval_every=int(eval_every), stop=job.is_set,
                on_step=lambda record: emit(asdict(record)), teacher_logits=teacher_logits)

        def draw(new: list[dict], finished: bool) -> tuple:
            points.extend(new)
            state = "Stopping" if job.is_set() else "Training"
            return status_text(points, 0.0 if steps else minutes, steps, state), curves(points), no_change

        try:
            variant, evicted = yield from stream_worker(work, draw, job, REDRAW_S, name="hfprune-recover")
        except Stopped:
            message = (f"**Stopped** after step {points[-1]['step'] if points else 0}: the variant '{source}' is "
                       "unchanged and nothing was stored.")
            yield message, curves(points), no_change
            return
        recovery = variant.meta.get("recovery", {})
        note = f" '{evicted}' was dropped from memory to make room (its run stays on disk)." if evicted else ""
        before = recovery.get("heldout_kl_before") or float("nan")
        after = recovery.get("heldout_kl_after") or float("nan")
        message = (f"**Recovered** into variant **{variant.name}** (run `{variant.run_id}`): "
                   f"{recovery.get('tokens_seen', 0):,} tokens in {recovery.get('seconds', 0):.0f} s "
                   f"({recovery.get('tokens_per_second', 0):.0f} tokens/s, {teacher_words(recovery)}), held-out KL "
                   f"{number(before, [after])} → {number(after, [before])} (best at step "
                   f"{recovery.get('best_step')}). Compare it on the Compare and Quantize & measure tabs.{note}")
        yield message, curves(points), gr.update(choices=list(session.variants), value=variant.name)
    return start


def teacher_words(recovery: dict) -> str:
    """'live teacher', or 'cached teacher, built in N s' / '…, read from the disk cache' for the status line."""
    cache = recovery.get("teacher_logits") or {}
    if cache.get("logits") != "cached":
        return "live teacher"
    how = "read from the disk cache" if cache.get("cache_reused") else f"built in {cache.get('cache_seconds', 0):.0f} s"
    return f"cached teacher, {how}"


def make_stop(services: Services):
    def stop(request: gr.Request = None) -> str:
        """Set the running job's flag; the training ends at its next step and the status line says so."""
        services.sessions.get(session_id(request)).stop.set()
        return "Stopping after the current step… (the status above says when it has stopped)"
    return stop


def make_variants(services: Services):
    def variants(current: str | None, request: gr.Request = None):
        names = list(services.sessions.get(session_id(request)).variants)
        return gr.update(choices=names, value=current if current in names else (names[-1] if names else None))
    return variants


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("Recover", id="recover") as tab:
        gr.Markdown(TEACHING, elem_classes="teach")
        with gr.Row():
            source = gr.Dropdown([], value=None, label="Pruned variant to recover", allow_custom_value=True,
                                 elem_id="recover-variant")
            params = gr.Radio(PARAM_CHOICES, value="mlp", label="What trains")
            teacher_logits = gr.Radio(TEACHER_CHOICES, label="Teacher's logits", elem_id="recover-teacher",
                                      **{k: v for k, v in TeacherOptions.ui("logits").items() if k != "choices"})
        with gr.Row():
            minutes = gr.Slider(0.25, 30, value=2, step=0.25, label="Budget: minutes", elem_id="recover-minutes")
            steps = gr.Number(0, precision=0, minimum=0, label="…or steps (0 = use the minutes)")
            lr = gr.Number(TrainOptions.ui("lr", TRAIN_DEFAULTS)["value"], minimum=1e-7, label="Peak learning rate")
            name = gr.Textbox("", label="Name of the recovered variant", placeholder="default: <variant>+kd-<params>")
        with gr.Accordion("Loss and batch", open=False):
            with gr.Row():
                tau = gr.Slider(0.5, 4, value=1.0, step=0.25, label="Temperature τ")
                alpha = gr.Slider(0, 1, value=1.0, step=0.05,
                                  label="α: weight of KL to the original (1 − α: next-token CE)")
                lora_rank = gr.Slider(1, 64, value=16, step=1, label="LoRA rank")
            with gr.Row():
                batch_size = gr.Slider(1, 16, value=4, step=1, label="Windows per step")
                seq_len = gr.Slider(32, 512, value=128, step=32, label="Tokens per window")
                eval_every = gr.Slider(1, 100, value=TRAIN_DEFAULTS["eval_every"], step=1,
                                       label="Held-out KL every N steps")
        with gr.Row():
            start_button = gr.Button("Start", variant="primary", elem_id="recover-start")
            stop_button = gr.Button("Stop", variant="stop", elem_id="recover-stop")
        status = gr.Markdown("", elem_id="recover-status")
        plot = gr.Plot(label="Training curves", elem_id="recover-plot")
    tab.select(make_variants(services), source, source, api_visibility="private")
    start_event = start_button.click(make_start(services), [source, params, minutes, steps, lr, name, tau, alpha,
                                                            lora_rank, batch_size, seq_len, eval_every,
                                                            teacher_logits],
                                     [status, plot, source], api_name="recover", show_progress_on=status,
                                     **model_events())
    ctx.after(start_event)  # the status line counts the new variant (and shows what made room)
    stop_button.click(make_stop(services), None, status, queue=False, api_name="recover_stop")
