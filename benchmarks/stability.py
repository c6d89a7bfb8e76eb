"""Is the entropy-vs-cross-entropy difference larger than the noise of the calibration draw?

Scores both criteria on K disjoint calibration draws (draw 0 = the usual seed-0 windows), then
(1) rank agreement per layer: Spearman ρ and removal overlap between draws of one criterion, and
between the two criteria on the same draw; (2) KL to the dense model on the evaluation articles
after uniform pruning with each draw's scores, at each ratio, with the paired difference.

    python benchmarks/stability.py --draws 4 --samples 16 --seq-len 128 --eval-windows 8 --eval-seq-len 128

Writes benchmarks/results/stability.{json,md}. The Tour's precomputed calibration-draw numbers are
extracted from that result file (no model is loaded) with

    python benchmarks/stability.py --write-tour    # → assets/tour/draws.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from _common import RESULTS, ROOT, machine, markdown_table, write_json, write_result

import core.studies.sweep  # noqa: F401  (imported up front: a later lazy import cannot fail mid-run)
from core.data.text import evaluation_windows
from core.models.loading import load_model
from core.studies.stability import (
    StabilityOptions,
    agreement,
    compare_over_draws,
    draw_windows,
    fidelity_over_draws,
    score_draws,
    tour_draws,
)

TOUR_DRAWS = ROOT / "assets" / "tour" / "draws.json"


def write_tour(result_file=RESULTS / "stability.json", target=TOUR_DRAWS) -> None:
    """(Re)make the Tour's precomputed calibration-draw numbers from a stored stability result."""
    asset = tour_draws(json.loads(result_file.read_text()), source=str(result_file.relative_to(ROOT)))
    write_json(target, asset, indent=1)
    print(f"wrote {target} from {result_file.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--criteria", default="entropy,cross_entropy")
    StabilityOptions.add_arguments(parser, skip=("source", "batch_size"))  # --draws --samples --seq-len --seed
    parser.add_argument("--ratios", default="0.2,0.3,0.4")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--write-tour", action="store_true",
                        help="only (re)make assets/tour/draws.json from benchmarks/results/stability.json and exit")
    args = parser.parse_args(argv)
    if args.write_tour:
        write_tour()
        return
    command = "python benchmarks/stability.py " + " ".join(sys.argv[1:] if argv is None else argv)
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    ratios = [float(r) for r in args.ratios.split(",")]
    options = StabilityOptions.from_args(args)

    loaded = load_model(args.model)
    start = time.perf_counter()
    draws = draw_windows(loaded, options)
    scores = score_draws(loaded, criteria, draws, batch_size=options.batch_size, seed=args.seed,
                         on_draw=lambda c, k: print(f"scoring {c} on draw {k}", file=sys.stderr, flush=True))
    scoring_seconds = time.perf_counter() - start
    result = agreement(scores, ratios, {"model": args.model, **options.to_dict()})
    eval_ids = evaluation_windows(loaded.tokenizer, "wiki", args.eval_windows, args.eval_seq_len,
                                  max_length=loaded.max_length)
    start = time.perf_counter()
    fidelity = fidelity_over_draws(loaded, scores, ratios, eval_ids)
    eval_seconds = time.perf_counter() - start
    comparisons = compare_over_draws(fidelity, criteria[0], criteria[1]) if len(criteria) > 1 else []

    data = {"command": command, "machine": machine(), "model": args.model, "criteria": criteria,
            "draws": args.draws, "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
            "eval_windows": args.eval_windows, "eval_seq_len": args.eval_seq_len, "ratios": ratios,
            "scoring_seconds": scoring_seconds, "eval_seconds": eval_seconds, "summary": result.summary(),
            "stability": result.to_dict(), "fidelity": fidelity, "comparisons": comparisons}
    write_result("stability.json", json.dumps(data, indent=1))
    write_result("stability.md", markdown(data))
    print(markdown(data))


def markdown(data: dict) -> str:
    ratios = data["ratios"]
    lines = [f"## Rank stability over {data['draws']} disjoint calibration draws", "",
             (f"- model {data['model']}; each draw {data['samples']} × {data['seq_len']} calibration tokens "
             f"(wiki calibration articles, draws disjoint, draw 0 = seed {data['seed']}'s usual windows)"),
             (f"- KL to dense on {data['eval_windows']} × {data['eval_seq_len']} evaluation-article tokens "
              "after uniform "
             f"pruning with each draw's scores"),
             (f"- command: `{data['command']}` ({data['machine']}; scoring {data['scoring_seconds']:.0f} s, "
             f"evaluation {data['eval_seconds']:.0f} s)"), "",
             (f"### Rank agreement (mean over layers; draw vs draw: the "
              f"{data['draws'] * (data['draws'] - 1) // 2} pairs "
              f"of different draws of one criterion; same draw: each of the {data['draws']} draws scored by both "
              "criteria)"),
             ""]
    rows = [[r["comparison"], r["pairs"], f"{r['mean_rho']:.3f}", f"{r['min_layer_rho']:.3f}",
             *[f"{r[f'overlap@{x:g}']:.3f}" for x in ratios]] for r in data["summary"]]
    lines.append(markdown_table(["comparison", "pairs", "mean ρ", "lowest layer ρ",
                                 *[f"removal overlap @{x:g}" for x in ratios]], rows))
    lines += ["", "### KL to dense over the draws (nats/token)", ""]
    rows = [[r["criterion"], f"{r['ratio']:g}", f"{r['kl_mean']:.4f}", f"{r['kl_std']:.4f}",
             f"{r['kl_min']:.4f} – {r['kl_max']:.4f}", " / ".join(f"{v:.4f}" for v in r["kl_draws"])]
            for r in sorted(data["fidelity"], key=lambda r: (r["ratio"], r["criterion"]))]
    lines.append(markdown_table(["criterion", "ratio", "mean KL", "std over draws", "range", "per draw"], rows))
    if data["comparisons"]:
        a, b = data["comparisons"][0]["a"], data["comparisons"][0]["b"]
        lines += ["", f"### Is {a} vs {b} outside the draw-to-draw spread?", ""]
        rows = [[f"{c['ratio']:g}", f"{c['difference']:+.4f} ({100 * c['relative']:+.1f} %)",
                 f"{c['std_a']:.4f} / {c['std_b']:.4f}", "yes" if c["outside_spread"] else "no",
                 " / ".join(f"{d:+.4f}" for d in c["paired_differences"]), "yes" if c["same_sign"] else "no",
                 f"{c['paired_p']:.3f}"] for c in data["comparisons"]]
        lines.append(markdown_table(["ratio", f"KL {a} − {b} (mean)", "std over draws (a / b)",
                                     "ranges disjoint", "paired difference per draw", "same sign every draw",
                                     "paired t-test p"], rows))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
