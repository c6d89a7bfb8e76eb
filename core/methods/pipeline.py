"""Prune → quantize → distil: the ordered pipeline that makes a model small *and* fast, and its six-order ablation.

    from core.pipeline import PipelineOptions, run_pipeline
    result = run_pipeline(loaded, PipelineOptions(order="pqd", ratio=0.2, quant="int8-dynamic"),
                          train=TrainOptions(minutes=2, lr=1e-4), out="runs/pqd")
    result.row["kl_to_dense"], result.row["prefill_speedup"]

**Stages** (each runs on the *current* student, i.e. whatever the earlier stages made of the dense model):

``p`` prune
    score every MLP neuron of the current student with the criterion on calibration windows
    (:func:`core.engine.score_model`), allocate widths (uniform / global / adaptive, rounded to
    ``round_to``), slice, and optionally refit each down_proj by least squares toward the current
    student (:func:`core.engine.prune_with_scores`). When ``q`` came earlier the student is
    fake-quantised, so activation- and gradient-based criteria score the model *as it will run*
    (straight-through gradients through the fake quantisation); weight-based criteria read the
    stored floating-point weights either way.
``q`` quantize
    put the student in its final number format as **fake quantisation** (torchao's QAT prepare:
    every linear layer outside the LM head becomes a ``FakeQuantizedLinear`` whose forward rounds
    weights — and, for the dynamic format, activations — exactly as the real kernel will, with
    straight-through gradients). Every later stage sees this format. After the last stage the
    fake quantisation is *converted*: the trained floating-point weights are quantised for real by
    the format's backend (:func:`core.quantize.quantize_model`). When ``q`` is the last stage this
    is plain post-training quantisation.
``d`` distil
    train the current student against the dense fp32 model (:func:`core.train.train` with
    :class:`core.train.LogitDistillation`: τ²·KL(p_dense ‖ p_student), all positions) for the
    budget, on calibration-split windows with a disjoint held-out slice for the KL curve. After
    ``q`` this is quantisation-aware training (the student learns in its final format); before
    ``q`` it is fp32 distillation and the later ``q`` quantises the distilled weights without
    further training. While the student is still identical to the dense model (``d`` first) there
    is nothing to distil — KL and its gradient are exactly 0 — so the stage is recorded as skipped.

**Same budget**: every order gets the same scoring data, widths rule, format and the same training
budget (steps, tokens or minutes) for its ``d`` stage. A subset order (``p``, ``q``, ``pq``, ``pd`` …)
is allowed for baselines; the six full orders are :data:`ALL_ORDERS`.

**Formats** (:data:`FORMATS`): ``int8-dynamic`` (INT8 activations quantised per call × per-channel INT8
weights on the CPU's fbgemm kernels — the fast one on CPUs without AVX-512 VNNI, see
benchmarks/results/int8_backends_cpu.md), ``int8-weight`` (torchao per-channel INT8 weights, fp32
compute), ``nf4`` (bitsandbytes 4-bit NormalFloat weights; CUDA only) and the GGUF block formats
``gguf-q8_0`` / ``gguf-q5_0`` / ``gguf-q4_0`` (llama.cpp's CPU formats: the ``q`` stage fake-quantises
every matrix exactly as the file will store it, blocks of 32 along the input; kept widths must be
multiples of 32).

**GGUF formats run where they are deployed**: the export is a folder with one ``.gguf`` file of the
format's type (``core.export.hf.save_pruned`` mode ``gguf``, written from the trained float weights) and
the row is measured in llama.cpp (:func:`measure_gguf`: prompt / generation tokens/s, interleaved with the
dense model written as F16 and in the same type; KL and perplexity from llama.cpp's logits, KL to the
dense F16 file). An order without ``q`` is written F16 then. The model a run returns is the
fake-quantised torch model, which computes what the file holds (weights exactly; llama.cpp's own kernels
round differently in the last bits).

Export (:func:`core.quant_store.save_quantized`): tokenizer + ``pruning_meta.json`` (with this pipeline's
record) + ``quantization.json`` + the weights — for the INT8 formats the quantized layers as INT8
weights and scales (``quantized.safetensors``, made from the trained QAT weights) and every other tensor
as saved; for NF4 the trained floating-point weights, quantised again on load. ``load_any`` gives back
the same model that was measured. Nothing is pickled.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core import __version__
from core.data.text import CalibrationOptions, HeldoutWindows, TrainingText, evaluation_windows
from core.errors import HFPruneError, Stopped
from core.export.gguf import ARCHITECTURES, GGUFOptions, check_block_rows, save_gguf
from core.export.hf import check_output_dir, default_export_mode, save_pruned
from core.export.kquant import llama_cpp_binding
from core.files import atomic_file, write_json
from core.importance.criteria import REGISTRY
from core.measure.evaluate import Reference, evaluate
from core.measure.llamacpp import LlamaCppOptions, gguf_counts, measure_llamacpp
from core.measure.speed import SpeedUp, measure_speed, speedup, spread
from core.measure.zeroshot import DEFAULT_TASKS, run_zeroshot
from core.methods.oneshot import ALLOCATIONS, ScoreResult, prune_with_scores, score_model
from core.methods.recover import param_set
from core.models.adapters import mlp_widths
from core.models.counts import folder_bytes, forward_flops_per_token, mlp_widths_any
from core.models.loading import LoadedModel
from core.options import Options, knob, knob_like
from core.progress import check_stop
from core.prune.allocate import AllocationOptions, check_ratio
from core.prune.compensate import CompensationOptions
from core.quantize.backends import INT8_METHODS, check_method, quantization_of, quantize_model
from core.quantize.fake import FORMATS, Format, fake_format, fake_quantize, unfake
from core.quantize.store import load_on, read_recipe, save_quantized
from core.runs import RunStore
from core.train.loop import DistillOptions, LogitDistillation, StepRecord, TrainOptions, train

STAGES = {"p": "prune", "q": "quantize", "d": "distill"}
ALL_ORDERS: tuple[str, ...] = tuple("".join(p) for p in itertools.permutations("pqd"))  # pqd pdq qpd qdp dpq dqp
_WORDS = {"p": "p", "prune": "p", "q": "q", "quantize": "q", "quantise": "q", "quant": "q", "d": "d",
          "distill": "d", "distil": "d", "kd": "d"}


class PipelineError(HFPruneError):
    """An order, format or setting the pipeline cannot run."""


# ----------------------------------------------------------------------------------------------
# orders
# ----------------------------------------------------------------------------------------------


def parse_order(text: str) -> str:
    """'pqd', 'P→Q→D', 'prune,quantize,distill', 'q-p-d' … → canonical letters ('pqd'). Each stage at
    most once, at least one; anything else is a one-sentence :class:`PipelineError`."""
    raw = str(text or "").strip().lower()
    for sep in ("→", "->", ">", ",", "-", "+", "/", " "):
        raw = raw.replace(sep, " ")
    parts = raw.split()
    if len(parts) == 1 and parts[0] not in _WORDS:  # letters run together: "pqd"
        parts = list(parts[0])
    letters = [_WORDS.get(p) for p in parts]
    if not parts or None in letters or len(set(letters)) != len(letters):
        raise PipelineError(f"Unknown order '{text}': give the stages p (prune), q (quantize) and d (distill) in the "
                            f"order they run, each at most once, e.g. pqd; the six full orders are "
                            f"{', '.join(ALL_ORDERS)}.")
    return "".join(letters)  # type: ignore[arg-type]


def describe_order(order: str) -> str:
    """'prune → quantize → distill' for 'pqd'."""
    return " → ".join(STAGES[s] for s in parse_order(order))


def row_label(order: str) -> str:
    """How a table names a row: 'pqd: prune → quantize → distill', 'p: prune only (fp32, one-shot)' …"""
    if not order:
        return "dense fp32"
    special = {"p": "prune only (fp32, one-shot)", "q": "quantize only (post-training)",
               "pq": "prune → quantize (post-training)"}
    return f"{order}: {special.get(order) or describe_order(order)}"


# ----------------------------------------------------------------------------------------------
# formats: fake quantisation (QAT) and the real conversion
# ----------------------------------------------------------------------------------------------


def check_format(name: str, device: str | torch.device = "cpu") -> Format:
    """The format, or one sentence saying why it cannot run here (unknown, no GPU, backend missing)."""
    if name not in FORMATS:
        raise PipelineError(f"Unknown format '{name}'; choose one of: {', '.join(FORMATS)}.")
    fmt = FORMATS[name]
    if fmt.gguf:  # fake quantisation runs anywhere; the file is measured by llama.cpp (checked when measuring)
        return fmt
    if fmt.cuda_only and not (torch.device(device).type == "cuda" and torch.cuda.is_available()):
        raise PipelineError(f"The {name} format needs a CUDA GPU (bitsandbytes' NF4 kernels), and this run is on "
                            f"{'a machine without one' if not torch.cuda.is_available() else 'the CPU'}; "
                            f"use int8-dynamic or int8-weight.")
    check_method(fmt.method, device)
    return fmt


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


@dataclass
class PipelineOptions(Options):
    """What the pipeline does. Calibration (scoring) text, widths, refit and the training budget have
    their own option groups (CalibrationOptions, AllocationOptions, CompensationOptions, TrainOptions)."""

    error = PipelineError

    order: str = knob("pqd", "stage order: p (prune), q (quantize), d (distill), e.g. pqd; subsets allowed")
    ratio: float = knob(0.2, "fraction of MLP neurons removed", low=0.0, high=1.0, high_open=True, ui_high=0.9)
    criterion: str = knob("entropy", "importance criterion", choices=tuple(REGISTRY))
    allocation: str = knob("uniform", "how widths are spread over layers", choices=ALLOCATIONS)
    round_to: int = knob(32, "round kept widths to a multiple of this (INT8 kernels like multiples of 16; the GGUF "
                         "formats need multiples of their block of 32)", low=1, ui_high=128)
    quant: str = knob("int8-dynamic", f"final number format: {', '.join(FORMATS)}")
    params: str = knob("full", "what trains in the distil stage: full (every parameter) or mlp (MLP projections)",
                       choices=("full", "mlp"))
    heldout_windows: int = knob_like(HeldoutWindows, "heldout_windows")  # the distil stage's (its length: seq_len)

    def validate(self) -> None:
        super().validate()
        object.__setattr__(self, "order", parse_order(self.order))
        check_ratio(self.ratio)
        if self.quant not in FORMATS:  # not argparse choices: a bad format is one sentence like a bad order
            raise PipelineError(f"Unknown format '{self.quant}'; choose one of: {', '.join(FORMATS)}.")
        block = FORMATS[self.quant].block
        if "p" in self.order and self.round_to % block:
            raise PipelineError(f"The {self.quant} format stores rows in blocks of {block}, so pruned widths must be "
                                f"multiples of {block}, and --round-to {self.round_to} is not: use --round-to {block} "
                                "(or a multiple).")


@dataclass
class MeasureOptions(Options):
    """What is measured on the final model (and on the dense model for the speed-ups)."""

    error = PipelineError

    eval_windows: int = knob(8, "evaluation windows for perplexity and KL to the dense model", low=1, ui_high=64)
    eval_seq_len: int = knob(128, "tokens per evaluation window", low=8, ui_high=1024, step=8)
    prefill_tokens: int = knob(512, "prefill latency: one forward of 1 × this many tokens", low=1, ui_high=2048)
    decode_tokens: int = knob(32, "decode speed: greedy tokens with KV cache", low=1, ui_high=256)
    speed_repeats: int = knob(3, "timed repeats of prefill and decode (more until the spread is known, up to 3×)",
                              low=1, ui_high=20)
    zeroshot_limit: int = knob(40, "items per shipped zero-shot task (0 = skip zero-shot)", low=0, ui_high=1000)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


Event = Callable[[dict], None]


@dataclass
class PipelineResult:
    """The final model (real format, or fp32 when the order has no ``q``), the record of every stage,
    the measured row, and the export folder (None when not exported)."""

    model: nn.Module
    record: dict
    row: dict
    out: Path | None = None


@dataclass
class Shared:
    """What several pipeline runs on one dense model share (the ablation): the dense model's evaluation
    reference, its measured row, and scores per student state."""

    reference: Reference | None = None
    dense_row: dict | None = None
    scores: dict[str, ScoreResult] = field(default_factory=dict)
    gguf_dir: Path | None = None  # where the dense GGUF baselines are written (GGUF formats); None: a temporary one
    gguf_dense: dict[str, Path] = field(default_factory=dict)  # GGUF type → the dense model's file


def settings_key(record: dict) -> str:
    """A short hash of everything that defines a row except its order (rows of one ablation share it)."""
    text = json.dumps({k: v for k, v in record.items() if k != "order"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _settings(loaded: LoadedModel, options: PipelineOptions, calibration: CalibrationOptions,
              allocation: AllocationOptions, compensation: CompensationOptions, train_options: TrainOptions,
              distill: DistillOptions, measure: MeasureOptions) -> dict:
    return {"model": loaded.spec, "pipeline": options.to_dict(), "calibration": calibration.to_dict(),
            "allocation_options": allocation.to_dict(), "compensation": compensation.to_dict(),
            "train": train_options.to_dict(), "distill": distill.to_dict(), "measure": measure.to_dict(),
            "order": options.order}


def _with_defaults(calibration: CalibrationOptions | None, allocation: AllocationOptions | None,
                   compensation: CompensationOptions | None, train_options: TrainOptions | None,
                   distill: DistillOptions | None, measure: MeasureOptions | None) -> tuple:
    """The option groups a pipeline run reads, each group's defaults where None (training: 1 minute)."""
    return (calibration or CalibrationOptions(), allocation or AllocationOptions(),
            compensation or CompensationOptions(), train_options or TrainOptions(minutes=1.0),
            distill or DistillOptions(), measure or MeasureOptions())


def run_pipeline(loaded: LoadedModel, options: PipelineOptions | None = None, *,
                 calibration: CalibrationOptions | None = None, allocation: AllocationOptions | None = None,
                 compensation: CompensationOptions | None = None, train_options: TrainOptions | None = None,
                 distill: DistillOptions | None = None, measure: MeasureOptions | None = None,
                 out: str | Path | None = None, export_mode: str | None = None, measure_result: bool = True,
                 shared: Shared | None = None, stop: Callable[[], bool] | None = None,
                 on_event: Event | None = None, on_step: Callable[[StepRecord], None] | None = None,
                 progress: bool = False, **fields) -> PipelineResult:
    """Run ``options.order`` on a copy of ``loaded.model`` (the dense model is never changed and is the
    teacher), convert, export to ``out`` (when given) and measure. ``fields`` override PipelineOptions
    fields (``run_pipeline(loaded, order="qpd", ratio=0.3)``). Every option is validated, the format
    checked against the device and ``out`` checked before any model work; Stop (:class:`Stopped`)
    leaves nothing written."""
    options = (options or PipelineOptions()).replace(**fields) if fields else (options or PipelineOptions())
    calibration, allocation, compensation, train_options, distill, measure = _with_defaults(
        calibration, allocation, compensation, train_options, distill, measure)
    own_shared = shared is None
    shared = shared or Shared()
    device = next(loaded.model.parameters()).device
    fmt = check_format(options.quant, device) if "q" in options.order else None
    gguf_type = gguf_type_of(options)
    if quantization_of(loaded.model) or fake_format(loaded.model):
        raise PipelineError("The pipeline starts from an unquantized model; load the fp32 (or pruned fp32) model.")
    if gguf_type:
        check_gguf_model(loaded, gguf_type, measure_result)
    if measure_result:
        check_lengths(loaded, measure)
    if out is not None:
        check_output_dir(out)
    try:
        return _run(loaded, options, fmt, gguf_type, calibration, allocation, compensation, train_options, distill,
                    measure, out, export_mode, measure_result, shared, stop, on_event, on_step, progress)
    finally:
        if own_shared and shared.gguf_dir is not None:  # this call's dense GGUF baselines
            shutil.rmtree(shared.gguf_dir, ignore_errors=True)


def _run(loaded: LoadedModel, options: PipelineOptions, fmt: Format | None, gguf_type: str | None,
         calibration: CalibrationOptions, allocation: AllocationOptions, compensation: CompensationOptions,
         train_options: TrainOptions, distill: DistillOptions, measure: MeasureOptions, out, export_mode: str | None,
         measure_result: bool, shared: Shared, stop, on_event: Event | None, on_step, progress: bool
         ) -> PipelineResult:
    """:func:`run_pipeline` after its checks: the stages, the conversion, the export and the measurement."""
    emit = on_event or (lambda _event: None)
    device = next(loaded.model.parameters()).device
    record: dict = {"settings": _settings(loaded, options, calibration, allocation, compensation, train_options,
                                          distill, measure), "stages": [], "tool_version": __version__}
    record["settings_key"] = settings_key(record["settings"])
    record["order"] = options.order
    record["format"] = fmt.name if fmt else "fp32"
    if gguf_type:
        record["gguf_type"] = gguf_type
    student, prune_meta = _stages(loaded, options, fmt, calibration, allocation, compensation, train_options, distill,
                                  shared, record, emit, stop, on_step, progress)
    check_stop(stop, "The pipeline was stopped before the export; nothing was written.")
    unfake(student)  # the trained floating-point weights: what is exported and what the backend converts
    student.eval()
    record["widths"] = mlp_widths(student)
    final = student
    target = None
    scratch = None  # a GGUF format measured without --out: the file lives in a temporary folder
    if out is not None:
        emit({"stage": "export", "state": "start", "order": options.order})
        target = export(student, loaded, fmt, out, prune_meta, record, mode=export_mode, gguf_type=gguf_type)
        if fmt is not None and not fmt.gguf:
            final = load_on(str(target), device).model  # the reload applies the recipe: the export is what is measured
    elif gguf_type and measure_result:
        scratch = tempfile.TemporaryDirectory(prefix="hfprune-pipeline-")
    elif fmt is not None and not fmt.gguf:
        final = quantize_model(student, fmt.method)
    row: dict = {}
    try:
        measured = target if scratch is None else export(student, loaded, fmt, Path(scratch.name) / "run", prune_meta,
                                                         record, gguf_type=gguf_type)
        if fmt is not None and fmt.gguf:
            final = fake_quantize(student, fmt)  # computes what the file holds
        if measure_result:
            emit({"stage": "measure", "state": "start", "order": options.order})
            if gguf_type:
                rows = measure_gguf({"run": gguf_path(measured)}, loaded, measure, shared, stop=stop)
                row = rows["run"]
                if shared.dense_row is None:
                    shared.dense_row = rows["dense F16"]
            else:
                row = measure_model(final, loaded, measure, shared, disk_folder=target, stop=stop,
                                    dense_widths=mlp_widths(loaded.model))
            row.update(order=options.order, label=row_label(options.order), format=record["format"],
                       stages=[{k: v for k, v in s.items() if k not in ("curve", "widths")} for s in record["stages"]])
            if target is not None:
                write_json(target / RESULT_FILE, {"record": record, "row": row}, default=str)
    except BaseException:
        if target is not None:  # a measurement that did not finish leaves no half-described export
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        if scratch is not None:
            scratch.cleanup()
    emit({"stage": "measure", "state": "done", "order": options.order, "row": row})
    return PipelineResult(final, record, row, target)


def _stages(loaded: LoadedModel, options: PipelineOptions, fmt: Format | None, calibration: CalibrationOptions,
            allocation: AllocationOptions, compensation: CompensationOptions, train_options: TrainOptions,
            distill: DistillOptions, shared: Shared, record: dict, emit: Event, stop, on_step, progress: bool
            ) -> tuple[nn.Module, dict | None]:
    """Run the order's stages on a copy of the dense model (each stage's entry appended to ``record``);
    returns (the student, the prune stage's meta or None)."""
    student = copy.deepcopy(loaded.model)
    student.eval()
    touched = False  # the student differs from the dense model
    prefix = ""  # the stages that changed the student so far (the scores' cache key)
    prune_meta: dict | None = None
    for stage in options.order:
        check_stop(stop, f"The pipeline was stopped before its {STAGES[stage]} stage; nothing was written.")
        start = time.perf_counter()
        emit({"stage": STAGES[stage], "state": "start", "order": options.order})
        entry: dict = {"stage": STAGES[stage]}
        if stage == "p":
            student, prune_meta = _prune(loaded, student, options, calibration, allocation, compensation, shared,
                                         prefix, stop, progress)
            entry.update({"widths": prune_meta["intermediate_sizes"], "achieved_ratio": prune_meta["achieved_ratio"],
                          "scored": "fake-quantised model" if fake_format(student) else "fp32 model",
                          "scores_cached": prune_meta.pop("_scores_cached", False)})
            touched = True
        elif stage == "q":
            fake_quantize(student, fmt)
            entry["format"] = fmt.name
            touched = True
        else:
            if not touched:
                entry.update({"skipped": "the student is still the dense model: KL to it and its gradient are 0"})
            else:
                entry.update(_distill(loaded, student, options, calibration, train_options, distill, stop, on_step,
                                      progress))
        entry["seconds"] = round(time.perf_counter() - start, 2)
        record["stages"].append(entry)
        prefix += stage if not entry.get("skipped") else ""
        emit({"stage": STAGES[stage], "state": "done", "order": options.order, "entry": entry})
    return student, prune_meta


RESULT_FILE = "pipeline_result.json"


def _prune(loaded: LoadedModel, student: nn.Module, options: PipelineOptions, calibration: CalibrationOptions,
           allocation: AllocationOptions, compensation: CompensationOptions, shared: Shared, prefix: str,
           stop, progress: bool) -> tuple[nn.Module, dict]:
    """Score the current student (fake-quantised or not), prune it; a fake-quantised student comes back
    fake-quantised in the same format."""
    fmt_name = fake_format(student)
    view = LoadedModel(model=student, tokenizer=loaded.tokenizer, spec=loaded.spec, path=loaded.path)
    key = f"{prefix}|{options.criterion}|{json.dumps(calibration.to_dict(), sort_keys=True)}"
    cached = key in shared.scores and "d" not in prefix  # a distilled student is never the same twice
    if cached:
        scores = shared.scores[key]
    else:
        scores = score_model(view, options.criterion, **calibration.to_dict(), progress=progress, stop=stop)
        shared.scores[key] = scores
    pruned = prune_with_scores(view, scores, options.ratio, allocation=options.allocation, round_to=options.round_to,
                               options=allocation, progress=progress, stop=stop, compensation=compensation)
    model = pruned.model
    if fmt_name:  # slicing made plain linears of the MLP projections: back into the format
        unfake(model)
        fake_quantize(model, FORMATS[fmt_name])
    meta = dict(pruned.meta)
    meta["_scores_cached"] = cached
    return model, meta


def _distill(loaded: LoadedModel, student: nn.Module, options: PipelineOptions, calibration: CalibrationOptions,
             train_options: TrainOptions, distill: DistillOptions, stop, on_step, progress: bool) -> dict:
    """Train the student (in place) against the dense model; returns the stage's record."""
    text = TrainingText(source=calibration.source, seq_len=calibration.seq_len,
                        heldout_windows=options.heldout_windows, heldout_seq_len=calibration.seq_len)
    windows, heldout = text.windows(loaded.tokenizer, train_options.seed, max_length=loaded.max_length,
                                    min_windows=train_options.batch_size)
    params = param_set(student, options.params)
    result = train(student, loaded.model, LogitDistillation(distill), windows, params, train_options,
                   heldout=heldout if options.heldout_windows else None, stop=stop, on_step=on_step,
                   progress=progress)
    student.eval()
    return {"qat": bool(fake_format(student)), "params": options.params, "trainable_params": result.trainable_params,
            "steps": result.steps, "tokens_seen": result.tokens, "train_seconds": round(result.seconds, 2),
            "ended_by": result.ended_by, "heldout_kl_before": result.initial_heldout,
            "heldout_kl_after": result.final_heldout, "best_step": result.best_step,
            "curve": [{k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in p.items()}
                      for p in result.curve]}


def export(model: nn.Module, loaded: LoadedModel, fmt: Format | None, out: str | Path, prune_meta: dict | None,
           record: dict, mode: str | None = None, gguf_type: str | None = None) -> Path:
    """Write the (unfaked, floating-point) model: weights + tokenizer + pruning_meta.json with the pipeline
    record, plus the format's recipe (``core.quant_store.save_quantized``) when there is one; with
    ``gguf_type`` one .gguf file of that type (+ pruning_meta.json) instead, quantised from these weights."""
    meta = dict(prune_meta or {"model": loaded.spec, "original_intermediate_sizes": mlp_widths(loaded.model)})
    meta["pipeline"] = {k: v for k, v in record.items()}
    if gguf_type:
        return save_pruned(model, loaded.tokenizer, out, meta, mode="gguf", gguf=GGUFOptions(type=gguf_type))
    mode = mode or default_export_mode(mlp_widths(model))[0]
    if fmt is None:
        return save_pruned(model, loaded.tokenizer, out, meta, mode=mode)
    storage = "int8" if fmt.method in INT8_METHODS else "source"  # INT8 formats: integer weights on disk
    return save_quantized(model, loaded.tokenizer, fmt.method, out, meta=meta, mode=mode, storage=storage,
                          extra={"pipeline_order": record["order"], "format": fmt.name})


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------


def measure_model(model: nn.Module, loaded: LoadedModel, options: MeasureOptions, shared: Shared, *,
                  disk_folder: Path | None = None, stop=None, dense_widths: list[int] | None = None) -> dict:
    """Perplexity and KL to the dense model on evaluation windows, measured prefill / decode speed and
    peak memory (speed-ups against the dense model's row in ``shared``, measured first when missing),
    size on disk, and both shipped zero-shot tasks."""
    if shared.reference is None:
        windows = evaluation_windows(loaded.tokenizer, "wiki", options.eval_windows, options.eval_seq_len,
                                     max_length=loaded.max_length)
        shared.reference = Reference(loaded.model, windows, batch_size=4)
    if shared.dense_row is None and model is not loaded.model:
        shared.dense_row = measure_model(loaded.model, loaded, options, shared, stop=stop)
        shared.dense_row.update(order="", label="dense fp32", format="fp32")
    if disk_folder is None and model is loaded.model and loaded.path and Path(loaded.path).is_dir():
        disk_folder = Path(loaded.path)  # the dense model's own folder
    ev = evaluate(model, shared.reference.windows, shared.reference, batch_size=4, progress=False, stop=stop)
    speed = measure_speed(model, loaded.tokenizer, prefill_tokens=options.prefill_tokens,
                          decode_tokens=options.decode_tokens, repeats=options.speed_repeats,
                          max_repeats=3 * options.speed_repeats, stop=stop)
    row = {"perplexity": ev.perplexity, "kl_to_dense": ev.kl_to_reference, "top1_agreement": ev.top1_agreement,
           "params": ev.params, "weight_bytes": speed.weight_bytes, "peak_memory_bytes": speed.peak_memory_bytes,
           "prefill_ms": speed.prefill_ms, "prefill_ms_all": speed.prefill_ms_all,
           "decode_tokens_per_s": speed.decode_tokens_per_s, "decode_ms_all": speed.decode_ms_all,
           "speed_device": speed.device, "eval_tokens": ev.tokens,
           "load_average": round(os.getloadavg()[0], 2),  # other work on the machine while timing
           "disk_bytes": folder_bytes(disk_folder) if disk_folder is not None else None,
           "storage": _storage(disk_folder)}
    widths = mlp_widths_of(model)
    if dense_widths:
        dense_flops = forward_flops_per_token(model, options.prefill_tokens, widths=list(dense_widths))
        row["ideal_speedup"] = dense_flops / forward_flops_per_token(model, options.prefill_tokens, widths=widths)
    if shared.dense_row is not None:
        base = shared.dense_row
        for phase, key in (("prefill", "prefill_ms_all"), ("decode", "decode_ms_all")):
            up: SpeedUp = speedup(spread(base[key]), spread(row[key]))
            row[f"{phase}_speedup"] = up.median
            row[f"{phase}_speedup_interval"] = [up.low, up.high]
    if options.zeroshot_limit > 0:
        check_stop(stop, "The pipeline was stopped before the zero-shot tasks.")
        zs = run_zeroshot(model, loaded.tokenizer, list(DEFAULT_TASKS), limit=options.zeroshot_limit, progress=False)
        for task, entry in zs["tasks"].items():
            row[f"{task}_acc"] = entry.get("acc")
            row[f"{task}_n"] = entry.get("n")
    return row


def gguf_type_of(options: PipelineOptions) -> str | None:
    """The GGUF type a run writes: its format's for a GGUF format with a ``q`` stage, F16 for a GGUF format's
    order without ``q`` (its float baseline in llama.cpp), None for the torch formats."""
    fmt = FORMATS[options.quant]
    if not fmt.gguf:
        return None
    return fmt.gguf if "q" in options.order else "f16"


def check_gguf_model(loaded: LoadedModel, gguf_type: str, measuring: bool) -> None:
    """Before any work, one sentence if the model cannot become a GGUF file of ``gguf_type`` (architecture,
    a row that does not fill the blocks) or, when ``measuring``, llama.cpp is missing."""
    kind = getattr(loaded.model.config, "model_type", "")
    if kind not in ARCHITECTURES:
        raise PipelineError(f"The GGUF formats write llama.cpp files for {', '.join(sorted(ARCHITECTURES))} models; "
                            f"this one is '{kind}': choose int8-dynamic or int8-weight.")
    check_block_rows(loaded.model, gguf_type)
    if measuring:
        llama_cpp_binding()  # missing: the install sentence (LlamaCppMissing)


def gguf_path(folder: Path) -> Path:
    """The .gguf file of a GGUF export folder."""
    return next(Path(folder).glob("*.gguf"))


def dense_gguf_file(loaded: LoadedModel, gguf_type: str, shared: Shared) -> Path:
    """The dense model as a GGUF of ``gguf_type``, written once into ``shared.gguf_dir`` (a temporary folder
    when None) and reused."""
    if gguf_type not in shared.gguf_dense:
        if shared.gguf_dir is None:
            shared.gguf_dir = Path(tempfile.mkdtemp(prefix="hfprune-dense-gguf-"))
        shared.gguf_dir.mkdir(parents=True, exist_ok=True)
        path = shared.gguf_dir / f"dense-{gguf_type.upper()}.gguf"
        if not path.is_file():
            save_gguf(loaded.model, loaded.tokenizer, path, GGUFOptions(type=gguf_type), source=loaded.spec,
                      name="dense")
        shared.gguf_dense[gguf_type] = path
    return shared.gguf_dense[gguf_type]


def llamacpp_options(options: MeasureOptions) -> LlamaCppOptions:
    """The llama.cpp measurement that matches ``options``: prompt = prefill tokens, generation = decode tokens,
    the same repeats, evaluation windows and window length."""
    return LlamaCppOptions(prompt_tokens=options.prefill_tokens, gen_tokens=options.decode_tokens,
                           repeats=options.speed_repeats, windows=options.eval_windows, seq_len=options.eval_seq_len)


def measure_gguf(files: dict[str, Path], loaded: LoadedModel, options: MeasureOptions, shared: Shared, *,
                 stop=None) -> dict[str, dict]:
    """Rows of GGUF ``files`` (name → .gguf) measured in llama.cpp in one interleaved run beside the dense
    model written as F16 ('dense F16', the reference for speed-ups and KL) and in each other type the files
    hold ('dense Q4_0' …): name → row with the ablation table's keys (prefill = prompt of
    ``prefill_tokens``, decode = generated tokens/s, speed-ups over dense F16, ``ideal_speedup`` = the
    pruning's FLOP ratio from the files) and ``*_speedup_same_format`` over the dense file of the row's
    own type."""
    types = {str(read_gguf_type(path)) for path in files.values()} | {"f16"}
    dense = {f"dense {t.upper()}": dense_gguf_file(loaded, t, shared) for t in ["f16", *sorted(types - {"f16"})]}
    paths = {**dense, **files}
    counts = {name: gguf_counts(path) for name, path in paths.items()}
    rows = measure_llamacpp(paths, llamacpp_options(options), reference="dense F16", tokenizer=loaded.tokenizer,
                            stop=stop)
    by = {r["model"]: r for r in rows}
    context = options.prefill_tokens // 2
    out = {}
    for name, r in by.items():
        kind = read_gguf_type(paths[name])
        same = by[f"dense {kind.upper()}"]
        row = {"engine": "llama.cpp", "gguf_file": str(paths[name]), "gguf_type": kind, "widths": r["widths"],
               "tensor_types": r["tensor_types"], "params": r["params"], "disk_bytes": r["file_bytes"],
               "weight_bytes": r["file_bytes"], "storage": f"gguf {kind.upper()}",
               "prompt_tokens_per_s": r["prompt_tokens_per_s"], "gen_tokens_per_s": r["gen_tokens_per_s"],
               "prefill_ms": 1000 * options.prefill_tokens / r["prompt_tokens_per_s"],
               "prefill_ms_all": [1000 * t for t in r["prompt_s_all"]],
               "decode_tokens_per_s": r["gen_tokens_per_s"], "decode_ms_all": [1000 * t for t in r["gen_s_all"]],
               "ideal_speedup": counts["dense F16"].flops_per_token(context) / counts[name].flops_per_token(context),
               "perplexity": r.get("perplexity"), "kl_to_dense": r.get("kl_to_reference"),
               "top1_agreement": r.get("top1_agreement"), "eval_tokens": r.get("tokens"),
               "threads": r["threads"], "load_average": round(os.getloadavg()[0], 2)}
        for phase, key in (("prefill", "prompt_s_all"), ("decode", "gen_s_all")):
            if name != "dense F16":
                up = speedup(spread(by["dense F16"][key]), spread(r[key]))
                row[f"{phase}_speedup"], row[f"{phase}_speedup_interval"] = up.median, [up.low, up.high]
            if same is not r:
                up = speedup(spread(same[key]), spread(r[key]))
                row[f"{phase}_speedup_same_format"] = up.median
                row[f"{phase}_speedup_same_format_interval"] = [up.low, up.high]
        out[name] = row
    out["dense F16"].update(order="", label="dense F16 (llama.cpp)", format="f16")
    return out


def read_gguf_type(path: Path) -> str:
    """The GGUF type a file was written as ('f16', 'q4_0' …), from its ``general.file_type``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    kind = gguf.LlamaFileType(int(field.contents())).name if field is not None else "MOSTLY_F16"
    return {"ALL_F32": "f32", "MOSTLY_F16": "f16"}.get(kind, kind.removeprefix("MOSTLY_").lower())


def _storage(folder: Path | None) -> str | None:
    """What the exported folder holds: 'int8' / 'source' (a quantized folder's recipe), 'fp32', or None."""
    if folder is None:
        return None
    recipe = read_recipe(folder)
    return recipe.get("storage", "source") if recipe else "fp32"


def check_lengths(loaded: LoadedModel, options: MeasureOptions) -> None:
    """The measurement windows must fit the model's context (checked before any work)."""
    limit = loaded.max_length
    longest = max(options.prefill_tokens, options.eval_seq_len, 128 + options.decode_tokens)
    if longest > limit:
        raise PipelineError(f"The measurement needs {longest}-token inputs (prefill {options.prefill_tokens}, "
                            f"evaluation {options.eval_seq_len}, decode 128 + {options.decode_tokens}) but the model's "
                            f"context is {limit} tokens; lower --prefill-tokens / --eval-seq-len / --decode-tokens.")


def mlp_widths_of(model: nn.Module) -> list[int]:
    """MLP widths of a plain, fake-quantised or converted model."""
    return mlp_widths_any(model)


# ----------------------------------------------------------------------------------------------
# the ablation
# ----------------------------------------------------------------------------------------------


@dataclass
class AblationResult:
    rows: list[dict]
    table: str
    settings_key: str


def run_ablation(loaded: LoadedModel, options: PipelineOptions | None = None, *, out_root: str | Path,
                 orders: tuple[str, ...] = ALL_ORDERS, baselines: tuple[str, ...] = ("p", "q"), store=None,
                 calibration: CalibrationOptions | None = None, allocation: AllocationOptions | None = None,
                 compensation: CompensationOptions | None = None, train_options: TrainOptions | None = None,
                 distill: DistillOptions | None = None, measure: MeasureOptions | None = None,
                 stop: Callable[[], bool] | None = None, on_event: Event | None = None,
                 on_row: Callable[[dict], None] | None = None, progress: bool = False) -> AblationResult:
    """Every order in ``orders`` (default: the six) plus the baselines (dense fp32 always; ``p`` =
    one-shot pruned fp32, ``q`` = dense post-training quantised) at the same settings and budget.

    Each finished row is stored as a run (kind ``pipeline``) in ``store`` (a :class:`core.runs.RunStore`)
    and its model exported to ``out_root/<order>``; a rerun with the same settings reuses the stored
    rows and only runs the missing ones (resumable). ``on_row`` receives each row as it is ready."""
    options = options or PipelineOptions()
    calibration, allocation, compensation, train_options, distill, measure = _with_defaults(
        calibration, allocation, compensation, train_options, distill, measure)
    store = store or RunStore()
    todo = [parse_order(o) for o in orders]
    extra = [parse_order(b) for b in baselines if parse_order(b) not in todo]
    device = next(loaded.model.parameters()).device
    if any("q" in o for o in todo + extra):
        check_format(options.quant, device)
    check_lengths(loaded, measure)
    root = Path(out_root).expanduser()
    if not root.parent.exists():
        raise PipelineError(f"Parent folder {root.parent} of the ablation folder does not exist.")
    root.mkdir(exist_ok=True)
    settings = _settings(loaded, options, calibration, allocation, compensation, train_options, distill, measure)
    key = settings_key(settings)
    gguf = bool(FORMATS[options.quant].gguf)
    shared = Shared(gguf_dir=root / "dense-gguf" if gguf else None)
    rows: list[dict] = []
    emit = on_event or (lambda _event: None)

    def stored(order: str):
        return store.find("pipeline", {"settings_key": key, "order": order})

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    dense_run = stored("")
    if dense_run is not None:
        shared.dense_row = dict(dense_run.results["row"])
    for order in ["", *extra, *todo]:
        check_stop(stop, f"The ablation was stopped; {len(rows)} finished rows are stored.")
        run = stored(order)
        if run is not None:
            row = dict(run.results["row"], run_id=run.run_id, resumed=True)
            emit({"stage": "row", "state": "resumed", "order": order})
            add(row)
            continue
        emit({"stage": "row", "state": "start", "order": order or "dense"})
        if order == "" and gguf:  # llama.cpp: the dense model written F16 (and in the format, for the file)
            check_gguf_model(loaded, FORMATS[options.quant].gguf, True)
            row = measure_gguf({}, loaded, measure, shared, stop=stop)["dense F16"]
            shared.dense_row = row
            record: dict = {"order": "", "stages": []}
        elif order == "":
            row = measure_model(loaded.model, loaded, measure, shared, stop=stop)
            row.update(order="", label="dense fp32", format="fp32")
            shared.dense_row = row
            record = {"order": "", "stages": []}
        else:
            folder = root / f"{order}-{key[:8]}"
            if folder.exists():
                raise PipelineError(f"{folder} exists but no stored run belongs to it (an earlier ablation was killed "
                                    "while measuring); remove the folder and run the ablation again.")
            result = run_pipeline(loaded, options.replace(order=order), calibration=calibration,
                                  allocation=allocation, compensation=compensation, train_options=train_options,
                                  distill=distill, measure=measure, out=folder, shared=shared, stop=stop,
                                  on_event=on_event, progress=progress)
            row, record = dict(result.row), result.record
            row["out"] = str(result.out)
        run = store.create("pipeline", {"settings_key": key, "order": order, "settings": settings,
                                        "model": loaded.spec},
                           results={"row": row, "record": {k: v for k, v in record.items() if k != "settings"}})
        add(dict(row, run_id=run.run_id, resumed=False))
    return AblationResult(rows, ablation_table(rows), key)


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def ablation_table(rows: list[dict]) -> str:
    """Markdown: one row per order (dense and baselines first) with size on disk, measured speed-ups
    (median and quartile interval) beside the FLOP ideal, peak memory, perplexity, KL to dense and the
    two shipped zero-shot accuracies."""
    head = ["order", "format", "params (M)", "disk (MB)", "weights in memory (MB)", "prefill 1×512 (ms)",
            "prefill speed-up", "decode (tok/s)", "decode speed-up", "FLOP ideal", "peak mem (MB)", "perplexity",
            "KL to dense", "wiki_cloze acc", "wiki_nextsent acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    def up(r: dict, phase: str) -> str:
        value, interval = r.get(f"{phase}_speedup"), r.get(f"{phase}_speedup_interval")
        if value is None:
            return "1.00× (baseline)" if r.get("order") == "" else "–"
        return f"{value:.2f}× ({interval[0]:.2f}–{interval[1]:.2f})"

    for r in rows:
        lines.append("| " + " | ".join([
            row_label(r.get("order") or "") if r.get("order") else r.get("label") or row_label(""),
            r.get("format", ""), _fmt(r.get("params", 0) / 1e6, ".1f"),
            _fmt(r["disk_bytes"] / 1e6 if r.get("disk_bytes") else None, ".0f"),
            _fmt(r.get("weight_bytes", 0) / 1e6, ".0f"), _fmt(r.get("prefill_ms"), ".0f"), up(r, "prefill"),
            _fmt(r.get("decode_tokens_per_s"), ".1f"), up(r, "decode"), _fmt(r.get("ideal_speedup"), ".2f"),
            _fmt(r["peak_memory_bytes"] / 1e6 if r.get("peak_memory_bytes") else None, ".0f"),
            _fmt(r.get("perplexity"), ".2f"),
            _fmt(r.get("kl_to_dense"), ".4f"), _fmt(r.get("wiki_cloze_acc"), ".2f"),
            _fmt(r.get("wiki_nextsent_acc"), ".2f")]) + " |")
    return "\n".join(lines)


def ablation_plot(rows: list[dict], path: str | Path) -> Path:
    """One PNG: KL to dense (left) and measured prefill / decode speed-ups with the FLOP ideal (right),
    one bar group per row (matplotlib, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.get("order") or "dense" for r in rows]
    x = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.bar(x, [r.get("kl_to_dense") or 0.0 for r in rows], color="#4C72B0")
    left.set_xticks(x, labels)
    left.set_ylabel("KL(p_dense ‖ p) per token (nats)")
    left.set_title("Fidelity to the dense model (lower is better)")
    width = 0.38
    pre = [r.get("prefill_speedup") or 1.0 for r in rows]
    dec = [r.get("decode_speedup") or 1.0 for r in rows]
    right.bar([i - width / 2 for i in x], pre, width, label="prefill 1×512", color="#55A868")
    right.bar([i + width / 2 for i in x], dec, width, label="decode", color="#C44E52")
    right.scatter(x, [r.get("ideal_speedup") or 1.0 for r in rows], marker="_", s=300, color="black",
                  label="FLOP ideal (pruning only)", zorder=3)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xticks(x, labels)
    right.set_ylabel("measured speed-up vs dense fp32")
    right.set_title("Measured CPU speed (higher is better)")
    right.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    with atomic_file(target) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return target


__all__ = ["ALL_ORDERS", "AblationResult", "MeasureOptions", "PipelineError", "PipelineOptions", "PipelineResult",
           "Shared", "ablation_plot", "ablation_table", "check_format", "describe_order", "parse_order", "row_label",
           "run_ablation", "run_pipeline", "Stopped"]
