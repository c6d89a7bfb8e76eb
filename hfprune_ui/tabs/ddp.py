"""DDP tab: learn which neurons / heads to remove with gates trained against the original (core.ddp),
with live curves of expected sparsity vs target, the Lagrange multipliers and the gate histogram.

Training runs in a worker thread that takes the model lock itself (inside ``Services.ddp``);
the click handler is a generator that only polls a queue of step points and redraws, so no lock is
ever held across a ``yield``. Stop sets the job's flag; nothing is stored and the model is unchanged.
"""
from __future__ import annotations

from collections.abc import Callable

import gradio as gr
import plotly.graph_objects as go

from core.errors import Stopped
from core.methods.gates import HIST_EDGES, DDPOptions

from .. import figures
from ..context import Ctx, model_events
from ..guard import session_id, user_errors
from ..progress import stream_worker
from ..services import Services
from ..status import number

TEACHING = (
    "One-shot pruning scores every neuron once and cuts; methods that *learn* the cut usually sample random "
    "on/off masks while training, so the network they practise with is never the one they ship. DDP gives every "
    "MLP neuron (and, if you like, every attention head) a **dimmer** instead: a number that scales the unit's "
    "output, trained against the original model's predictions while the weights stay frozen. A price on "
    "brightness (the Lagrange multipliers λ, which grow for as long as the model is less sparse than asked) pushes "
    "the dimmers down, and the soft counter that measures sparsity gets sharper as training goes, so each dimmer "
    "ends up clearly on or clearly off. At the end exactly the requested number stay lit — across all layers at "
    "once, so the width of each layer is learned, not set — and each surviving dimmer's value is baked into its "
    "weights. There is no randomness anywhere: what was trained is exactly what you download.")
UNIT_CHOICES = [("MLP neurons", "mlp"), ("attention heads", "heads"), ("both", "both")]
REDRAW_S = 1.0
_TYPE_NAMES = {"mlp": "MLP neurons", "heads": "attention heads"}


def sparsity_figure(points: list[dict]) -> go.Figure:
    """Expected sparsity ŝ per unit type against its target, the share of gates above 0, and the held-out
    KL of the hardened model (right axis), per step."""
    trained = [p for p in points if "m" in p]
    if not trained:
        return figures.empty("Start a DDP run to see expected sparsity climb to its target here.")
    fig = go.Figure()
    steps = [p["step"] for p in trained]
    for i, kind in enumerate(k for k in ("mlp", "heads") if k in trained[-1]):
        name = _TYPE_NAMES[kind]
        fig.add_trace(go.Scatter(x=steps, y=[p[kind]["expected_sparsity"] for p in trained], mode="lines",
                                 name=f"expected sparsity ŝ ({name})", line={"color": figures.color(i), "width": 2.5}))
        fig.add_trace(go.Scatter(x=steps, y=[1 - p[kind]["open"] for p in trained], mode="lines",
                                 name=f"share of gates at 0 ({name})",
                                 line={"color": figures.color(i), "width": 1, "dash": "dot"}))
        target = trained[-1][kind]["target"]
        fig.add_trace(go.Scatter(x=[0, steps[-1]], y=[target, target], mode="lines", name=f"target ({name})",
                                 line={"color": figures.color(i), "width": 1, "dash": "dash"}))
    held = [p for p in points if p.get("heldout") is not None]
    if held:
        fig.add_trace(go.Scatter(x=[p["step"] for p in held], y=[p["heldout"] for p in held], mode="lines+markers",
                                 name="held-out KL of the hardened model", yaxis="y2",
                                 line={"color": figures.color(3), "width": 1.5}))
    fig.update_layout(xaxis_title="step", yaxis={"title": "share of units", "range": [0, 1]},
                      yaxis2={"title": "KL (nats / token)", "overlaying": "y", "side": "right", "rangemode": "tozero"})
    return figures._finish(fig, title={"text": "Expected sparsity vs target", "x": 0})


def lambda_figure(points: list[dict]) -> go.Figure:
    """λ1 (linear price), λ2 (quadratic) and λ3 (binarisation) per unit type, per step."""
    trained = [p for p in points if "m" in p]
    if not trained:
        return figures.empty("The Lagrange multipliers appear here while DDP trains.")
    fig = go.Figure()
    steps = [p["step"] for p in trained]
    dashes = ("solid", "dash", "dot")
    for i, kind in enumerate(k for k in ("mlp", "heads") if k in trained[-1]):
        for j, label in enumerate(("λ1 · (ŝ − t)", "λ2 · (ŝ − t)²", "λ3 · s(1 − s)")):
            fig.add_trace(go.Scatter(x=steps, y=[p[kind]["lambdas"][j] for p in trained], mode="lines",
                                     name=f"{label} ({_TYPE_NAMES[kind]})",
                                     line={"color": figures.color(i), "dash": dashes[j]}))
    fig.update_layout(xaxis_title="step", yaxis_title="multiplier value")
    return figures._finish(fig, title={"text": "Lagrange multipliers (trained by gradient ascent)", "x": 0})


def histogram_figure(snapshot: dict | None) -> go.Figure:
    """Gate values relu(z) per unit type at one recorded step (the last bin holds everything ≥ 1.5)."""
    if not snapshot:
        return figures.empty("The gate-value histogram appears here while DDP trains.")
    centres = ((HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2).tolist()
    fig = go.Figure()
    for i, kind in enumerate(k for k in ("mlp", "heads") if k in snapshot):
        total = max(1, sum(snapshot[kind]))
        fig.add_trace(go.Bar(x=centres, y=[c / total for c in snapshot[kind]], name=_TYPE_NAMES[kind],
                             marker_color=figures.color(i), opacity=0.75))
    fig.update_layout(barmode="overlay", xaxis_title="gate value relu(z)", yaxis_title="share of units", bargap=0.05)
    return figures._finish(fig, title={"text": f"Gate values at step {snapshot['step']}", "x": 0})


def widths_figure(full: list[int], ddp_widths: list[int], entropy_widths: list[int] | None) -> go.Figure:
    """Per-layer MLP widths DDP learned, next to a one-shot global entropy allocation at the same ratio."""
    if not ddp_widths:
        return figures.empty("When the run ends, the per-layer widths it learned appear here.")
    layers = list(range(len(ddp_widths)))
    fig = go.Figure()
    fig.add_trace(go.Bar(x=layers, y=ddp_widths, name="DDP (learned gates)", marker_color=figures.color(0)))
    if entropy_widths:
        fig.add_trace(go.Bar(x=layers, y=entropy_widths, name="one-shot entropy scores, global allocation",
                             marker_color=figures.color(1)))
    if full:
        fig.add_trace(go.Scatter(x=layers, y=full, mode="lines", name="original width",
                                 line={"color": "#888", "dash": "dash"}))
    fig.update_layout(barmode="group", xaxis_title="layer", yaxis_title="MLP neurons kept")
    return figures._finish(fig, title={"text": "Per-layer widths: learned vs entropy scores", "x": 0})


def status_text(points: list[dict], minutes: float, steps: int, state: str) -> str:
    if not points:
        return f"{state}: computing entropy scores (warm start and comparison) and preparing the training text…"
    last = points[-1]
    budget = f" of {minutes:g} min" if minutes else (f" of {steps} steps" if steps else "")
    parts = [f"**{state}** — step {last['step']}", f"{last['tokens']:,} tokens",
             f"{last['elapsed'] / 60:.1f} min{budget}"]
    trained = [p for p in points if "m" in p]
    if trained:
        p = trained[-1]
        parts.append(f"threshold m {p['m']:.3f}")
        for kind in ("mlp", "heads"):
            if kind in p:
                parts.append(f"ŝ {_TYPE_NAMES[kind]} {p[kind]['expected_sparsity']:.3f} → {p[kind]['target']:.3f}")
    held = [p["heldout"] for p in points if p.get("heldout") is not None]
    if held:
        parts.append(f"hardened KL {held[-1]:.4f}")
    return " · ".join(parts)


def make_start(services: Services):
    @user_errors
    def start(ratio: float, units: str, head_ratio: float, minutes: float, steps: float, lr: float, warm_start: bool,
              name: str, batch_size: float, seq_len: float, eval_every: float, kd_weight: float,
              request: gr.Request = None):
        """Run Services.ddp in a worker thread and stream its curves."""
        session = services.sessions.get(session_id(request))
        services.ddp_name(session, units, ratio, name)  # a clear error (no model, name taken) before any thread
        DDPOptions(ratio=float(ratio), units=units, head_ratio=float(head_ratio), kd_weight=float(kd_weight))
        job = session.new_job()
        minutes, steps = float(minutes or 0), int(steps or 0)
        points: list[dict] = []
        snapshots: list[dict] = []
        same = gr.update()

        def work(emit: Callable[[dict], None]) -> tuple:
            return services.ddp(
                session, ratio=float(ratio), units=units, head_ratio=float(head_ratio), minutes=minutes,
                steps=steps, lr=float(lr), warm_start=bool(warm_start), name=name, batch_size=int(batch_size),
                seq_len=int(seq_len), eval_every=int(eval_every), kd_weight=float(kd_weight), stop=job.is_set,
                on_step=emit)

        def draw(new: list[dict], finished: bool) -> tuple:
            points.extend(new)
            snapshots.extend(item["histogram"] for item in new if "histogram" in item)
            state = "Stopping" if job.is_set() else "Training"
            return (status_text(points, 0.0 if steps else minutes, steps, state), sparsity_figure(points),
                    lambda_figure(points), histogram_figure(snapshots[-1] if snapshots else None), same, same, same)

        try:
            variant, evicted, extra = yield from stream_worker(work, draw, job, REDRAW_S, name="hfprune-ddp")
        except Stopped:
            yield (f"**Stopped** after step {points[-1]['step'] if points else 0}: nothing was stored and the model "
                   "is unchanged.", sparsity_figure(points), lambda_figure(points),
                   histogram_figure(snapshots[-1] if snapshots else None), same, same, same)
            return
        snapshots = extra["snapshots"]
        meta = variant.meta
        record = meta.get("ddp", {})
        heads = meta.get("heads")
        head_text = (f" Heads kept per layer: {heads['layer_num_attention_heads']} ({heads['granularity']} "
                     f"granularity, {heads['achieved_ratio']:.1%} removed).") if heads else ""
        note = f" '{evicted}' was dropped from memory to make room (its run stays on disk)." if evicted else ""
        before, after = record.get("heldout_kl_hardened_before"), record.get("heldout_kl_hardened_after")
        message = (f"**Done**: variant **{variant.name}** (run `{variant.run_id}`) removes "
                   f"{meta['achieved_ratio']:.1%} of MLP neurons ({meta['params_removed_share']:.1%} of all "
                   f"parameters) after {record.get('steps', 0)} steps, {record.get('tokens_seen', 0):,} tokens, "
                   f"{record.get('seconds', 0):.0f} s; held-out KL of the hardened model "
                   f"{number(before, [after])} → {number(after, [before])}.{head_text} Compare it on the "
                   f"Compare and Quantize & measure tabs; it exports like any variant (head-pruned ones as "
                   f"hf-remote-code).{note}")
        slider = gr.update(minimum=0, maximum=max(1, len(snapshots) - 1), value=len(snapshots) - 1, step=1,
                           interactive=True)
        yield (message, sparsity_figure(points), lambda_figure(points), histogram_figure(snapshots[-1]), slider,
               widths_figure(meta.get("original_intermediate_sizes", []), meta.get("intermediate_sizes", []),
                             extra.get("entropy_widths")), snapshots)
    return start


def show_snapshot(index: float, snapshots: list[dict] | None) -> go.Figure:
    """The gate histogram at the recorded step the slider points at."""
    if not snapshots:
        return histogram_figure(None)
    return histogram_figure(snapshots[max(0, min(len(snapshots) - 1, int(index or 0)))])


def make_stop(services: Services):
    def stop(request: gr.Request = None) -> str:
        """Set the running job's flag; the training ends at its next step and the status line says so."""
        services.sessions.get(session_id(request)).stop.set()
        return "Stopping after the current step… (the status above says when it has stopped)"
    return stop


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("DDP", id="ddp"):
        gr.Markdown(TEACHING, elem_classes="teach")
        with gr.Row():
            ratio = gr.Slider(label="Share of MLP neurons to remove", **DDPOptions.ui("ratio"), elem_id="ddp-ratio")
            units = gr.Radio(UNIT_CHOICES, value="mlp", label="What gets dimmers")
            head_ratio = gr.Slider(label="Share of attention heads to remove (0 = same as above)",
                                   **DDPOptions.ui("head_ratio"))
        with gr.Row():
            minutes = gr.Slider(0.25, 30, value=2, step=0.25, label="Budget: minutes", elem_id="ddp-minutes")
            steps = gr.Number(0, precision=0, minimum=0, label="…or steps (0 = use the minutes)")
            lr = gr.Number(5e-2, minimum=1e-5, label="Gate learning rate")
            warm_start = gr.Checkbox(False, label="Warm start from entropy scores",
                                     info="least important units start dimmer (beyond the paper)")
            name = gr.Textbox("", label="Name of the variant", placeholder="default: ddp-<units>-<percent>")
        with gr.Accordion("Loss and batch", open=False):
            with gr.Row():
                kd_weight = gr.Slider(label="Weight of KL to the original", **DDPOptions.ui("kd_weight"))
                batch_size = gr.Slider(1, 16, value=4, step=1, label="Windows per step")
                seq_len = gr.Slider(32, 512, value=128, step=32, label="Tokens per window")
                eval_every = gr.Slider(1, 100, value=10, step=1, label="Hardened-model KL every N steps")
        with gr.Row():
            start_button = gr.Button("Start", variant="primary", elem_id="ddp-start")
            stop_button = gr.Button("Stop", variant="stop", elem_id="ddp-stop")
        status = gr.Markdown("", elem_id="ddp-status")
        with gr.Row():
            sparsity_plot = gr.Plot(label="Expected sparsity", elem_id="ddp-sparsity")
            lambda_plot = gr.Plot(label="Multipliers", elem_id="ddp-lambdas")
        with gr.Row():
            with gr.Column():
                hist_plot = gr.Plot(label="Gate histogram", elem_id="ddp-histogram")
                snapshot = gr.Slider(0, 1, value=0, step=1, label="Recorded step (after the run)", interactive=False,
                                     elem_id="ddp-snapshot")
            widths_plot = gr.Plot(label="Widths", elem_id="ddp-widths")
        snapshots = gr.State([])
    start_event = start_button.click(make_start(services), [ratio, units, head_ratio, minutes, steps, lr, warm_start,
                                                            name, batch_size, seq_len, eval_every, kd_weight],
                                     [status, sparsity_plot, lambda_plot, hist_plot, snapshot, widths_plot, snapshots],
                                     api_name="ddp", show_progress_on=status, **model_events())
    ctx.after(start_event)  # the status line counts the new variant (and shows what made room)
    stop_button.click(make_stop(services), None, status, queue=False, api_name="ddp_stop")
    snapshot.change(show_snapshot, [snapshot, snapshots], hist_plot, api_visibility="private")
