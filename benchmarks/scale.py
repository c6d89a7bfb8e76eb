"""Scale benchmark: data-parallel scoring, checkpointing, the memory estimate, GGUF export, and (with
CUDA) the LLaMA-2-7B-shaped scoring / pruned-prefill figures the scale issue asks for.

    flock /tmp/heavy.lock python benchmarks/scale.py                 # CPU part → results/scale_cpu.{json,md}
    flock /tmp/heavy.lock python benchmarks/scale.py --gpu           # + GPU part → results/scale_cuda.{json,md}
    python benchmarks/scale.py --gpu-smoke                           # GPU code path on a tiny config, on the CPU

CPU (always): SmolLM2-135M entropy scoring in 1 process (2 threads) vs ``torchrun --nproc_per_node 2``
(gloo, 1 thread each) on the same calibration windows — time and the largest score difference;
scoring with and without gradient checkpointing — time and the bytes autograd keeps, next to the
estimate; the GGUF export of a 20 %-pruned SmolLM2 (widths rounded to 64) in F32 / F16 / Q8_0 — file
size and fidelity of the file reloaded through transformers' GGUF loader.

GPU (``--gpu``, CUDA only): a LLaMA-2-7B-shaped model with random bf16 weights (speed and memory do
not depend on the values) scored with entropy at 1 × 1024 tokens by the engine (weights frozen, only
activation gradients) vs the paper code's way (MLP weights trainable, one autograd backward of the
full-vocabulary entropy) — time and peak memory, next to weights + the activation estimate; then
prefill (1 × 1024) of the dense model vs 20 % / 30 % pruned models with widths rounded to 64 / 128,
measured speed-up vs the FLOP ideal.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, machine, markdown_table, write_result

from core import metrics

MODEL = "smollm2-135m"


# ---------------------------------------------------------------------------------------------- CPU


def _cli(args: list[str], procs: int) -> tuple[dict, float]:
    """Run ``python -m core`` (procs = 1) or ``torchrun --nproc_per_node procs -m core``; the JSON report
    and the wall time of the whole command."""
    threads = str(max(1, (os.cpu_count() or 2) // procs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads,
           "CUDA_VISIBLE_DEVICES": ""}
    head = ([sys.executable, "-m", "core"] if procs == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
             "-m", "core"])
    start = time.perf_counter()
    run = subprocess.run(head + args + ["--quiet"], capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(head + args)}\n{run.stderr[-3000:]}")
    return json.loads(run.stdout[run.stdout.index("{"):]), wall


def data_parallel_rows(samples: int, seq_len: int, batch: int) -> list[dict]:
    from core.methods.oneshot import ScoreResult

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for procs in (1, 2):
            out = Path(tmp) / f"scores{procs}.safetensors"
            report, wall = _cli(["score", "--model", MODEL, "--criterion", "entropy", "--samples", str(samples),
                                 "--seq-len", str(seq_len), "--batch-size", str(batch), "--out", str(out)], procs)
            outs[procs] = ScoreResult.load(out)
            rows.append({"processes": procs, "threads_each": max(1, (os.cpu_count() or 2) // procs),
                         "scoring_s": report["seconds"], "command_wall_s": round(wall, 1),
                         "tokens": report["tokens"]})
        diffs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(outs[2].scores, outs[1].scores)]
    rows[1]["max_rel_diff_vs_1"] = f"{max(diffs):.1e}"
    rows[0]["max_rel_diff_vs_1"] = "0"
    rows[1]["speedup"] = round(rows[0]["scoring_s"] / rows[1]["scoring_s"], 2)
    rows[0]["speedup"] = 1.0
    return rows


def _kept_bytes(model, windows, checkpointing: bool) -> tuple[int, float]:
    """(bytes autograd keeps from the stack's forward, scoring seconds) for one entropy pass."""
    from core.importance import taylor as scoring
    from core.importance.criteria import ScoreOptions, get_criterion

    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    original = scoring.base_forward

    def counted(m, ids):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return original(m, ids)

    scoring.base_forward = counted
    try:
        start = time.perf_counter()
        get_criterion("entropy")(model, windows, ScoreOptions(batch_size=windows.shape[0], progress=False,
                                                              grad_checkpointing=checkpointing))
        seconds = time.perf_counter() - start
    finally:
        scoring.base_forward = original
    return sum(seen.values()), seconds


def checkpointing_rows(batch: int, seq_len: int) -> list[dict]:
    from core.data.text import calibration_windows
    from core.models.loading import load_model
    from core.models.placement import estimate_scoring_memory

    loaded = load_model(MODEL)
    windows = calibration_windows(loaded.tokenizer, "wiki", batch, seq_len, 0, max_length=loaded.max_length)
    rows = []
    for ckpt in (False, True):
        kept, seconds = _kept_bytes(loaded.model, windows, ckpt)
        estimate = estimate_scoring_memory(loaded.model, batch_size=batch, seq_len=seq_len, grad_checkpointing=ckpt)
        rows.append({"grad_checkpointing": ckpt, "seconds": round(seconds, 2), "kept_MiB": round(kept / 2**20, 1),
                     "estimate_stack_MiB": round(estimate.stack / 2**20, 1),
                     "estimate_over_kept": round(estimate.stack / kept, 2),
                     "estimate_total_GiB": round(estimate.total / 2**30, 3), "estimate": estimate.text()})
    return rows


def gguf_rows(ratio: float, windows_n: int, seq_len: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from core.data.text import evaluation_windows
    from core.export.gguf import GGUFOptions, save_gguf
    from core.methods.oneshot import prune_with_scores, score_model
    from core.models.loading import load_model

    loaded = load_model(MODEL)
    scores = score_model(loaded, "entropy", samples=8, seq_len=128, progress=False)
    pruned = prune_with_scores(loaded, scores, ratio, round_to=64, progress=False).model
    windows = evaluation_windows(loaded.tokenizer, "wiki", windows_n, seq_len, max_length=loaded.max_length)
    with torch.no_grad():
        ref = pruned(input_ids=windows, use_cache=False).logits.float()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("f32", "f16", "q8_0"):
            start = time.perf_counter()
            path = save_gguf(pruned, loaded.tokenizer, Path(tmp) / f"m-{kind}.gguf", GGUFOptions(type=kind),
                             source=MODEL)
            write_s = time.perf_counter() - start
            back = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            with torch.no_grad():
                got = back(input_ids=windows, use_cache=False).logits.float()
            kl = metrics.per_token_kl(ref, got).mean()
            rows.append({"type": kind, "file_MiB": round(path.stat().st_size / 2**20, 1), "write_s": round(write_s, 1),
                         "max_rel_logit_diff": f"{float((got - ref).abs().max() / ref.abs().max()):.1e}",
                         "mean_kl_nats": f"{float(kl):.2e}",
                         "top1_agreement": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4)})
            del back
    return rows


# ---------------------------------------------------------------------------------------------- GPU


def llama7b_config(tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # the same code path on a small shape (smoke test on any device)
        return LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1000, max_position_embeddings=2048)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def random_model(config, device: torch.device, dtype: torch.dtype):
    """A Llama model with N(0, 0.02) weights built directly on ``device`` (no CPU copy, no checkpoint)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    with torch.device(device):  # real inv_freq buffers (meta init left them empty)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def paper_style_scores(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The seed code's way: MLP weights trainable (so backward reaches the MLPs), one autograd backward of
    the full-vocabulary entropy, |a·g| captured by hooks; the MLP weight gradients are computed and dropped."""
    from core.models.adapters import mlp_handles

    handles = mlp_handles(model)
    saved, scores = {}, [torch.zeros(h.width, device=ids.device) for h in handles]
    hooks = []
    for h in handles:
        for lin in (h.gate, h.up, h.down):
            lin.weight.requires_grad_(True)

        def fwd(_m, args, layer=h.index):
            saved[layer] = args[0]
            args[0].retain_grad()
        hooks.append(h.down.register_forward_pre_hook(fwd))
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = metrics.entropy(metrics.log_probs(logits)).mean()
        loss.backward()
        for layer, a in saved.items():
            scores[layer] += (a.detach().float() * a.grad.float()).abs().sum(dim=(0, 1))
    finally:
        for hook in hooks:
            hook.remove()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
    return scores


def gpu_scoring_rows(device: torch.device, tiny: bool, seq_len: int) -> list[dict]:
    from core.importance.criteria import ScoreOptions, get_criterion
    from core.models.placement import estimate_scoring_memory, weight_bytes

    config = llama7b_config(tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(config, device, dtype)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)
    weights = weight_bytes(model) / 2**30
    rows = []
    for name, ckpt in (("engine (frozen weights)", False), ("engine + grad checkpointing", True),
                       ("paper-style (MLP weights trainable)", None)):
        estimate = estimate_scoring_memory(model, batch_size=1, seq_len=seq_len, grad_checkpointing=bool(ckpt))
        times = []
        for _ in range(3):  # the first is warm-up
            _peak_reset(device)
            _sync(device)
            start = time.perf_counter()
            if ckpt is None:
                paper_style_scores(model, ids)
            else:
                get_criterion("entropy")(model, ids.cpu(), ScoreOptions(batch_size=1, progress=False,
                                                                        grad_checkpointing=ckpt))
            _sync(device)
            times.append(time.perf_counter() - start)
        rows.append({"scorer": name, "seconds": round(min(times[1:]), 3), "peak_GiB": round(_peak(device), 2),
                     "weights_GiB": round(weights, 2),
                     "estimate_GiB": round(estimate.total / 2**30, 2) if ckpt is not None else "-"})
    base = rows[2]["seconds"]
    for row in rows:
        row["time_vs_paper"] = round(row["seconds"] / base, 2)
    return rows


def gpu_prefill_rows(device: torch.device, tiny: bool, seq_len: int) -> list[dict]:
    from core.models.counts import forward_flops_per_token
    from core.models.slicing import prune_mlp_neurons

    config = llama7b_config(tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense = random_model(config, device, dtype)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)

    @torch.no_grad()
    def prefill_ms(model) -> float:
        for _ in range(3):
            model(input_ids=ids, use_cache=False)
        _sync(device)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            _sync(device)
            times.append(time.perf_counter() - start)
        return 1000 * sorted(times)[len(times) // 2]

    dense_ms = prefill_ms(dense)
    dense_flops = forward_flops_per_token(dense, seq_len)
    rows = [{"model": "dense", "width": config.intermediate_size, "prefill_ms": round(dense_ms, 2),
             "speedup": 1.0, "flop_ideal": 1.0, "share_of_ideal": "-"}]
    for ratio in (0.2, 0.3):
        for multiple in (64, 128):
            width = max(multiple, int(round(config.intermediate_size * (1 - ratio) / multiple)) * multiple)
            kept = [torch.arange(width) for _ in range(config.num_hidden_layers)]
            pruned = prune_mlp_neurons(dense, kept)
            ms = prefill_ms(pruned)
            ideal = dense_flops / forward_flops_per_token(pruned, seq_len)
            rows.append({"model": f"{int(ratio * 100)} % pruned, /{multiple}", "width": width,
                         "prefill_ms": round(ms, 2), "speedup": round(dense_ms / ms, 3),
                         "flop_ideal": round(ideal, 3), "share_of_ideal": f"{(dense_ms / ms - 1) / (ideal - 1):.0%}"})
            del pruned
    return rows


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="also run the CUDA part (needs a GPU)")
    parser.add_argument("--gpu-only", action="store_true", help="only the CUDA part")
    parser.add_argument("--gpu-smoke", action="store_true", help="run the GPU code path on a tiny config (any device)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    if args.gpu_smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps({"scoring": gpu_scoring_rows(device, True, 64), "prefill": gpu_prefill_rows(device, True, 64)},
                         indent=1))
        return
    if not args.gpu_only:
        cpu = {"machine": machine(), "model": MODEL,
               "data_parallel": data_parallel_rows(args.samples, args.seq_len, args.batch_size),
               "checkpointing": checkpointing_rows(args.batch_size, args.seq_len),
               "gguf": gguf_rows(0.2, 4, 128)}
        write_result("scale_cpu.json", json.dumps(cpu, indent=1))
        md = [f"# Scale (CPU)\n\n{cpu['machine']}. `python benchmarks/scale.py`\n",
              f"## Data-parallel entropy scoring, {MODEL}, {args.samples} x {args.seq_len} tokens, batch "
              f"{args.batch_size} (gloo)\n",
              markdown_table(list(cpu["data_parallel"][0]), [list(r.values()) for r in cpu["data_parallel"]]),
              f"\n\n## Gradient checkpointing, {MODEL}, one batch {args.batch_size} x {args.seq_len}\n",
              markdown_table([k for k in cpu["checkpointing"][0] if k != "estimate"],
                             [[v for k, v in r.items() if k != "estimate"] for r in cpu["checkpointing"]]),
              f"\n\n## GGUF export of {MODEL} pruned 20 % (widths rounded to 64), reloaded through transformers, "
              "4 x 128 evaluation tokens vs the pruned model\n",
              markdown_table(list(cpu["gguf"][0]), [list(r.values()) for r in cpu["gguf"]]), ""]
        write_result("scale_cpu.md", "\n".join(md))
        print("\n".join(md))
    if args.gpu or args.gpu_only:
        if not torch.cuda.is_available():
            print("No CUDA device: the GPU part (7B-shaped scoring memory/time, pruned prefill) needs one.")
            return
        device = torch.device("cuda")
        gpu = {"device": torch.cuda.get_device_name(device), "seq_len": 1024,
               "scoring": gpu_scoring_rows(device, False, 1024), "prefill": gpu_prefill_rows(device, False, 1024)}
        write_result("scale_cuda.json", json.dumps(gpu, indent=1))
        md = [f"# Scale (GPU)\n\n{gpu['device']}, LLaMA-2-7B-shaped random bf16 model, 1 x 1024 tokens. "
              "`python benchmarks/scale.py --gpu-only`\n", "## Entropy scoring\n",
              markdown_table(list(gpu["scoring"][0]), [list(r.values()) for r in gpu["scoring"]]),
              "\n\n## Prefill, dense vs pruned (uniform widths rounded)\n",
              markdown_table(list(gpu["prefill"][0]), [list(r.values()) for r in gpu["prefill"]]), ""]
        write_result("scale_cuda.md", "\n".join(md))
        print("\n".join(md))


if __name__ == "__main__":
    main()
