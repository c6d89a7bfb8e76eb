"""Sanity anchor for the HFPrune claim: uniform one-shot pruning with entropy vs cross-entropy
vs random Taylor scores, fidelity to the dense model on the held-out evaluation articles.

    python benchmarks/fidelity_anchor.py --samples 16 --seq-len 256 --eval-windows 8
"""
from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401  (sys.path + env)
from _common import machine, markdown_table, write_result

from core.data.text import evaluation_windows
from core.measure.evaluate import evaluate
from core.methods.oneshot import prune_with_scores, score_model
from core.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--criteria", nargs="+", default=["entropy", "cross_entropy", "random"])
    args = parser.parse_args()

    loaded = load_model(args.model)
    windows = evaluation_windows(loaded.tokenizer, "wiki", args.eval_windows, args.eval_seq_len)
    scores = {}
    for name in args.criteria:
        start = time.perf_counter()
        scores[name] = score_model(loaded, name, samples=args.samples, seq_len=args.seq_len, progress=False)
        print(f"scored {name} in {time.perf_counter() - start:.1f} s", flush=True)
    rows, records = [], []
    for ratio in args.ratios:
        base_kl = None
        for name in args.criteria:
            pruned = prune_with_scores(loaded, scores[name], ratio)
            result = evaluate(pruned.model, windows, loaded.model, progress=False)
            base_kl = result.kl_to_reference if base_kl is None else base_kl
            rel = result.kl_to_reference / base_kl
            rows.append([ratio, name, f"{result.kl_to_reference:.4f}", f"{rel:.2f}", f"{result.top1_agreement:.3f}",
                         f"{result.top10_overlap:.3f}", f"{result.perplexity:.2f}"])
            records.append({"ratio": ratio, "criterion": name, **result.to_dict()})
            print(rows[-1], flush=True)
    dense = evaluate(loaded.model, windows, progress=False)
    header = (f"model {args.model}; calibration {args.samples} x {args.seq_len} wiki windows (seed 0); evaluation "
              f"{args.eval_windows} x {args.eval_seq_len} held-out wiki windows; dense ppl {dense.perplexity:.2f}; "
              f"{machine()}")
    table = markdown_table(["ratio", "criterion", "KL to dense", f"KL / {args.criteria[0]}", "top-1 agree",
                            "top-10 overlap", "ppl"], rows)
    print(header)
    print(table)
    write_result("fidelity_anchor.md", header + "\n\n" + table + "\n")
    write_result("fidelity_anchor.json", json.dumps({"header": header, "rows": records}, indent=1))


if __name__ == "__main__":
    main()
