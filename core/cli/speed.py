"""CLI subcommand ``bench``: measured prefill latency, decode tokens/s, peak memory and size — in torch, or
with ``--engine llama.cpp`` a GGUF file's prompt / generation tokens/s, perplexity and KL in llama.cpp.

    python -m core bench --model runs/pruned20 --method bnb-nf4
    python -m core bench --engine llama.cpp --model runs/p20-gguf --baseline auto --threads 2
"""
from __future__ import annotations

from core.errors import HFPruneError
from core.export.hf import read_meta
from core.measure.llamacpp import LlamaCppOptions, dense_gguf, gguf_file, measure_llamacpp
from core.measure.speed import (
    SpeedBudget,
    ideal_speedup,
    measure_speed,
    pick_device,
    release_memory,
    speedup,
    spread,
)
from core.models.counts import folder_bytes
from core.quantize.backends import METHODS, check_method, quantization_of
from core.quantize.store import load_on, read_recipe, spec_folder


def register(sub) -> None:
    """Add the ``bench`` subcommand."""
    b = sub.add_parser("bench", help="measured prefill latency, decode tokens/s, peak memory, size")
    b.add_argument("--engine", default="torch",
                   help="torch (the model in this process) or llama.cpp (a GGUF file through llama-cpp-python: "
                        "prompt / generation tokens/s, perplexity and KL to the baseline from llama.cpp's logits)")
    b.add_argument("--model", default="smollm2-135m", help="alias, folder (quantized folders too), .gguf or hub id; "
                   "llama.cpp: a .gguf file or a 'prune --export gguf' folder")
    b.add_argument("--method", choices=list(METHODS), help="quantize the model in memory first")
    b.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda")
    b.add_argument("--prefill", type=int, default=512, help="prefill tokens (batch 1)")
    b.add_argument("--decode", type=int, default=64, help="greedy decode steps with KV cache")
    b.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    b.add_argument("--repeats", type=int, default=5, help="repeats of each timing (at least)")
    b.add_argument("--max-repeats", type=int, default=None,
                   help="keep repeating, up to this many, until the timings' IQR is within 5 %% of the median")
    b.add_argument("--warmup", type=int, default=1)
    SpeedBudget.add_arguments(b, defaults={"budget_s": 0.0})  # --budget: no limit unless asked (the dashboard: 5 s)
    b.add_argument("--baseline", default="auto",
                   help="dense model measured too for the measured speed-up: a spec, 'auto' (the source model of "
                        "a pruned folder; llama.cpp: exported once as GGUF in the pruned file's type) or 'none'")
    LlamaCppOptions.add_arguments(b, skip=("prompt_tokens", "gen_tokens", "repeats"))  # --prefill/--decode/--repeats
    b.add_argument("--json", action="store_true", help="print one JSON line")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(handler=cmd_bench)


ENGINES = ("torch", "llama.cpp")


def cmd_bench(args) -> dict:
    if args.engine not in ENGINES:  # checked here rather than by argparse: one sentence, not a usage block
        raise HFPruneError(f"Unknown engine '{args.engine}'; choose one of: {', '.join(ENGINES)}.")
    if args.engine == "llama.cpp":
        return cmd_bench_llamacpp(args)
    device = pick_device(args.device)
    if args.method:
        check_method(args.method, device)
    folder = spec_folder(args.model)
    recipe = read_recipe(folder) if folder else None
    meta = read_meta(folder) if folder else None
    options = dict(prefill_tokens=args.prefill, decode_tokens=args.decode, decode_prompt_tokens=args.prompt,
                   repeats=args.repeats, warmup=args.warmup, max_repeats=args.max_repeats,
                   budget_s=SpeedBudget.from_args(args).budget_s)
    loaded = load_on(args.model, device, args.method)
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
        dense = load_on(baseline, device)
        dense_folder = spec_folder(baseline)
        dense_disk = folder_bytes(dense_folder) if dense_folder else None
        ref = measure_speed(dense.model, dense.tokenizer, disk_bytes=dense_disk,
                            **options)
        out["baseline"] = {"model": baseline, **ref.to_dict()}
        out["measured_prefill_speedup"] = round(ref.prefill_ms / result.prefill_ms, 4)
        out["measured_decode_speedup"] = round(result.decode_tokens_per_s / ref.decode_tokens_per_s, 4)
        # the same two speed-ups with their quartile intervals and a verdict (e.g. above the FLOP ideal: noise)
        for phase, key in (("prefill", "prefill_ms_all"), ("decode", "decode_ms_all")):
            out[f"{phase}_speedup"] = speedup(spread(getattr(ref, key)), spread(getattr(result, key)),
                                              out["ideal_speedup"]).to_dict()
    return out


def cmd_bench_llamacpp(args) -> dict:
    """``bench --engine llama.cpp``: the GGUF file (and its dense baseline in the same type) in llama.cpp."""
    if args.method:
        raise HFPruneError("--method quantizes a torch model; for llama.cpp choose the type when exporting "
                           "(prune --export gguf --gguf-type q8_0, q4_0, q4_k_m …).")
    options = LlamaCppOptions.from_args(args, prompt_tokens=args.prefill, gen_tokens=args.decode,
                                        repeats=args.repeats)
    model, meta = gguf_file(args.model)
    models = {"model": model}
    if args.baseline == "auto" and meta and meta.get("model") and meta.get("gguf"):
        models = {"baseline": dense_gguf(meta["model"], meta["gguf"]), **models}
    elif args.baseline not in ("auto", "none"):
        models = {"baseline": gguf_file(args.baseline)[0], **models}
    rows = measure_llamacpp(models, options)
    return {"engine": "llama.cpp", "model": args.model, "baseline": str(models.get("baseline") or "") or None,
            "options": options.to_dict(), "rows": rows}
