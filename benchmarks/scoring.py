"""Scoring cost per calibration token on the embedded model, next to the two yardsticks of issue #2:

(a) a bare forward+backward with all weights frozen (gradient entering at the embedding output,
    HF's own logits + CE loss) at the same batch size — the floor any Taylor scorer pays;
(b) a reference-style scorer, as the paper's code scores: MLP weights left trainable, full logits,
    a full backward one window at a time (weight gradients computed and held, then zeroed).

    python benchmarks/scoring.py --samples 8 --seq-len 256 --batch-size 4 --repeats 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

import _common  # noqa: F401
from _common import machine, markdown_table, write_result

from core import metrics
from core.data.text import calibration_windows
from core.importance.criteria import REGISTRY, ScoreOptions, get_criterion
from core.models.adapters import mlp_handles
from core.models.forward import batches, frozen
from core.models.loading import load_model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_forward(model, windows, batch_size):
    with torch.no_grad():
        for batch in batches(windows, batch_size):
            model(input_ids=batch, use_cache=False)


def frozen_forward_backward(model, windows, batch_size):
    """Plain HF forward + CE backward with frozen weights; gradient from the embedding output."""
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        with frozen(model):
            for batch in batches(windows, batch_size):
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    finally:
        hook.remove()


def reference_style(model, windows, batch_size, train_all=False):
    """Paper-style: MLP (or all) weights trainable, entropy on full logits, backward, |a·g| hooks."""
    scores = [torch.zeros(h.width) for h in mlp_handles(model)]
    captured: list = []

    def pre(module, args):
        args[0].retain_grad()
        captured.append(args[0])

    hooks = [h.down.register_forward_pre_hook(pre) for h in mlp_handles(model)]
    trainable = list(model.parameters()) if train_all else [p for h in mlp_handles(model) for p in h.mlp.parameters()]
    with frozen(model), contextlib.ExitStack():
        for p in trainable:
            p.requires_grad_(True)
        for batch in batches(windows, batch_size):
            captured.clear()
            logits = model(input_ids=batch, use_cache=False).logits.float()
            metrics.entropy(metrics.log_probs(logits)).mean(-1).sum().backward()  # (B, T) → per-window mean
            for layer, a in enumerate(captured):
                scores[layer] += (a.detach() * a.grad).abs().sum((0, 1))
            model.zero_grad(set_to_none=True)
    for hook in hooks:
        hook.remove()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--criteria", nargs="+", default=list(REGISTRY))
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds; every scorer runs once per round (interleaved, so drift hits all alike), "
                             "the best round counts")
    args = parser.parse_args()
    repeats = max(1, args.repeats)

    loaded = load_model(args.model)
    model = loaded.model
    windows = calibration_windows(loaded.tokenizer, "wiki", args.samples, args.seq_len, seed=0)
    tokens = windows.numel()
    bs = args.batch_size
    frozen_forward_backward(model, windows[:bs], bs)  # warm-up
    rows, record = [], {}

    scorers: list[tuple[str, str, object]] = [
        ("forward only (no grad)", "forward", lambda: bare_forward(model, windows, bs)),
        ("frozen forward+backward", "forward+backward", lambda: frozen_forward_backward(model, windows, bs)),
        ("reference-style (MLP trainable, batch 1)", "forward+backward+weight grads",
         lambda: reference_style(model, windows, 1)),
        ("reference-style (all trainable, batch 1)", "forward+backward+weight grads",
         lambda: reference_style(model, windows, 1, train_all=True)),
        (f"reference-style (MLP trainable, batch {bs})", "forward+backward+weight grads",
         lambda: reference_style(model, windows, bs)),
    ]
    for name in args.criteria:
        criterion = get_criterion(name)
        scorers.append((f"ours: {name}", criterion.cost,
                        lambda c=criterion: c(model, windows, ScoreOptions(batch_size=bs, progress=False))))
    best: dict[str, float] = {}
    for round_ in range(repeats):
        for name, _cost, fn in scorers:
            seconds = timed(fn)
            best[name] = min(best.get(name, float("inf")), seconds)
            print(f"round {round_ + 1}/{repeats} {name}: {seconds:.1f} s ({1000 * seconds / tokens:.2f} s / 1k tokens)",
                  flush=True)
    for name, cost, _fn in scorers:
        record[name] = {"cost": cost, "seconds": best[name], "s_per_1k_tokens": 1000 * best[name] / tokens}
    assert all(p.grad is None for p in model.parameters()), "a scorer left weight gradients behind"

    frozen_s = record["frozen forward+backward"]["s_per_1k_tokens"]
    ref_s = record["reference-style (MLP trainable, batch 1)"]["s_per_1k_tokens"]
    for name, r in record.items():
        rows.append([name, r["cost"], f"{r['s_per_1k_tokens']:.2f}", f"{r['s_per_1k_tokens'] / frozen_s:.2f}",
                     f"{r['s_per_1k_tokens'] / ref_s:.2f}"])
    header = (f"model {args.model}; {args.samples} x {args.seq_len} wiki calibration windows ({tokens} tokens), "
              f"batch {bs} (reference-style: batch 1 as the paper's code, and batch {bs} for an equal-batch "
              f"comparison); best of {repeats} interleaved rounds; {machine()}")
    table = markdown_table(["scorer", "cost", "s / 1k tokens", "× frozen fwd+bwd", "× reference-style"], rows)
    print(header)
    print(table)
    write_result("scoring.md", header + "\n\n" + table + "\n")
    write_result("scoring.json", json.dumps({"header": header, "rows": record}, indent=1))


if __name__ == "__main__":
    main()
