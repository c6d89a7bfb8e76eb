"""Which INT8 backend is fast on this CPU, and which keeps the quality: the choice behind the pipeline's
``int8-dynamic`` format.

Part 1 (kernels): one linear layer of SmolLM2-135M's shapes at M = 512 rows (a 1 × 512 prefill) and M = 1
(a decode step): fp32 ``F.linear`` vs torchao ``Int8WeightOnlyConfig`` / ``Int8DynamicActivationInt8WeightConfig``
(per-token activations, ``torch._int_mm``) vs fbgemm's dynamic INT8 ``Linear`` (torch.ao) with per-tensor
(the legacy path) and per-channel weights, under the ``x86`` and ``fbgemm`` quantized engines; then the
fbgemm layer at MLP widths around a 20 % cut (which multiples the kernel likes).

Part 2 (model): the embedded model quantized with each method — perplexity and KL(p_dense ‖ p) on held-out
wiki windows, measured prefill (1 × 512) latency and decode speed (KV cache), weights in memory.

    flock /tmp/heavy.lock python benchmarks/int8_backends.py

Writes benchmarks/results/int8_backends_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch

from _common import RESULTS, machine, markdown_table, write_json, write_text

METHODS = ("fp32", "torchao-int8", "torchao-int8-dynamic", "torch-dynamic-int8", "fbgemm-int8-dynamic")
SHAPES = {"q/o_proj 576→576": (576, 576), "k/v_proj 576→192": (576, 192), "gate/up_proj 576→1536": (576, 1536),
          "down_proj 1536→576": (1536, 576)}


def timed(fn, repeats: int) -> float:
    """Median ms of ``repeats`` calls after two warm-ups."""
    fn()
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def layer_variants(k: int, n: int) -> dict[str, torch.nn.Module]:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).eval().requires_grad_(False)
    out = {"fp32": base}
    for name, config in (("torchao-int8", Int8WeightOnlyConfig()),
                         ("torchao-int8-dynamic", Int8DynamicActivationInt8WeightConfig())):
        model = copy.deepcopy(base)
        quantize_(model, config)
        out[name] = model
    for engine in ("x86", "fbgemm"):
        torch.backends.quantized.engine = engine
        for name, qconfig in (("torch-dynamic-int8", default_dynamic_qconfig),
                              ("fbgemm-int8-dynamic", per_channel_dynamic_qconfig)):
            out[f"{name} [{engine}]"] = quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear: qconfig},
                                                         dtype=torch.qint8)
    torch.backends.quantized.engine = "x86"
    return out


@torch.no_grad()
def kernels(repeats: int) -> list[dict]:
    rows = []
    for label, (k, n) in SHAPES.items():
        variants = layer_variants(k, n)
        for m in (512, 1):
            x = torch.randn(m, k)
            base = None
            for name, model in variants.items():
                engine = "fbgemm" if "[fbgemm]" in name else "x86"
                torch.backends.quantized.engine = engine
                ms = timed(lambda model=model, x=x: model(x), repeats if m > 1 else 10 * repeats)
                base = base or ms
                rows.append({"layer": label, "rows": m, "method": name, "ms": ms, "speedup_vs_fp32": base / ms})
            torch.backends.quantized.engine = "x86"
    return rows


@torch.no_grad()
def widths(repeats: int) -> list[dict]:
    """gate/up (576 → w) and down (w → 576) at M = 512 for widths around 1536 × 0.8 = 1228.8."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    rows = []
    x_in = torch.randn(512, 576)
    for w in (1228, 1229, 1232, 1236, 1240, 1248, 1256, 1280):
        torch.manual_seed(0)
        up = torch.nn.Sequential(torch.nn.Linear(576, w, bias=False)).eval()
        down = torch.nn.Sequential(torch.nn.Linear(w, 576, bias=False)).eval()
        x_down = torch.randn(512, w)
        q_up = quantize_dynamic(copy.deepcopy(up), {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        q_down = quantize_dynamic(copy.deepcopy(down), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                  dtype=torch.qint8)
        rows.append({"width": w, "fp32_up_ms": timed(lambda up=up: up(x_in), repeats),
                     "fp32_down_ms": timed(lambda down=down, x=x_down: down(x), repeats),
                     "int8_up_ms": timed(lambda q=q_up: q(x_in), repeats),
                     "int8_down_ms": timed(lambda q=q_down, x=x_down: q(x), repeats)})
    return rows


def model_rows(args) -> list[dict]:
    from core.data.text import evaluation_windows
    from core.measure.evaluate import Reference, evaluate
    from core.measure.speed import measure_speed
    from core.models.loading import load_model
    from core.quantize.backends import quantize_model

    loaded = load_model(args.model)
    windows = evaluation_windows(loaded.tokenizer, "wiki", args.windows, args.seq_len)
    reference = Reference(loaded.model, windows, batch_size=4)
    rows = []
    for method in METHODS:
        start = time.perf_counter()
        model = loaded.model if method == "fp32" else quantize_model(copy.deepcopy(loaded.model), method)
        quality = evaluate(model, windows, reference, batch_size=4, progress=False)
        speed = measure_speed(model, loaded.tokenizer, prefill_tokens=512, decode_tokens=args.decode,
                              repeats=args.repeats, max_repeats=args.repeats, method=method)
        rows.append({"method": method, "perplexity": quality.perplexity, "kl_to_dense": quality.kl_to_reference,
                     "top1_agreement": quality.top1_agreement, "prefill_ms": speed.prefill_ms,
                     "prefill_ms_all": speed.prefill_ms_all, "decode_tokens_per_s": speed.decode_tokens_per_s,
                     "decode_ms_all": speed.decode_ms_all, "weight_bytes": speed.weight_bytes,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_all")}), flush=True)
        if model is not loaded.model:
            del model
    base = rows[0]
    for row in rows:
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel-repeats", type=int, default=10)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.time()
    kernel_rows = kernels(args.kernel_repeats)
    width_rows = widths(args.kernel_repeats)
    rows = [] if args.skip_model else model_rows(args)
    command = "python benchmarks/int8_backends.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "skip_model" and v is not None)
    result = {"machine": machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "command": command, "minutes": round((time.time() - started) / 60, 1), "kernels": kernel_rows,
              "widths": width_rows, "model": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "int8_backends_cpu.json", result, indent=2)
    lines = [f"Machine: {result['machine']}, ATen CPU capability {result['cpu_capability']}. Command: `{command}` "
             f"({result['minutes']} min).", "", "**Kernels** (median ms of one linear layer, fp32 input):", ""]
    lines.append(markdown_table(["layer", "rows", "method", "ms", "speed-up vs fp32"],
                                [[r["layer"], r["rows"], r["method"], f"{r['ms']:.3f}", f"{r['speedup_vs_fp32']:.2f}×"]
                                 for r in kernel_rows]))
    lines += ["", "**MLP widths** (fbgemm per-channel INT8 vs fp32, 512 rows, ms):", ""]
    lines.append(markdown_table(["width", "fp32 gate/up", "int8 gate/up", "fp32 down", "int8 down"],
                                [[r["width"], f"{r['fp32_up_ms']:.2f}", f"{r['int8_up_ms']:.2f}",
                                  f"{r['fp32_down_ms']:.2f}", f"{r['int8_down_ms']:.2f}"] for r in width_rows]))
    if rows:
        lines += ["", f"**Model** ({args.model}; perplexity / KL on {args.windows} × {args.seq_len} held-out wiki "
                  f"tokens; prefill 1 × 512, decode {args.decode} tokens after a 128-token prompt, median of "
                  f"{args.repeats}):", ""]
        lines.append(markdown_table(
            ["method", "perplexity", "KL to dense", "top-1 agree", "prefill (ms)", "prefill speed-up",
             "decode (tok/s)", "decode speed-up", "weights (MB)"],
            [[r["method"], f"{r['perplexity']:.2f}", f"{r['kl_to_dense']:.4f}", f"{r['top1_agreement']:.3f}",
              f"{r['prefill_ms']:.0f}", f"{r['prefill_speedup']:.2f}×", f"{r['decode_tokens_per_s']:.1f}",
              f"{r['decode_speedup']:.2f}×", f"{r['weight_bytes'] / 1e6:.0f}"] for r in rows]))
    write_text(RESULTS / "int8_backends_cpu.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
