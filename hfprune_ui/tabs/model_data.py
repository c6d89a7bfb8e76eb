"""Tab 1 — Model & data: which model to prune and which text calibrates the scores."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from core.data.text import CalibrationOptions, calibration_windows, describe_source, upload_rule, window_capacity
from core.errors import HFPruneError
from core.models.adapters import mlp_widths
from core.models.counts import count_params
from core.models.loading import DEFAULT_MODEL, EMBEDDED

from .. import texts
from ..context import TRACK, Ctx, model_events
from ..guard import session_id, user_errors
from ..progress import JobProgress
from ..services import SOURCES, Services
from ..state import DataSpec
from ..status import count

DEFAULT_SAMPLES = 8
DEFAULT_SEQ_LEN = 64


def describe(services: Services, spec: str, data: DataSpec) -> str:
    """Markdown summary of the loaded model, the calibration settings and how the text is split."""
    loaded = services.model(spec)
    config = loaded.model.config
    widths = mlp_widths(loaded.model)
    params = count_params(loaded.model)
    held_out = window_capacity(loaded.tokenizer, data.source, "evaluation", data.seq_len)
    return (f"**{spec}** — `{type(loaded.model).__name__}`, {len(widths)} layers, hidden {config.hidden_size}, "
            f"MLP width {widths[0] if len(set(widths)) == 1 else f'{min(widths)}–{max(widths)}'}, "
            f"{count(params['params'])} parameters ({count(params['mlp_params'])} in MLPs).  \n"
            f"Calibration: **{data.name}**, {data.samples} windows × {data.seq_len} tokens "
            f"({count(data.samples * data.seq_len)} tokens), seed {data.seed}.  \n"
            f"Text: {describe_source(data.source, data.name)}; the held-out part has room for {held_out} "
            f"evaluation windows of {data.seq_len} tokens. Quality is only ever measured on the held-out part.")


def make_load(services: Services):
    @user_errors
    def load(model: str, source: str, upload: str | None, samples: float, seq_len: float, seed: float,
             request: gr.Request = None, progress=TRACK) -> str:
        """Load (or reuse) the model and check the calibration text yields enough windows."""
        session = services.sessions.get(session_id(request))
        job = JobProgress(progress, "Load", stages=3, unit="step")
        job.stage(0, "checking the calibration text")
        data = services.data_spec(source, upload, samples, seq_len, seed)
        job.stage(1, f"loading {model} (the first load converts an embedded model once)")
        loaded = services.model(model)
        job.stage(2, "tokenising the calibration text")
        calibration_windows(loaded.tokenizer, data.source, data.samples, data.seq_len, data.seed,
                            max_length=loaded.max_length)
        session.set_context(model.strip(), data)
        return describe(services, model.strip(), data)
    return load


def make_check_upload(services: Services):
    def check(upload: str | None):
        """Check a file the moment it is uploaded: a refused one is cleared from the widget, with one
        notice that names the user's file and the rule; an accepted one says how it will be split."""
        if not upload:
            return gr.update(), upload_rule()
        name = Path(upload).name  # Gradio keeps the user's file name inside its upload folder
        try:
            data = services.data_spec("upload", upload, 1, 8, 0)
        except HFPruneError as exc:
            gr.Warning(f"{exc} The file was not kept.")
            return None, f"**{name} was not kept**: {exc}  \n{upload_rule()}"
        return gr.update(), (f"**{describe_source(data.source, data.name)}**. Choose *Uploaded file* above and press "
                             "**Load model** to use it.")
    return check


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("Model & data", id="model"):
        gr.Markdown(texts.MODEL_DATA, elem_classes="teach")
        with gr.Row():
            model = gr.Dropdown(list(EMBEDDED), value=DEFAULT_MODEL, allow_custom_value=True, label="Model",
                                info="embedded alias, hub id, model folder, or a .gguf file path", scale=2)
            source = gr.Radio([(label, key) for key, label in SOURCES.items()], value="wiki",
                              label="Calibration text", scale=2, info=texts.SPLIT_INFO)
        upload = gr.File(label="Upload .txt or .jsonl (used when 'Uploaded file' is chosen)",
                         file_types=[".txt", ".jsonl"], type="filepath", elem_id="upload")
        upload_note = gr.Markdown(upload_rule(), elem_id="upload-note", elem_classes="teach")
        with gr.Row():
            # ranges from the engine's CalibrationOptions; the dashboard's defaults are smaller (a laptop CPU)
            samples = gr.Slider(label="Calibration windows", **{**CalibrationOptions.ui("samples"),
                                "value": DEFAULT_SAMPLES, "info": "how many stretches of text the criteria watch"})
            seq_len = gr.Slider(label="Tokens per window", **{**CalibrationOptions.ui("seq_len"),
                                                             "value": DEFAULT_SEQ_LEN})
            seed = gr.Number(0, precision=0, label="Seed (which windows)",
                             info="changing it picks other windows (scores for the old ones are set aside)")
        load_button = gr.Button("Load model", variant="primary", elem_id="load-button")
        status = gr.Markdown("The model loads by itself when you press **Score** on the Importance tab.",
                             elem_id="model-status")
    ctx.add(model=model, source=source, upload=upload, samples=samples, seq_len=seq_len, seed=seed,
            model_status=status)
    upload.upload(make_check_upload(services), upload, [upload, upload_note], api_name="check_upload",
                  show_progress="hidden")
    upload.clear(make_check_upload(services), upload, [upload, upload_note], api_visibility="private",
                 show_progress="hidden")
    event = load_button.click(make_load(services), ctx.data_inputs, status, api_name="load_model", **model_events())
    ctx.after(event)
