"""Measured speed, memory and size of dense / pruned / quantized / pruned+quantized variants.

For MLP pruning ratios 0 / 0.2 / 0.3 × {fp32, torchao int8, bnb 8-bit, bnb NF4} (+ legacy torch.ao
dynamic int8 on the dense model): prefill latency (1 × 512, median), greedy KV-cache decode
tokens/s, peak memory, parameters, weight bytes, bytes of the saved folder, and for pruned models
the ideal (FLOP-ratio) speed-up beside the measured one. GPU (bf16, CUDA events) when available,
CPU otherwise; the table says which.

    flock /tmp/hfprune-heavy.lock python benchmarks/speed.py

Writes benchmarks/results/speed_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from _common import write_json, write_text
from quantize import FORMATS, LEGACY, ROOT, device_line, load_scores, pruned_variant, variant

warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")  # bitsandbytes, once per decode step


def disk_bytes(model, tokenizer, fmt: str, meta: dict | None, source: str) -> int:
    """Save the variant the way the CLI does (pruned: safetensors; quantized: source weights +
    recipe) into a temp folder and measure its bytes."""
    from core.export.hf import save_pruned
    from core.models.counts import folder_bytes
    from core.quantize.store import save_quantized

    tmp = Path(tempfile.mkdtemp(prefix="hfprune-speed-"))
    try:
        target = tmp / "variant"
        if fmt != "fp32":
            save_quantized(model, tokenizer, fmt, target, source=source)
        elif meta is not None:
            save_pruned(model, tokenizer, target, meta)
        else:
            model.save_pretrained(str(target), safe_serialization=True)
            tokenizer.save_pretrained(str(target))
        return folder_bytes(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0,0.2,0.3")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--round-to", type=int, default=1,
                        help="round pruned widths to a multiple (64 for bitsandbytes NF4 on CUDA)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    from core.measure.speed import ideal_speedup, measure_speed, pick_device, release_memory
    from core.models.counts import mlp_widths_any
    from core.models.loading import load_model
    from core.quantize.backends import check_method

    started = time.time()
    device = pick_device(args.device)
    formats = args.formats.split(",")
    if device.type == "cuda" and LEGACY in formats:
        formats.remove(LEGACY)
    for fmt in formats:
        if fmt != "fp32":
            check_method(fmt, device)
    loaded = load_model(args.model)
    scores = load_scores(loaded)
    dense_widths = mlp_widths_any(loaded.model)
    plan = [(float(r), f) for r in args.ratios.split(",") for f in formats]
    if args.legacy and device.type == "cpu":
        plan.insert(len(formats), (0.0, LEGACY))
    rows, dense_ref = [], None
    current: tuple[float, object, dict | None] | None = None
    for ratio, fmt in plan:
        if current is None or current[0] != ratio:
            model, meta = pruned_variant(loaded, scores, ratio, round_to=args.round_to)
            current = (ratio, model, meta)
        _, base, meta = current
        size = disk_bytes(base, loaded.tokenizer, fmt, meta, args.model)
        if device.type == "cuda":  # a bf16 copy on the GPU; the fp32 source on the CPU stays untouched
            model = variant(copy.deepcopy(base).to(device=device, dtype=torch.bfloat16), fmt)
        else:
            model = variant(base, fmt)
        release_memory()
        result = measure_speed(model, loaded.tokenizer, prefill_tokens=args.prefill, decode_tokens=args.decode,
                               decode_prompt_tokens=args.prompt, repeats=args.repeats, method=fmt, disk_bytes=size)
        label = "bf16" if device.type == "cuda" and fmt == "fp32" else fmt  # the GPU rows run in bf16
        row = {"ratio": ratio, "achieved_ratio": (meta or {}).get("achieved_ratio", 0.0), "format": label,
               **result.to_dict(),
               "ideal_speedup": ideal_speedup(model, dense_widths, args.prefill) if ratio else 1.0}
        if ratio == 0 and fmt == "fp32":
            dense_ref = row
        if dense_ref is not None:
            row["measured_prefill_speedup"] = dense_ref["prefill_ms"] / row["prefill_ms"]
            row["measured_decode_speedup"] = row["decode_tokens_per_s"] / dense_ref["decode_tokens_per_s"]
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("ratio", "format", "prefill_ms", "decode_tokens_per_s",
                                              "peak_memory_bytes", "weight_bytes", "disk_bytes")}), flush=True)
        if model is not base:
            del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    kind = device.type
    meta = {"model": args.model, "device": device_line() if kind == "cpu" else
            f"{torch.cuda.get_device_name(device)} (bf16, CUDA events), torch {torch.__version__}",
            "round_to": args.round_to, "prefill": args.prefill, "decode": args.decode, "prompt": args.prompt,
            "repeats": args.repeats,
            "command": "python benchmarks/speed.py " + " ".join(argv or sys.argv[1:]),
            "seconds": round(time.time() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"speed_{kind}.json", {"meta": meta, "rows": rows}, indent=2)
    write_text(out / f"speed_{kind}.md", markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


def pruned_label(row: dict, meta: dict) -> str:
    """'20%', or '20% (20.8%)' when widths were rounded and the achieved ratio differs."""
    label = f"{row['ratio']:.0%}"
    if meta.get("round_to", 1) > 1 and row["ratio"]:
        label += f" ({row.get('achieved_ratio', 0.0):.1%})"
    return label


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Device: {meta['device']}. Model: {meta['model']}. Prefill: median of {meta['repeats']} forwards of "
        f"1 × {meta['prefill']} tokens after a warm-up; decode: {meta['decode']} greedy steps with KV cache after a "
        f"{meta['prompt']}-token prompt (median of {meta['repeats']}). Peak memory: "
        f"{rows[0]['memory_scope'] if rows else ''}. Disk: the saved folder (quantized folders hold the unquantized "
        f"source weights + recipe). Ideal = FLOP ratio dense/pruned at {meta['prefill']} tokens. "
        + (f"Pruned widths rounded to a multiple of {meta['round_to']} (achieved ratio in brackets). "
           if meta.get("round_to", 1) > 1 else "") +
        f"Command: `{meta['command']}` ({meta['seconds'] / 60:.0f} min).",
        "",
        "| MLP pruned | format | params (M) | prefill 1×512 (ms) | decode (tok/s) | peak mem (MB) | weights (MB) | "
        "disk (MB) | ideal speed-up | measured prefill speed-up | measured decode speed-up |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {pruned_label(r, meta)} | {r['format']} | {r['params'] / 1e6:.1f} | {r['prefill_ms']:.0f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['peak_memory_bytes'] / 1e6:.0f} | {r['weight_bytes'] / 1e6:.0f} | "
            f"{(r['disk_bytes'] or 0) / 1e6:.0f} | {r['ideal_speedup']:.3f} | "
            f"{r.get('measured_prefill_speedup', float('nan')):.3f} | "
            f"{r.get('measured_decode_speedup', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
