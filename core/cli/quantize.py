"""CLI subcommand ``quantize``: quantize a dense or pruned model and save weights + recipe.

    python -m core quantize --model smollm2-135m --method torchao-int8 --out runs/q8
"""
from __future__ import annotations

import copy
import time

import torch

from core.export.hf import check_output_dir
from core.models.counts import count_params, folder_bytes, weight_bytes
from core.quantize.backends import INT8_METHODS, METHODS, QuantizationError, check_method, quantize_model
from core.quantize.store import load_any, read_recipe, save_quantized, spec_folder


def register(sub) -> None:
    """Add the ``quantize`` subcommand."""
    q = sub.add_parser("quantize", help="quantize a dense or pruned model; save weights + recipe to a folder")
    q.add_argument("--model", default="smollm2-135m", help="embedded alias, hub id, model folder or .gguf file")
    q.add_argument("--method", required=True, choices=list(METHODS))
    q.add_argument("--storage", default="source", choices=("source", "int8"),
                   help="source: the float source weights, quantized on load; int8 (INT8 methods): the quantized "
                        "layers as int8 weights + scales, about as small on disk as in memory")
    q.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(handler=cmd_quantize)


def cmd_quantize(args) -> dict:
    check_method(args.method)
    if args.storage == "int8" and args.method not in INT8_METHODS:
        raise QuantizationError(f"--storage int8 needs an INT8 method ({', '.join(INT8_METHODS)}), not {args.method}.")
    check_output_dir(args.out)
    folder = spec_folder(args.model)
    if folder is not None and read_recipe(folder):
        raise QuantizationError(f"{args.model} is already a quantized folder ({read_recipe(folder)['method']}); "
                                f"quantize its unquantized source instead.")
    loaded = load_any(args.model)
    start = time.perf_counter()
    quantized = quantize_model(copy.deepcopy(loaded.model), args.method)
    seconds = time.perf_counter() - start
    probe = torch.arange(16).view(1, 16) % int(loaded.model.config.vocab_size)
    with torch.no_grad():
        logits = quantized(input_ids=probe.to(next(quantized.parameters()).device)).logits
    if not torch.isfinite(logits).all():
        raise QuantizationError(f"The {args.method} model produced non-finite logits; nothing was saved.")
    stats = {"source_weight_bytes": weight_bytes(loaded.model), "quantized_bytes": weight_bytes(quantized),
             **count_params(loaded.model)}
    target = save_quantized(loaded.model, loaded.tokenizer, args.method, args.out,
                            source=str(folder) if folder else args.model, extra=stats, storage=args.storage)
    return {"out": str(target), "method": args.method, "source": args.model, "quantize_seconds": round(seconds, 2),
            **stats, "compression": round(stats["source_weight_bytes"] / stats["quantized_bytes"], 3),
            "folder_bytes": folder_bytes(target),
            "storage": args.storage,
            "note": ("the folder stores the quantized layers as int8 weights + scales (quantized.safetensors) and "
                     "quantization.json" if args.storage == "int8" else "the folder stores the unquantized source "
                     "weights + quantization.json; the method is applied on load")}
