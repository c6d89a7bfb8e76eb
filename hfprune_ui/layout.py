"""Assemble the dashboard from its tabs; ``launch_options`` holds what Gradio 6 wants at launch()."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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
        groups: dict[gr.Tab, gr.Tabs] = {}
        with gr.Tabs(elem_id="tab-groups"):
            wire_tour = tour.build(ctx)  # first in the row of tabs; wired once the tabs it fills exist
            with group("Data & scores", "scores", groups) as tabs:
                ctx.add(tabs=tabs)  # the inspector's picks select its tab in this row
                model_data.build(ctx)
                importance.build(ctx)
                agreement.build(ctx)
                wire_inspect = inspect.build(ctx)  # neuron inspector; picks wired once all tabs exist
            with group("Prune & heal", "cut", groups):
                prune.build(ctx)
                recover.build(ctx)
                ddp.build(ctx)  # DDP: learned gates hardened into the pruned structure (issue 12)
                pipeline.build(ctx)  # prune → quantize → distil and its six-order ablation
                vision.build(ctx)  # encoders (AMP): score, prune, widths, fidelity (issue 14)
            with group("Compare & measure", "measure", groups):
                side_by_side.build(ctx)
                quantize_measure.build(ctx)
            runs.build(ctx)
        wire_tour()
        wire_inspect()
        refresh_when_shown(demo, groups)
        demo.load(make_refresh(services), None, status_line, api_visibility="private", concurrency_limit=None,
                  show_progress="hidden")
    demo.services = services  # type: ignore[attr-defined]  # handy for tests and benchmarks
    _drop_sessions_on_unload(demo, services)
    return demo


# The row of tabs: the Tour, three groups of tabs (each a row of its own) and the run list — five at the top
# and at most five in a group, so every tab is reachable without Gradio's overflow menu at 1400 px.
TAB_GROUPS = {"Data & scores": ("Model & data", "Importance", "Entropy vs cross-entropy", "Neuron inspector"),
              "Prune & heal": ("Prune", "Recover", "DDP", "Pipeline", "Vision (AMP)"),
              "Compare & measure": ("Compare", "Quantize & measure")}


@contextlib.contextmanager
def group(label: str, tab_id: str, groups: dict) -> Iterator[gr.Tabs]:
    """A tab of the top row holding a row of tabs (``TAB_GROUPS[label]``, checked as they are built)."""
    with gr.Tab(label, id=tab_id, elem_id=f"group-{tab_id}") as outer, gr.Tabs() as inner:
        yield inner
    built = tuple(child.label for child in inner.children if isinstance(child, gr.Tab))
    if built != TAB_GROUPS[label]:
        raise RuntimeError(f"group {label!r} holds {built}, TAB_GROUPS says {TAB_GROUPS[label]}")
    groups[outer] = inner


def refresh_when_shown(demo: gr.Blocks, groups: dict) -> None:
    """Showing a group shows the tab last open inside it without firing that tab's ``select`` (its
    refreshes: variant lists, estimates); so a group's own ``select`` runs the select handlers of every
    tab inside it (quick, no model work beyond a probe)."""
    for outer, inner in groups.items():
        ids = {child._id for child in inner.children if isinstance(child, gr.Tab)}
        for fn in list(demo.fns.values()):
            if any(block_id in ids and event == "select" for block_id, event in fn.targets):
                outer.select(fn.fn, fn.inputs, fn.outputs, api_visibility="private", show_progress=fn.show_progress,
                             queue=fn.queue, concurrency_limit=fn.concurrency_limit, concurrency_id=fn.concurrency_id)


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
