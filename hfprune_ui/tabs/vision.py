"""Vision tab: AMP on encoders (DINOv2-small, MiniLM-L6, or a ViT / DINOv2 / CLIP / BERT folder).

Pick an encoder, score its MLP neurons (``core.vision.score_encoder``: amp_entropy or a baseline),
prune at a ratio with AMP's adaptive search or a uniform / global width (``core.vision.prune_encoder``)
and see the per-layer widths, the search trace and how close the pruned encoder stays to the dense
one (``core.vision_metrics``). All the work is in core; handlers are plain functions (no ``yield``),
and encoder jobs are serialised by this tab's own lock.
"""
from __future__ import annotations

import threading

import gradio as gr
import torch

from core.importance.criteria import (
    ENCODER_CRITERIA,
)
from core.measure.encoders import (
    QUICK_KNN,
    embeddings,
    feature_fidelity,
    quick_knn,
    retrieval_agreement,
    size_report,
)
from core.methods.encoders import (
    ALLOCATIONS,
    EncoderOptions,
    heldout_data,
    plan_encoder_widths,
    prune_encoder,
    score_encoder,
)
from core.models.encoders import ENCODERS, LoadedEncoder, load_encoder

from .. import figures
from ..context import Ctx
from ..guard import user_errors
from ..status import distinct

TEACHING = (
    "**AMP for encoders.** An image (or sentence) encoder has no next-token distribution, so AMP asks a different "
    "label-free question: embed a batch of examples, turn each example's similarities to the others into a "
    "probability distribution, and measure its **entropy**. Neurons whose removal would change that entropy most "
    "(first-order Taylor, per example |Σ tokens a·g| at the input of fc2) are kept. The **adaptive** allocation then "
    "walks from the last block to the first and binary-searches the smallest width whose entropy increase stays "
    "under a threshold, tuning the threshold until the requested share of MLP neurons is gone.")
_LOCK = threading.Lock()
_LOADED: dict[str, LoadedEncoder] = {}
_DENSE_KNN: dict[str, dict] = {}  # encoder spec → the dense encoder's quick kNN result (computed once)
QUALITY_NOTE = ("The kNN accuracy classifies small labelled images (scikit-learn's digits, upsampled) by their "
                "nearest neighbours in the encoder's embedding space: a quick check that the pruned encoder still "
                "separates classes, coarse enough that a pruned encoder can match the dense one while its "
                "features moved; read it with the cosines.")
_MAX_COLUMNS = 256


def _encoder(spec: str) -> LoadedEncoder:
    spec = (spec or "").strip()
    if spec not in _LOADED:
        _LOADED[spec] = load_encoder(spec)
    return _LOADED[spec]


def _heatmap(scores: list[torch.Tensor], criterion: str):
    """Each layer's scores sorted high → low relative to the layer mean (log10), at most 256 columns."""
    rows = []
    for s in scores:
        ordered = torch.sort(s.float() / s.float().mean().clamp_min(1e-30), descending=True).values
        step = max(1, ordered.numel() // _MAX_COLUMNS)
        rows.append(ordered[::step].clamp_min(1e-12).log10().tolist())
    flat = torch.tensor([v for row in rows for v in row])
    limits = (float(flat.quantile(0.02)), float(flat.quantile(0.98))) if flat.numel() else None
    return figures.heatmap(rows, criterion, log=True, limits=limits)


@user_errors
def run_score(spec: str, criterion: str, samples: int, image_size: int, batch_size: int, seed: int):
    """Score the encoder's neurons → (status, heatmap, scores state)."""
    options = EncoderOptions(samples=int(samples), image_size=int(image_size), batch_size=int(batch_size),
                             seed=int(seed))
    with _LOCK:
        loaded = _encoder(spec)
        result = score_encoder(loaded, criterion, options, progress=False)
    status = (f"Scored {sum(s.numel() for s in result.scores)} neurons of `{spec}` ({loaded.family}, "
              f"{len(result.scores)} layers) with **{criterion}** on {result.config['examples']} "
              f"{'crops' if loaded.kind == 'image' else 'windows'} in {result.seconds:.1f} s.")
    return status, _heatmap(result.scores, criterion), {"spec": spec, "result": result, "options": options}


def _quality(spec: str, loaded: LoadedEncoder, pruned, heldout) -> dict:
    """The quality number shown beside the dense one after a prune: {label, dense, pruned, sentence}.
    Image encoders: kNN accuracy on a small labelled set (the dense encoder's once per encoder); text
    encoders: how many of each held-out window's 5 nearest neighbours the pruned encoder keeps."""
    if loaded.kind == "text":
        agreement = retrieval_agreement(embeddings(loaded.model, heldout), embeddings(pruned, heldout))
        return {"label": f"top-5 neighbours kept (held-out, {heldout.shape[0]} windows)", "dense": 1.0,
                "pruned": agreement, "sentence": f"Top-5 neighbours kept among {heldout.shape[0]} held-out windows: "
                                                 f"{100 * agreement:.0f} % (the dense encoder: 100 %)."}
    if spec not in _DENSE_KNN:
        _DENSE_KNN[spec] = quick_knn({"dense": loaded.model}, loaded.preprocess)
    dense = _DENSE_KNN[spec]
    mine = quick_knn({"pruned": pruned}, loaded.preprocess)
    a, b, se = dense["accuracy"]["dense"], mine["accuracy"]["pruned"], mine["stderr"]["pruned"]
    label = (f"kNN accuracy, {QUICK_KNN['dataset']} ({mine['test']} test images of {mine['size']} px, "
             f"chance {mine['chance']:.2f})")
    return {"label": label, "dense": a, "pruned": b,
            "sentence": (f"**kNN accuracy** on {mine['test']} held-out {QUICK_KNN['dataset']} images: dense "
                         f"**{100 * a:.1f} %** → pruned **{100 * b:.1f} %** (± {100 * se:.1f} points SE; chance "
                         f"{100 * mine['chance']:.0f} %). {QUALITY_NOTE}")}


@user_errors
def run_prune(state: dict | None, ratio: float, allocation: str, mode: str, heldout: int):
    """Prune at ``ratio`` → (status, widths figure, adaptive trace figure, metrics table)."""
    if not state:
        raise gr.Error("Score the encoder first (the scores order each layer's neurons).")
    options = state["options"].replace(mode=mode, heldout_samples=int(heldout))
    with _LOCK:
        loaded = _encoder(state["spec"])
        plan = plan_encoder_widths(loaded, state["result"], float(ratio), allocation, options, progress=False)
        pruned = prune_encoder(loaded, state["result"], float(ratio), allocation, options, plan=plan)
        data = heldout_data(loaded, options.replace(seed=options.seed + 1))
        fidelity = feature_fidelity(loaded.model, pruned.model, data)
        quality = _quality(state["spec"], loaded, pruned.model, data)
        patch = int(getattr(loaded.model.config, "patch_size", 14))
        tokens = options.seq_len if loaded.kind == "text" else (options.image_size // patch) ** 2 + 1
        before, after = size_report(loaded.model, tokens), size_report(pruned.model, tokens)
    rows = [[quality["label"], *distinct([quality["dense"], quality["pruned"]])],
            ["parameters (M)", *distinct([before["params"] / 1e6, after["params"] / 1e6])],
            ["MLP parameters (M)", *distinct([before["mlp_params"] / 1e6, after["mlp_params"] / 1e6])],
            ["GFLOPs per example", *distinct([before["gflops"], after["gflops"]])],
            ["embedding cosine to dense (held-out)", 1.0, *distinct([fidelity["embedding_cosine"]])],
            ["token cosine to dense (held-out)", 1.0, *distinct([fidelity["token_cosine"]])]]
    trace = figures.adaptive_trace(pruned.meta["adaptive"]["trace"]) if "adaptive" in pruned.meta else \
        figures.empty("The adaptive allocation shows its search here.")
    status = (f"Pruned {pruned.meta['achieved_ratio']:.1%} of the MLP neurons ({allocation}); widths "
              f"{min(pruned.widths)}–{max(pruned.widths)} of {max(plan.full_widths)}. {quality['sentence']}")
    return status, figures.widths(plan.full_widths, pruned.widths), trace, rows


def build(ctx: Ctx) -> None:
    """The Vision tab."""
    with gr.Tab("Vision (AMP)", elem_id="tab-vision"):
        gr.Markdown(TEACHING)
        with gr.Row():
            spec = gr.Dropdown(list(ENCODERS), value="dinov2-small", allow_custom_value=True, label="encoder",
                               info="embedded alias, or a ViT / DINOv2 / CLIP / BERT folder or hub id")
            criterion = gr.Dropdown(list(ENCODER_CRITERIA), value="amp_entropy", label="criterion")
            samples = gr.Slider(4, 256, value=32, step=4, label="calibration examples")
            image_size = gr.Slider(56, 518, value=112, step=14, label="crop size (px)")
            batch_size = gr.Slider(2, 128, value=32, step=2, label="batch (entropy over it)")
            seed = gr.Number(0, precision=0, label="seed")
        score_button = gr.Button("Score neurons", variant="primary")
        score_status = gr.Markdown()
        heat = gr.Plot(label="scores per layer")
        with gr.Row():
            ratio = gr.Slider(0.05, 0.9, value=0.4, step=0.05, label="share of MLP neurons to remove")
            allocation = gr.Radio(list(ALLOCATIONS), value="adaptive", label="allocation")
            mode = gr.Radio(["independent", "sequential"], value="independent", label="adaptive search",
                            info="sequential = AMP's (later layers already pruned); independent is cheaper")
            heldout = gr.Slider(4, 128, value=16, step=4, label="held-out examples for the search")
        prune_button = gr.Button("Prune and measure", variant="primary")
        prune_status = gr.Markdown()
        with gr.Row():
            widths_plot = gr.Plot(label="widths")
            trace_plot = gr.Plot(label="adaptive search")
        metrics = gr.Dataframe(headers=["metric", "dense", "pruned"], label="size and fidelity", interactive=False)
        state = gr.State(None)
        score_button.click(run_score, [spec, criterion, samples, image_size, batch_size, seed],
                           [score_status, heat, state], api_name="vision_score", show_progress_on=score_status)
        prune_button.click(run_prune, [state, ratio, allocation, mode, heldout],
                           [prune_status, widths_plot, trace_plot, metrics], api_name="vision_prune",
                           show_progress_on=prune_status)
