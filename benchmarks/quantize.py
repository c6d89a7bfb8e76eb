"""Quality of dense / pruned × quantized variants of the embedded model.

For MLP pruning ratios 0 / 0.2 / 0.3 (entropy criterion, uniform; scored once, scores reused)
× {fp32, torchao int8, bnb 8-bit, bnb NF4} (+ the legacy torch.ao dynamic int8 on the dense
model): perplexity and KL(p_dense ‖ p_variant) on held-out wiki windows, both shipped zero-shot
accuracies, parameters and in-memory weight bytes.

    flock /tmp/hfprune-heavy.lock python benchmarks/quantize.py --limit 50

Writes benchmarks/results/quantize_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from _common import ROOT, write_json, write_text

from core.paths import cache_dir

FORMATS = ("fp32", "torchao-int8", "bnb-8bit", "bnb-nf4")
LEGACY = "torch-dynamic-int8"


def load_scores(loaded, samples: int = 16, seq_len: int = 128):
    """Entropy scores of the embedded model, computed once and cached under the cache folder."""
    from core.methods.oneshot import ScoreResult, score_model

    path = cache_dir() / "bench" / f"scores_entropy_{loaded.spec}_{samples}x{seq_len}.safetensors"
    if path.exists():
        return ScoreResult.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = score_model(loaded, "entropy", samples=samples, seq_len=seq_len, progress=False)
    result.save(path)
    return result


def pruned_variant(loaded, scores, ratio: float, round_to: int = 1):
    """(model, meta) for a ratio; ratio 0 is the dense model itself (not copied)."""
    from core.methods.oneshot import prune_with_scores

    if ratio == 0:
        return loaded.model, None
    result = prune_with_scores(loaded, scores, ratio, round_to=round_to)
    return result.model, result.meta


def variant(model, fmt: str):
    from core.quantize.backends import quantize_model

    return model if fmt == "fp32" else quantize_model(copy.deepcopy(model), fmt)


def device_line() -> str:
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0,0.2,0.3")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=True,
                        help="add torch.ao dynamic int8 on the dense model")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--limit", type=int, default=50, help="zero-shot items per task")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    from core.data.text import evaluation_windows
    from core.measure.evaluate import evaluate
    from core.measure.zeroshot import run_zeroshot
    from core.models.counts import count_params, weight_bytes
    from core.models.loading import load_model

    started = time.time()
    loaded = load_model(args.model)
    windows = evaluation_windows(loaded.tokenizer, "wiki", args.windows, args.seq_len, max_length=loaded.max_length)
    scores = load_scores(loaded)
    dense = loaded.model
    rows = []
    plan = [(float(r), f) for r in args.ratios.split(",") for f in args.formats.split(",")]
    if args.legacy:
        plan.insert(len(args.formats.split(",")), (0.0, LEGACY))
    pruned_cache: dict[float, object] = {}
    for ratio, fmt in plan:
        if ratio not in pruned_cache:
            pruned_cache.clear()
            pruned_cache[ratio] = pruned_variant(loaded, scores, ratio)[0]
        model = variant(pruned_cache[ratio], fmt)
        t0 = time.time()
        # evaluate counts quantized layers logically (core.counts.count_params)
        ev = evaluate(model, windows, reference=dense, batch_size=4, progress=False)
        zs = run_zeroshot(model, loaded.tokenizer, limit=args.limit, batch_size=8, progress=False)
        row = {"ratio": ratio, "format": fmt, "perplexity": ev.perplexity, "kl_to_dense": ev.kl_to_reference,
               "top1_agreement": ev.top1_agreement,
               "wiki_cloze_acc": zs["tasks"]["wiki_cloze"]["acc"],
               "wiki_nextsent_acc": zs["tasks"]["wiki_nextsent"]["acc"],
               "wiki_nextsent_acc_norm": zs["tasks"]["wiki_nextsent"]["acc_norm"],
               "zeroshot_n": zs["tasks"]["wiki_cloze"]["n"],
               **count_params(model), "weight_bytes": weight_bytes(model), "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "quantize_partial.json", rows, indent=2)
        if model is not pruned_cache[ratio]:
            del model

    device = "cpu"
    meta = {"model": args.model, "device": device_line(), "windows": args.windows, "seq_len": args.seq_len,
            "zeroshot_limit": args.limit, "criterion": "entropy", "allocation": "uniform",
            "calibration": scores.config, "command": "python benchmarks/quantize.py " + " ".join(argv or sys.argv[1:]),
            "seconds": round(time.time() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"quantize_{device}.json", {"meta": meta, "rows": rows}, indent=2)
    write_text(out / f"quantize_{device}.md", markdown(meta, rows))
    (out / "quantize_partial.json").unlink(missing_ok=True)
    print(markdown(meta, rows))
    return 0


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Device: {meta['device']}. Model: {meta['model']}; pruning: {meta['criterion']}/{meta['allocation']} "
        f"(scores from {meta['calibration'].get('samples')}×{meta['calibration'].get('seq_len')} "
        f"calibration tokens, seed "
        f"{meta['calibration'].get('seed')}). Perplexity and KL(p_dense ‖ p) on {meta['windows']} held-out windows × "
        f"{meta['seq_len']} tokens; zero-shot on the first {meta['zeroshot_limit']} items of each shipped task "
        f"(stderr ≈ ±{(0.25 / max(1, meta['zeroshot_limit'])) ** 0.5:.2f}). Command: `{meta['command']}` "
        f"({meta['seconds'] / 60:.0f} min).",
        "",
        "| MLP pruned | format | params (M) | weights (MB) | perplexity | KL to dense | wiki_cloze acc | "
        "wiki_nextsent acc | wiki_nextsent acc_norm |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['ratio']:.0%} | {r['format']} | {r['params'] / 1e6:.1f} | {r['weight_bytes'] / 1e6:.0f} | "
                     f"{r['perplexity']:.2f} | {r['kl_to_dense']:.4f} | {r['wiki_cloze_acc']:.2f} | "
                     f"{r['wiki_nextsent_acc']:.2f} | {r['wiki_nextsent_acc_norm']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
