"""CLI subcommand ``pipeline``: prune → quantize → distil in any order, export and measure; ``--ablation`` runs
all six orders at the same settings and budget.

    python -m core pipeline --model smollm2-135m --order pqd --ratio 0.2 --criterion entropy \
        --quant int8-dynamic --minutes 2 --out runs/pqd20
    python -m core pipeline --ratio 0.2 --quant int8-dynamic --steps 40 --out runs/ablation20 --ablation
    python -m core pipeline --order pqd --ratio 0.2 --quant gguf-q4_0 --steps 12 --out runs/pqd20-q4

With a GGUF format (gguf-q8_0 / gguf-q5_0 / gguf-q4_0) the export is one .gguf file of that type (plus
pruning_meta.json) and the row is measured in llama.cpp against the dense model written F16 and in the
same type (llama-cpp-python must be installed); widths are rounded to the format's block of 32.

A single run writes the exported model (weights + tokenizer + pruning_meta.json with the pipeline
record + quantization.json) and ``pipeline_result.json`` (the measured row) to ``--out``. The ablation
writes one folder per order under ``--out`` plus ``ablation.json``, ``ablation.md`` (the table) and
``ablation.png`` (the plot); its rows are stored as runs, so running the same command again only runs
the rows that are missing.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from core.data.text import CalibrationOptions
from core.export.hf import EXPORT_MODES, check_output_dir
from core.export.kquant import llama_cpp_binding
from core.files import write_json, write_text
from core.methods.pipeline import (
    ALL_ORDERS,
    MeasureOptions,
    PipelineError,
    PipelineOptions,
    ablation_plot,
    ablation_table,
    check_format,
    describe_order,
    run_ablation,
    run_pipeline,
)
from core.prune.allocate import AllocationOptions
from core.prune.compensate import CompensationOptions
from core.quantize.fake import FORMATS
from core.quantize.store import load_on
from core.train.loop import DistillOptions, TrainOptions


def register(sub) -> None:
    """Add the ``pipeline`` subcommand."""
    parser = sub.add_parser("pipeline", help="prune → quantize → distil (any order), export and measure; "
                                             "--ablation: all six orders")
    parser.add_argument("--model", default="smollm2-135m", help="the dense model: embedded alias, hub id or folder")
    PipelineOptions.add_arguments(parser)
    CalibrationOptions.add_arguments(parser)
    AllocationOptions.add_arguments(parser)
    CompensationOptions.add_arguments(parser)
    TrainOptions.add_arguments(parser, skip=("seed", "batch_size"))  # one --seed / --batch-size for both
    DistillOptions.add_arguments(parser)
    MeasureOptions.add_arguments(parser)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the pipeline runs and is measured (nf4 needs cuda; int8-dynamic is CPU only)")
    parser.add_argument("--export", choices=[m for m in EXPORT_MODES if m != "gguf"],
                        help="export mode (default: hf-native for equal widths, hf-remote-code otherwise)")
    parser.add_argument("--ablation", action="store_true",
                        help="run all six orders (plus the dense, prune-only and quantize-only baselines) at these "
                             "settings; --out is the ablation folder, rows already stored are reused")
    parser.add_argument("--out", required=True, help="output folder (single run: must not exist or be empty)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    parser.set_defaults(handler=cmd_pipeline)


def _options(args):
    """Every option group from the flags, validated before any model work."""
    options = PipelineOptions.from_args(args)
    calibration = CalibrationOptions.from_args(args)
    allocation = AllocationOptions.from_args(args)
    compensation = CompensationOptions.from_args(args)
    distill = DistillOptions.from_args(args)
    measure = MeasureOptions.from_args(args)
    given = {k: v for k, v in TrainOptions.given(args).items() if k not in ("seed", "batch_size")}
    needs_training = args.ablation or "d" in options.order
    if not needs_training and not any(given.get(k) for k in ("steps", "tokens", "minutes")):
        given["steps"] = 1  # no distil stage: the budget is never used
    train_options = TrainOptions(**given, seed=calibration.seed, batch_size=calibration.batch_size)
    return options, calibration, allocation, compensation, train_options, distill, measure


def cmd_pipeline(args) -> dict:
    options, calibration, allocation, compensation, train_options, distill, measure = _options(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for but this machine has no CUDA GPU; use --device cpu.")
    if args.ablation or "q" in options.order:
        check_format(options.quant, device)
    if FORMATS[options.quant].gguf:  # every row of a GGUF format is measured in llama.cpp: missing, one sentence
        llama_cpp_binding()
    out = Path(args.out).expanduser()
    if args.ablation:
        if out.exists() and not out.is_dir():
            raise PipelineError(f"{out} exists and is not a folder; choose the ablation folder.")
        if not out.parent.exists():
            raise PipelineError(f"Parent folder {out.parent} does not exist.")
    else:
        check_output_dir(out)
    loaded = load_on(args.model, device)
    say = (lambda _e: None) if args.quiet else _say
    groups = dict(calibration=calibration, allocation=allocation, compensation=compensation,
                  train_options=train_options, distill=distill, measure=measure)
    if args.ablation:
        result = run_ablation(loaded, options, out_root=out, on_event=say, progress=not args.quiet, **groups)
        write_json(out / "ablation.json", {"settings_key": result.settings_key, "rows": result.rows}, default=str)
        write_text(out / "ablation.md", result.table + "\n")
        plot = ablation_plot(result.rows, out / "ablation.png")
        return {"out": str(out), "orders": list(ALL_ORDERS), "rows": len(result.rows),
                "resumed": sum(1 for r in result.rows if r.get("resumed")), "table": str(out / "ablation.md"),
                "plot": str(plot), "settings_key": result.settings_key,
                "summary": [{k: r.get(k) for k in ("order", "format", "kl_to_dense", "perplexity", "prefill_speedup",
                                                   "decode_speedup", "disk_bytes")} for r in result.rows]}
    result = run_pipeline(loaded, options, out=out, export_mode=args.export, on_event=say, progress=not args.quiet,
                          **groups)
    return {"out": str(result.out), "order": options.order, "stages": describe_order(options.order),
            "format": result.record["format"], "widths": result.record["widths"],
            "record": [{k: v for k, v in s.items() if k != "curve"} for s in result.record["stages"]],
            "row": result.row, "table": ablation_table([result.row]) if result.row else ""}


def _say(event: dict) -> None:
    if event.get("state") in ("start", "resumed"):
        what = event.get("stage")
        order = event.get("order")
        print(f"[pipeline {order or 'dense'}] {what} {event['state']}", file=sys.stderr, flush=True)
