"""Assemble the dashboard from its tabs; ``launch_options`` holds what Gradio 6 wants at launch()."""
from __future__ import annotations

import os

import gradio as gr

from core import paths
from core.data.text import MAX_UPLOAD_BYTES

from . import plot_tools, texts
from .context import Ctx
from .guard import session_id
from .services import Services
from .status import make_refresh
from .tabs import (
    agreement,
    ddp,
    importance,
    inspect,
    model_data,
    pipeline,
    prune,
    quantize_measure,
    recover,
    runs,
    side_by_side,
    tour,
    vision,
)

ASSETS = paths.ASSETS


def build_demo(services: Services | None = None) -> gr.Blocks:
    """The whole dashboard; pass ``services`` to share caches / choose the run store (tests do)."""
    services = services or Services()
    with gr.Blocks(title=texts.TITLE) as demo:
        with gr.Row(elem_id="header"):
            gr.HTML(_header())
        ctx = Ctx(services)
        status_line = gr.Markdown("", elem_id="status-line")
        with gr.Accordion("Glossary: the words this dashboard uses", open=False, elem_id="glossary"):
            gr.Markdown(texts.glossary_markdown())
        ctx.add(status_line=status_line)
        with gr.Tabs() as tabs:
            ctx.add(tabs=tabs)
            wire_tour = tour.build(ctx)  # first in the row of tabs; wired once the tabs it fills exist
            model_data.build(ctx)
            importance.build(ctx)
            agreement.build(ctx)
            wire_inspect = inspect.build(ctx)  # neuron inspector; picks wired once all tabs exist
            prune.build(ctx)
            recover.build(ctx)
            pipeline.build(ctx)  # prune → quantize → distil and its six-order ablation
            ddp.build(ctx)  # DDP: learned gates hardened into the pruned structure (issue 12)
            side_by_side.build(ctx)
            vision.build(ctx)  # encoders (AMP): score, prune, widths, fidelity (issue 14)
            quantize_measure.build(ctx)
            runs.build(ctx)
        wire_tour()
        wire_inspect()
        demo.load(make_refresh(services), None, status_line, api_visibility="private", concurrency_limit=None,
                  show_progress="hidden")
    demo.services = services  # type: ignore[attr-defined]  # handy for tests and benchmarks
    _drop_sessions_on_unload(demo, services)
    return demo


def _drop_sessions_on_unload(demo: gr.Blocks, services: Services) -> None:
    """Forget a browser session's variants when its tab closes (runs on disk stay)."""
    def forget(request: gr.Request):
        services.sessions.drop(session_id(request))
    demo.unload(forget)


def _header() -> str:
    logo = (ASSETS / "logo.svg").read_text().replace("<svg ", '<svg class="hf-logo" ', 1)
    return (f'<div class="hf-header">{logo}'
            f'<div><div class="hf-title">{texts.TITLE}</div><div class="hf-sub">{texts.SUBTITLE}</div></div></div>')


def launch_options() -> dict:
    """theme / css / limits for ``demo.launch`` (Gradio 6 takes theme and css there, not in Blocks)."""
    return {"theme": gr.themes.Soft(primary_hue="blue"), "css": (ASSETS / "dashboard.css").read_text(),
            "max_file_size": MAX_UPLOAD_BYTES, "allowed_paths": [str(ASSETS)], "show_error": True,
            "head": plot_tools.head()}


def queue(demo: gr.Blocks) -> gr.Blocks:
    """Long jobs queue; model jobs share one slot (set per event), everything else runs freely."""
    return demo.queue(max_size=int(os.environ.get("HFPRUNE_QUEUE_SIZE", "64")), default_concurrency_limit=4)
