"""CLI subcommands ``quantize``, ``zeroshot`` and ``bench`` (registered through ``core.cli.EXTENSIONS``).

    python -m core quantize --model smollm2-135m --method torchao-int8 --out runs/q8
    python -m core zeroshot --model runs/q8 --limit 100
    python -m core bench --model runs/pruned20 --method bnb-nf4
"""
from __future__ import annotations

import copy
import time
from pathlib import Path


def register(sub) -> None:
    from .quantize import METHODS
    from .tasks import SHIPPED_TASKS

    q = sub.add_parser("quantize", help="quantize a dense or pruned model; save weights + recipe to a folder")
    q.add_argument("--model", default="smollm2-135m", help="embedded alias, hub id, model folder or .gguf file")
    q.add_argument("--method", required=True, choices=list(METHODS))
    q.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(handler=cmd_quantize)

    z = sub.add_parser("zeroshot", help="zero-shot accuracy with lm-eval (shipped offline tasks by default)")
    z.add_argument("--model", default="smollm2-135m", help="alias, folder (quantized folders too), .gguf or hub id")
    z.add_argument("--tasks", default=",".join(SHIPPED_TASKS),
                   help=f"comma-separated lm-eval task names (offline: {', '.join(SHIPPED_TASKS)}; hub tasks "
                        f"such as boolq,piqa,arc_easy need network)")
    z.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    z.add_argument("--batch-size", type=int, default=8)
    z.add_argument("--num-fewshot", type=int, default=0)
    z.add_argument("--method", choices=list(METHODS), help="quantize the model in memory first")
    z.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    z.add_argument("--json", action="store_true", help="print one JSON line")
    z.add_argument("--quiet", action="store_true")
    z.set_defaults(handler=cmd_zeroshot)

    b = sub.add_parser("bench", help="measured prefill latency, decode tokens/s, peak memory, size")
    b.add_argument("--model", default="smollm2-135m", help="alias, folder (quantized folders too), .gguf or hub id")
    b.add_argument("--method", choices=list(METHODS), help="quantize the model in memory first")
    b.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda")
    b.add_argument("--prefill", type=int, default=512, help="prefill tokens (batch 1)")
    b.add_argument("--decode", type=int, default=64, help="greedy decode steps with KV cache")
    b.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--baseline", default="auto",
                   help="dense model measured too for the measured speed-up: a spec, 'auto' (the source model of "
                        "a pruned folder) or 'none'")
    b.add_argument("--json", action="store_true", help="print one JSON line")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(handler=cmd_bench)


def _spec_folder(spec: str) -> Path | None:
    from .models import EMBEDDED, ensure_embedded

    if spec in EMBEDDED:
        return ensure_embedded(spec)
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def cmd_quantize(args) -> dict:
    import torch

    from .export import check_output_dir
    from .quantize import (QuantizationError, check_method, load_any, param_counts, quantize_model, read_recipe,
                           save_quantized, weight_bytes)

    check_method(args.method)
    check_output_dir(args.out)
    folder = _spec_folder(args.model)
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
             **param_counts(loaded.model)}
    target = save_quantized(loaded.model, loaded.tokenizer, args.method, args.out,
                            source=str(folder) if folder else args.model, extra=stats)
    from .quantize import folder_bytes

    return {"out": str(target), "method": args.method, "source": args.model, "quantize_seconds": round(seconds, 2),
            **stats, "compression": round(stats["source_weight_bytes"] / stats["quantized_bytes"], 3),
            "folder_bytes": folder_bytes(target),
            "note": "the folder stores the unquantized source weights + quantization.json; the method is applied on load"}


def _load_for(args, device):
    import torch

    from .quantize import load_any, quantize_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_any(args.model, dtype=dtype, device=device)
    if getattr(args, "method", None):
        quantize_model(loaded.model, args.method, device=device)
    return loaded


def cmd_zeroshot(args) -> dict:
    from .quantize import check_method, quantization_of
    from .speed import pick_device
    from .zeroshot import ZeroShotError, check_tasks, run_zeroshot

    tasks = check_tasks([t for t in args.tasks.split(",")])
    if args.limit is not None and args.limit < 1:
        raise ZeroShotError(f"--limit must be at least 1 item per task (got {args.limit}).")
    device = pick_device(args.device)
    if args.method:
        check_method(args.method, device)
    loaded = _load_for(args, device)
    result = run_zeroshot(loaded.model, loaded.tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                          num_fewshot=args.num_fewshot, progress=not args.quiet)
    return {"model": args.model, "quantization": quantization_of(loaded.model), **result}


def cmd_bench(args) -> dict:
    from .export import read_meta
    from .quantize import check_method, folder_bytes, quantization_of, read_recipe
    from .speed import ideal_speedup, measure_speed, pick_device, release_memory

    device = pick_device(args.device)
    if args.method:
        check_method(args.method, device)
    folder = _spec_folder(args.model)
    recipe = read_recipe(folder) if folder else None
    meta = read_meta(folder) if folder else None
    options = dict(prefill_tokens=args.prefill, decode_tokens=args.decode, decode_prompt_tokens=args.prompt,
                   repeats=args.repeats, warmup=args.warmup)
    loaded = _load_for(args, device)
    disk = folder_bytes(folder) if folder else None
    result = measure_speed(loaded.model, loaded.tokenizer, disk_bytes=disk, **options)
    out = {"model": args.model, "quantization": quantization_of(loaded.model),
           "recipe_note": "disk_bytes are the unquantized source weights; weight_bytes is the quantized size"
           if recipe or args.method else None, **result.to_dict()}
    dense_widths = (meta or {}).get("original_intermediate_sizes")
    out["ideal_speedup"] = round(ideal_speedup(loaded.model, dense_widths, args.prefill), 4) if dense_widths else None
    baseline = args.baseline
    if baseline == "auto":
        baseline = (meta or {}).get("model") if dense_widths else None
    if baseline and baseline != "none":
        del loaded
        release_memory()
        args_dense = copy.copy(args)
        args_dense.model, args_dense.method = baseline, None
        dense = _load_for(args_dense, device)
        dense_folder = _spec_folder(baseline)
        ref = measure_speed(dense.model, dense.tokenizer, disk_bytes=folder_bytes(dense_folder) if dense_folder else None,
                            **options)
        out["baseline"] = {"model": baseline, **ref.to_dict()}
        out["measured_prefill_speedup"] = round(ref.prefill_ms / result.prefill_ms, 4)
        out["measured_decode_speedup"] = round(result.decode_tokens_per_s / ref.decode_tokens_per_s, 4)
    return out
