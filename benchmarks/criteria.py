"""Criteria × allocation benchmark: fidelity of pruned models to the dense one.

For every criterion (scored once on N × L calibration windows from the wiki calibration split) and
every allocation (uniform / global / adaptive …) at each ratio, prune and measure on the held-out
evaluation articles (``core.data.evaluation_windows``): perplexity, mean per-token
KL(p_dense ‖ p_pruned), top-1 agreement — plus the scoring time and the allocation time. The rows
come from the engine's sweep (``core.sweep.FidelitySweep``, the code behind the dashboard's sweep
table); this script adds the scoring, the resume logic and the tables. Rows are
appended to ``benchmarks/results/criteria_<model>.json`` as they finish (``--resume`` skips done
rows) and the markdown tables go to ``criteria_<model>.md``.

    flock /tmp/hfprune-heavy.lock python benchmarks/criteria.py --model smollm2-135m
    flock /tmp/hfprune-heavy.lock python benchmarks/criteria.py --model gemma3-270m --samples 8 \\
        --eval-windows 4 --heldout-samples 2 --criteria entropy,cross_entropy,fisher,entropy+ce,self_distill,wanda
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from _common import RESULTS, write_json, write_text

from core.data.text import CalibrationOptions, evaluation_windows
from core.errors import HFPruneError, PruneConfigError
from core.importance.criteria import REGISTRY
from core.methods.oneshot import AllocationOptions, CompensationOptions, score_model
from core.models.loading import load_model
from core.studies.sweep import FidelitySweep, split_allocation

DEFAULT_CRITERIA = "entropy,cross_entropy,self_distill,fisher,entropy+ce,wanda,fluctuation,magnitude,random"
ALLOCATION_LABELS = {
    "uniform": "uniform",
    "global": "global (mean-normalised, min 10%)",
    "global-z": "global (z-score, min 10%)",
    "global-raw": "global (raw scores, min 10%)",
    "adaptive": "adaptive (KL, held-out, independent)",
}
# An allocation name may end in "+lsq": the same widths and neurons, then the least-squares
# down_proj refit of core.compensate (statistics from the dense model, computed once per run).


def parse_criterion(spec: str) -> tuple[str, str, dict]:
    """'self_distill:temperature=0.3,alpha=0.7' → (label, name, params)."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        params[key] = value if key == "aggregate" else float(value)
    return spec, name, params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--ratios", default="0.2,0.3,0.4")
    parser.add_argument("--criteria", default=DEFAULT_CRITERIA,
                        help="comma list; parameters as name:key=value;key=value")
    parser.add_argument("--allocations", default="uniform,global,adaptive",
                        help="uniform, global (global-z, global-raw), adaptive (independent per layer) and "
                             "adaptive-seq (AMP's last-to-first with later layers already pruned); append +lsq for "
                             "the least-squares down_proj compensation (e.g. uniform+lsq)")
    parser.add_argument("--adaptive-criteria", default="entropy,cross_entropy,fisher,entropy+ce,self_distill",
                        help="criteria that also get the (slow) adaptive allocation")
    parser.add_argument("--resume", action="store_true", help="keep finished rows of an earlier run")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    # the engine's option groups declare these flags (ranges, defaults, help), as for python -m core
    CalibrationOptions.add_arguments(parser.add_argument_group("calibration (scoring)"), skip=("source",))
    AllocationOptions.add_arguments(parser.add_argument_group("global / adaptive allocation"))
    CompensationOptions.add_arguments(parser.add_argument_group("+lsq compensation"), skip=("method",))
    args = parser.parse_args(argv)
    try:
        calibration = CalibrationOptions.from_args(args)
        options = AllocationOptions.from_args(args)
        compensation = CompensationOptions.from_args(args, method="lsq")
    except HFPruneError as exc:
        parser.error(str(exc))

    torch.manual_seed(args.seed)
    ratios = [float(r) for r in args.ratios.split(",")]
    allocations = [a for a in args.allocations.split(",") if a]
    adaptive_set = set(args.adaptive_criteria.split(","))
    criteria = [parse_criterion(c) for c in args.criteria.split(",") if c]
    for _label, name, _params in criteria:
        if name not in REGISTRY:
            parser.error(f"unknown criterion {name}")
    stem = f"criteria_{args.model.replace('/', '_')}{args.tag}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    command = "python benchmarks/criteria.py " + " ".join(sys.argv[1:] if argv is None else argv)

    loaded = load_model(args.model)
    eval_windows = evaluation_windows(loaded.tokenizer, "wiki", args.eval_windows, args.eval_seq_len,
                                      max_length=loaded.max_length)
    setup = {"model": args.model, "calibration": f"wiki calibration split, N={args.samples} x L={args.seq_len} "
             f"(seed {args.seed})",
             "evaluation": f"wiki evaluation articles, {args.eval_windows} x {args.eval_seq_len}",
             "adaptive_heldout": f"{args.heldout_samples} x {args.heldout_seq_len} calibration-split windows disjoint "
             f"from the scoring windows", "compensation": f"+lsq: least-squares down_proj refit on "
             f"{args.compensate_samples} x {args.compensate_seq_len} calibration windows, damping "
             f"{args.compensate_damping}", "ratios": ratios, "command": command, "threads": torch.get_num_threads()}
    rows: list[dict] = []
    if args.resume and json_path.exists():
        earlier_run = json.loads(json_path.read_text())
        rows = earlier_run.get("rows", [])
        if "compensation_statistics_s" in earlier_run.get("setup", {}):
            setup["compensation_statistics_s"] = earlier_run["setup"]["compensation_statistics_s"]
    done = {(r["criterion"], r["allocation"], r["ratio"]) for r in rows}

    def save():
        write_json(json_path, {"setup": setup, "rows": rows}, indent=1)
        write_text(md_path, render(setup, rows, ratios))
    for spec in allocations:
        try:
            split_allocation(spec)
        except PruneConfigError as exc:
            raise SystemExit(str(exc)) from exc
    sweep = FidelitySweep(loaded, eval_windows, options=options, compensation=compensation,
                          batch_size=args.batch_size)
    print(f"[bench] dense reference on {eval_windows.shape[0]}x{eval_windows.shape[1]} eval tokens", flush=True)
    if ("dense", "-", 0.0) not in done:
        dense = sweep.dense()
        rows.append({"criterion": "dense", "allocation": "-", "ratio": 0.0, "perplexity": dense.perplexity,
                     "kl": 0.0, "top1": 1.0, "score_s": 0.0, "alloc_s": 0.0, "cost": "-", "achieved_ratio": 0.0})
        save()
    for label, name, params in criteria:
        todo = [(a, r) for a in allocations for r in ratios if (label, a, r) not in done
                and (not a.startswith("adaptive") or label in adaptive_set or name in adaptive_set)]
        if not todo:
            continue
        print(f"[bench] scoring {label}", flush=True)
        result = score_model(loaded, name, samples=calibration.samples, seq_len=calibration.seq_len,
                             seed=calibration.seed, batch_size=calibration.batch_size, progress=False,
                             criterion_params=params)
        for allocation_spec, ratio in todo:
            plain = allocation_spec.partition("+")[0]
            earlier = None
            if plain != allocation_spec:  # the same widths as the plain row: no second search
                earlier = next((r for r in rows if "widths" in r
                                and (r["criterion"], r["allocation"], r["ratio"]) == (label, plain, ratio)), None)
            had_grams = sweep.grams is not None
            row = sweep.row(label, result, allocation_spec, ratio, reuse=earlier)
            if not had_grams and sweep.grams is not None:
                setup["compensation_statistics_s"] = round(sweep.grams_seconds, 1)
                print(f"[bench] compensation statistics in {setup['compensation_statistics_s']} s", flush=True)
            extra = {k: row[k] for k in ("tolerance", "evaluations", "search_ratio", "compensate_s") if k in row}
            rows.append({"criterion": label, "allocation": allocation_spec, "ratio": ratio,
                         "perplexity": row["perplexity"], "kl": row["kl_to_dense"], "top1": row["top1_agreement"],
                         "score_s": round(result.seconds, 2), "alloc_s": row["alloc_s"], "cost": result.config["cost"],
                         "achieved_ratio": row["achieved_ratio"], "widths": row["widths"], **extra})
            save()
            print(f"[bench] {label:>14} {allocation_spec:>10} r={ratio:.1f} kl={row['kl_to_dense']:.4f} "
                  f"ppl={row['perplexity']:.2f} top1={row['top1_agreement']:.3f} alloc={row['alloc_s']:.1f}s",
                  flush=True)
    save()
    print(md_path.read_text())
    return 0


def render(setup: dict, rows: list[dict], ratios: list[float]) -> str:
    lines = [f"## Criteria x allocation on `{setup['model']}`", "",
             f"- calibration: {setup['calibration']}", f"- evaluation: {setup['evaluation']}",
             f"- adaptive held-out slice: {setup['adaptive_heldout']}",
             *([f"- compensation: {setup['compensation']} (statistics {setup['compensation_statistics_s']} s, once "
                f"per run)"] if "compensation_statistics_s" in setup else []),
             f"- command: `{setup['command']}` ({setup['threads']} CPU threads)", ""]
    dense = next((r for r in rows if r["criterion"] == "dense"), None)
    if dense:
        lines += [f"Dense: perplexity {dense['perplexity']:.2f}.", ""]
    base = {r["ratio"]: r["kl"] for r in rows if r["criterion"] == "entropy" and r["allocation"] == "uniform"}
    combos = []
    for r in rows:
        key = (r["criterion"], r["allocation"])
        if r["criterion"] != "dense" and key not in combos:
            combos.append(key)
    lines += ["### KL to dense (nats/token; lower is better) and change vs uniform `entropy`", "",
              "| criterion | allocation | cost | " + " | ".join(f"KL @{r:.1f}" for r in ratios) + " | scoring s |",
              "|---|---|---|" + "---|" * len(ratios) + "---|"]
    by = {(r["criterion"], r["allocation"], r["ratio"]): r for r in rows}
    winners = []
    for crit, alloc in combos:
        cells, wins = [], True
        for ratio in ratios:
            r = by.get((crit, alloc, ratio))
            if r is None:
                cells.append("–")
                wins = False
                continue
            if ratio in base:
                change = r["kl"] / base[ratio] - 1.0
                wins &= change <= -0.20
                cells.append(f"{r['kl']:.4f} ({change:+.0%})")
            else:
                cells.append(f"{r['kl']:.4f}")
                wins = False
        some = next(r for r in rows if r["criterion"] == crit)  # the criterion's first (plain) scoring run
        lines.append(f"| {crit} | {alloc} | {some['cost']} | " + " | ".join(cells) + f" | {some['score_s']:.1f} |")
        if wins and base:
            winners.append(f"{crit} + {alloc}")
    lines += ["", "### All metrics", "",
              "| criterion | allocation | ratio | achieved | perplexity | KL | top-1 | scoring s | allocation s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["criterion"] == "dense":
            continue
        lines.append(f"| {r['criterion']} | {r['allocation']} | {r['ratio']:.1f} | {r['achieved_ratio']:.4f} | "
                     f"{r['perplexity']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | {r['score_s']:.1f} | "
                     f"{r['alloc_s']:.1f} |")
    lines += [""]
    if base:
        best = []
        for ratio in ratios:
            cands = [r for r in rows if r["ratio"] == ratio and r["criterion"] != "dense"]
            if cands:
                b = min(cands, key=lambda r: r["kl"])
                best.append(f"@{ratio:.1f}: {b['criterion']} + {b['allocation']} KL {b['kl']:.4f} "
                            f"({b['kl'] / base.get(ratio, b['kl']) - 1:+.0%} vs uniform entropy)")
        lines += ["Best per ratio: " + "; ".join(best) + ".", "",
                  "Combinations at least 20% below uniform entropy's KL at every ratio: " +
                  (", ".join(winners) if winners else "none") + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
