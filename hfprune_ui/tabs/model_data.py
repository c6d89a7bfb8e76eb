"""Tab 1 — Model & data: which model to prune and which text calibrates the scores."""
from __future__ import annotations

import gradio as gr

from core.adapters import mlp_widths
from core.counts import count_params
from core.data import calibration_windows
from core.models import DEFAULT_MODEL, EMBEDDED

from .. import texts
from ..context import Ctx, model_events
from ..guard import session_id, user_errors
from ..services import SOURCES, Services

DEFAULT_SAMPLES = 8
DEFAULT_SEQ_LEN = 64


def describe(services: Services, spec: str, data) -> str:
    """Markdown summary of the loaded model and the calibration settings."""
    loaded = services.model(spec)
    config = loaded.model.config
    widths = mlp_widths(loaded.model)
    params = count_params(loaded.model)
    return (f"**{spec}** — `{type(loaded.model).__name__}`, {len(widths)} layers, hidden {config.hidden_size}, "
            f"MLP width {widths[0] if len(set(widths)) == 1 else f'{min(widths)}–{max(widths)}'}, "
            f"{params['params'] / 1e6:.1f} M parameters ({params['mlp_params'] / 1e6:.1f} M in MLPs).  \n"
            f"Calibration: **{data.label}**, {data.samples} windows × {data.seq_len} tokens "
            f"({data.samples * data.seq_len} tokens), seed {data.seed}.")


def make_load(services: Services):
    @user_errors
    def load(model: str, source: str, upload: str | None, samples: float, seq_len: float, seed: float,
             request: gr.Request = None, progress=gr.Progress(track_tqdm=True)) -> str:
        """Load (or reuse) the model and check the calibration text yields enough windows."""
        session = services.sessions.get(session_id(request))
        progress(0.05, desc="checking calibration source")
        data = services.data_spec(source, upload, samples, seq_len, seed)
        progress(0.15, desc=f"loading {model} (first load converts embedded models once)")
        loaded = services.model(model)
        progress(0.8, desc="tokenising calibration text")
        calibration_windows(loaded.tokenizer, data.source, data.samples, data.seq_len, data.seed,
                            max_length=loaded.max_length)
        session.set_context(model.strip(), data)
        progress(1.0, desc="ready")
        return describe(services, model.strip(), data)
    return load


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("Model & data", id="model"):
        gr.Markdown(texts.MODEL_DATA, elem_classes="teach")
        with gr.Row():
            model = gr.Dropdown(list(EMBEDDED), value=DEFAULT_MODEL, allow_custom_value=True, label="Model",
                                info="embedded alias, hub id, model folder, or a .gguf file path", scale=2)
            source = gr.Radio([(label, key) for key, label in SOURCES.items()], value="wiki",
                              label="Calibration text", scale=2)
        upload = gr.File(label="Upload .txt or .jsonl (used when 'Uploaded file' is chosen)",
                         file_types=[".txt", ".jsonl"], type="filepath", height=90)
        with gr.Row():
            samples = gr.Slider(1, 256, value=DEFAULT_SAMPLES, step=1, label="Calibration windows")
            seq_len = gr.Slider(16, 1024, value=DEFAULT_SEQ_LEN, step=16, label="Tokens per window")
            seed = gr.Number(0, precision=0, label="Seed (which windows)")
        load_button = gr.Button("Load model", variant="primary")
        status = gr.Markdown("The model loads by itself when you press **Score** on the next tab.",
                             elem_id="model-status")
    ctx.add(model=model, source=source, upload=upload, samples=samples, seq_len=seq_len, seed=seed,
            model_status=status)
    load_button.click(make_load(services), ctx.data_inputs, status, api_name="load_model", **model_events())
