"""Tab 4 — Prune: preview widths / parameters / FLOPs for a ratio, prune, name, export."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.counts import prune_preview
from core.errors import HFPruneError
from core.export import EXPORT_MODES
from core.sweep import SWEEP_ALLOCATIONS, parse_ratios

from .. import figures, texts
from ..context import Ctx, criterion_params, model_events, stop_on_click
from ..guard import session_id, user_errors
from ..services import Services, allocations, criteria
from ..state import Session

PREVIEW_SEQ_LEN = 128


def variants_markdown(session: Session) -> str:
    if not session.variants:
        return "No variants yet."
    lines = [f"- **{v.name}** — {v.meta.get('criterion')}, ratio {v.meta.get('ratio')}, "
             f"{v.meta.get('allocation')}, widths {min(v.widths)}–{max(v.widths)}, run `{v.run_id}`"
             for v in session.variants.values()]
    return "Variants in this session:\n" + "\n".join(lines)


def make_preview(services: Services):
    @user_errors
    def preview(criterion: str, ratio: float, allocation: str, round_to: str | int, model: str,
                request: gr.Request = None):
        """Kept widths and params/FLOPs before → after, without pruning anything."""
        session = services.sessions.get(session_id(request))
        spec = (model or "").strip()
        if not services.models.cached(spec):
            return "Load the model (Model & data tab) or press Score to see a preview.", figures.empty("No model loaded")
        loaded = services.model(spec)
        scores = session.scores[criterion].scores if criterion in session.scores and session.model_spec == spec else None
        if allocation == "global" and scores is None:
            return (f"The **global** allocation ranks neurons by their '{criterion}' scores across layers: score the "
                    "model with it first (Importance tab), or press Prune, which scores it.",
                    figures.empty("Global widths need scores"))
        widths = services.plan(loaded, ratio, allocation, int(round_to), scores)
        note = ""
        if widths is None:  # adaptive: the search runs on Prune; preview the uniform widths meanwhile
            widths = services.plan(loaded, ratio, "uniform", int(round_to), None)
            note = ("**Adaptive** widths come from a search on held-out calibration text that runs when you press "
                    "Prune (a few minutes on a CPU); the preview shows the uniform widths for the same ratio.  \n")
        p = prune_preview(loaded.model, widths, PREVIEW_SEQ_LEN)
        text = note + (f"Parameters **{p['params_before'] / 1e6:.2f} M → {p['params_after'] / 1e6:.2f} M** "
                f"(−{100 * (1 - p['params_after'] / p['params_before']):.1f} %); forward FLOPs/token at "
                f"{PREVIEW_SEQ_LEN} tokens **{p['flops_before'] / 1e6:.1f} M → {p['flops_after'] / 1e6:.1f} M** "
                f"(−{100 * (1 - p['flops_after'] / p['flops_before']):.1f} %); MLP width {min(widths)}–{max(widths)} "
                f"of {max(p['widths_before'])}.")
        return text, figures.widths(p["widths_before"], widths)
    return preview


def make_prune(services: Services):
    @user_errors
    def prune(criterion: str, ratio: float, allocation: str, round_to: str | int, compensate: bool,
              compensate_windows: float, name: str, model: str, source: str,
              upload: str | None, samples: float, seq_len: float, seed: float, temperature: float, alpha: float,
              weight: float, request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        """Score if needed (cached), prune into a new variant, store the run."""
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        data = services.data_spec(source, upload, samples, seq_len, seed)
        spec = (model or "").strip()
        progress(0.05, desc=f"scores for {criterion}")
        services.score(session, spec, data, criterion, stop=job.is_set,
                       params=criterion_params(temperature, alpha, weight))
        progress(0.6, desc="pruning")
        variant, evicted = services.prune(session, criterion, ratio, allocation, int(round_to), name, stop=job.is_set,
                                          compensate_windows=int(compensate_windows) if compensate else 0)
        note = f" The oldest variant '{evicted}' was dropped from memory (its run stays on disk)." if evicted else ""
        refit = (" Every down_proj was refitted by least squares on "
                 f"{variant.meta['compensation']['samples']} calibration windows."
                 if variant.meta.get("compensation", {}).get("method") == "lsq" else "")
        status = (f"Pruned **{variant.name}**: MLP widths {min(variant.widths)}–{max(variant.widths)}, "
                  f"stored as run `{variant.run_id}`.{refit}{note}")
        names = list(session.variants)
        trace = variant.meta.get("adaptive", {}).get("trace")
        figure = (figures.adaptive_trace(trace, trace_layers(len(trace))) if trace else
                  figures.empty("Choose the adaptive allocation to see its per-layer search here."))
        return status, variants_markdown(session), gr.update(choices=names, value=variant.name), figure
    return prune


def trace_layers(count: int) -> list[int]:
    """A readable subset of layers for the trace plot: about six, evenly spread, first and last included."""
    step = max(1, round((count - 1) / 5))
    return sorted({*range(0, count, step), count - 1})


def make_sweep(services: Services):
    @user_errors
    def sweep(names: list | None, ratios: str, allocation: str, round_to: str | int, windows: float,
              seq_len: float, metric: str, compensate_windows: float = 64, request: gr.Request = None,
              progress=gr.Progress(track_tqdm=True)):
        """Prune each scored criterion at each ratio (in memory) and measure fidelity; stream the rows."""
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        unscored = [n for n in (names or []) if n not in session.scores]
        if unscored:
            raise HFPruneError(f"Not scored yet: {', '.join(unscored)}. Score them on the Importance tab, or untick them.")
        chosen = list(names or []) or list(session.scores)
        if not chosen:
            raise HFPruneError("Score at least one criterion first (Importance tab).")
        rows = []
        for row in services.sweep(session, chosen, parse_ratios(ratios), allocation, int(round_to), int(windows),
                                  int(seq_len), stop=job.is_set, compensate_windows=int(compensate_windows)):
            rows.append(row)
            yield sweep_table(rows), figures.sweep_lines(rows, metric)
    return sweep


def sweep_table(rows: list[dict]) -> pd.DataFrame:
    """Rows → a criteria × ratio table (KL to dense; perplexity and top-1 in the other columns)."""
    frame = pd.DataFrame(rows)
    frame["ratio"] = frame["ratio"].map(lambda r: f"{r:.2f}")
    return frame.round({"perplexity": 2, "kl_to_dense": 4, "top1_agreement": 4})


def make_scored(services: Services):
    def scored(request: gr.Request = None):
        """Tick the criteria this session has scored."""
        return gr.update(value=list(services.sessions.get(session_id(request)).scores))
    return scored


def make_export_zip(services: Services):
    @user_errors
    def export_zip(name: str, mode: str, request: gr.Request = None, progress=gr.Progress()):
        session = services.sessions.get(session_id(request))
        if not name:
            raise HFPruneError("Pick a variant to export.")
        progress(0.1, desc="writing safetensors")
        archive = services.export_zip(session, name, mode)
        return str(archive), f"Packed **{name}** as `{archive.name}` ({archive.stat().st_size / 2**20:.0f} MiB)."
    return export_zip


def make_export_save(services: Services):
    @user_errors
    def export_save(name: str, mode: str, folder: str, request: gr.Request = None) -> str:
        session = services.sessions.get(session_id(request))
        if not name:
            raise HFPruneError("Pick a variant to export.")
        if not (folder or "").strip():
            raise HFPruneError("Type the folder to save into (it must not exist yet, or be empty).")
        target = services.save_to_folder(session, name, mode, folder.strip())
        how = ("`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`" if mode == "hf-remote-code"
               else "`AutoModelForCausalLM.from_pretrained(folder)`")
        return f"Saved **{name}** to `{target}`; reload it with {how}."
    return export_save


def build(ctx: Ctx) -> None:
    services = ctx.services
    names = criteria()
    with gr.Tab("Prune", id="prune") as tab:
        gr.Markdown(texts.PRUNE, elem_classes="teach")
        with gr.Row():
            criterion = gr.Dropdown(names, value="entropy" if "entropy" in names else names[0], label="Criterion")
            ratio = gr.Slider(0.0, 0.95, value=0.2, step=0.01, label="Ratio of MLP neurons removed", elem_id="ratio")
            allocation = gr.Dropdown(allocations(), value=allocations()[0][1], label="Allocation")
            round_to = gr.Dropdown(["1", "8", "64", "128"], value="1", label="Round widths to a multiple of")
        with gr.Row():
            compensate = gr.Checkbox(False, label="Least-squares compensation (refit down_proj after pruning)",
                                     info=texts.COMPENSATION, elem_id="compensate")
            compensate_windows = gr.Slider(4, 256, value=64, step=4, label="Compensation windows (× the data tab's "
                                           "tokens per window; forward passes only)")
        preview_text = gr.Markdown("", elem_id="prune-preview")
        preview_plot = gr.Plot(label="Kept width per layer", elem_id="widths-plot")
        with gr.Row():
            name = gr.Textbox("", label="Variant name", placeholder="e.g. entropy-20% (default)")
            prune_button = gr.Button("Prune", variant="primary", elem_id="prune-button")
            stop_button = gr.Button("Stop", variant="stop")
        status = gr.Markdown("", elem_id="prune-status")
        variants = gr.Markdown("No variants yet.")
        trace_plot = gr.Plot(label="Adaptive search trace", elem_id="trace-plot")
        with gr.Accordion("Criteria × ratio fidelity (prunes in memory, measures on held-out text)", open=False):
            with gr.Row():
                sweep_criteria = gr.CheckboxGroup(names, value=[], label="Criteria (the scored ones are ticked)",
                                                  scale=2)
                sweep_ratios = gr.Textbox("0.2, 0.3, 0.4", label="Ratios", scale=1)
                sweep_allocation = gr.Dropdown(list(SWEEP_ALLOCATIONS), value="uniform", label="Allocation", scale=1)
            with gr.Row():
                sweep_windows = gr.Slider(1, 32, value=4, step=1, label="Evaluation windows")
                sweep_len = gr.Slider(16, 512, value=64, step=16, label="Tokens per window")
                sweep_metric = gr.Dropdown([("KL to dense", "kl_to_dense"), ("perplexity", "perplexity"),
                                            ("top-1 agreement", "top1_agreement")], value="kl_to_dense",
                                           label="Plot")
                sweep_button = gr.Button("Run sweep", variant="primary", elem_id="sweep-button")
            sweep_frame = gr.Dataframe(label="Fidelity per criterion and ratio", interactive=False)
            sweep_plot = gr.Plot(label="Fidelity vs ratio", elem_id="sweep-plot")
        with gr.Accordion("Export", open=False):
            with gr.Row():
                export_variant = gr.Dropdown([], value=None, allow_custom_value=True, label="Variant")
                mode = gr.Dropdown(list(EXPORT_MODES), value=EXPORT_MODES[0], label="Format")
            with gr.Row():
                zip_button = gr.Button("Download as .zip")
                folder = gr.Textbox("", label="…or save to this folder on the server")
                save_button = gr.Button("Save to folder")
            export_file = gr.File(label="Exported archive", interactive=False)
            export_status = gr.Markdown("")
    preview = make_preview(services)
    preview_inputs = [criterion, ratio, allocation, round_to, ctx["model"]]
    for component in (criterion, allocation, round_to):
        component.input(preview, preview_inputs, [preview_text, preview_plot], api_visibility="private")
    ratio.change(preview, preview_inputs, [preview_text, preview_plot], api_name="prune_preview", show_progress="hidden")
    tab.select(preview, preview_inputs, [preview_text, preview_plot], api_visibility="private")
    tab.select(make_scored(services), None, sweep_criteria, api_visibility="private")
    sweep_event = sweep_button.click(make_sweep(services), [sweep_criteria, sweep_ratios, sweep_allocation, round_to, sweep_windows,
                                              sweep_len, sweep_metric, compensate_windows], [sweep_frame, sweep_plot],
                                     api_name="sweep",
                       **model_events())
    prune_event = prune_button.click(make_prune(services), [criterion, ratio, allocation, round_to, compensate,
                                                            compensate_windows, name,
                                                            *ctx.data_inputs, *ctx.criterion_inputs],
                                     [status, variants, export_variant, trace_plot], api_name="prune", **model_events())
    stop_on_click(services, stop_button, status, [prune_event, sweep_event])
    zip_button.click(make_export_zip(services), [export_variant, mode], [export_file, export_status],
                     api_name="export_zip", **model_events())
    save_button.click(make_export_save(services), [export_variant, mode, folder], export_status,
                      api_name="export_save", **model_events())
