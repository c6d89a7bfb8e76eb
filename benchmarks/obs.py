"""Refit-aware selection (issue 21 §2): does choosing neurons by the OBS error of an entropy-weighted
reconstruction beat the entropy-Taylor score once both get the same least-squares refit?

For every selection (a criterion spec, scored on N × 128 windows of the wiki calibration split) and
ratio, the model is pruned with uniform widths, every down_proj is refitted by the engine's
least-squares compensation (the criteria benchmark's setting: 128 × 128 calibration windows, damping
0.1, statistics computed once), and KL(p_dense ‖ p_pruned) per token is measured on two texts: the wiki
evaluation articles and the built-in news text's evaluation split (8 × 128 each, as
benchmarks/criteria.py). Each row also records the scoring time and how many kept neurons it shares
with entropy's kept set at the same ratio.

A selection spec is ``name[:key=value;key=value][@N][+wlsq]`` — ``obs:weighting=entropy;power=2@128``
scores the ``obs`` criterion with those parameters on 128 calibration windows (default N: --samples);
``+wlsq`` refits with the entropy-weighted Gram instead (Σ_t ‖∂H/∂y_t‖ a_t a_tᵀ on the same refit
windows, ``core.importance.obs.weighted_grams``: "OBS for the update").
Rows go to benchmarks/results/obs_<model>{tag}.json as they finish (``--resume`` keeps them) and the
table to the matching .md.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/obs.py --resume
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _common import RESULTS, machine, markdown_table, write_json, write_text

from core.data.text import calibration_windows, evaluation_windows
from core.errors import HFPruneError
from core.importance.criteria import EntropyCriterion, get_criterion
from core.importance.obs import weighted_grams
from core.importance.stats import top_k_indices
from core.methods.oneshot import CompensationOptions, score_model
from core.models.adapters import mlp_widths
from core.models.loading import load_model
from core.prune.allocate import uniform_widths
from core.studies.sweep import FidelitySweep

DEFAULT_SELECTIONS = ("entropy,cross_entropy,entropy@128,obs:weighting=none@128,obs:weighting=entropy,"
                      "obs:weighting=entropy@128,obs:weighting=entropy;power=2@128")
TEXTS = ("wiki", "news")


def parse_selection(spec: str, samples: int) -> tuple[str, dict, int]:
    """'obs:weighting=entropy;power=2@128' → ('obs', {'weighting': 'entropy', 'power': 2.0}, 128)."""
    body, _, count = spec.removesuffix("+wlsq").partition("@")
    name, _, rest = body.partition(":")
    params: dict = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        try:
            params[key] = float(value)
        except ValueError:
            params[key] = value
    get_criterion(name, **params)  # a bad name or parameter fails before any work
    return name, params, int(count) if count else samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--selections", default=DEFAULT_SELECTIONS, help="comma list of selection specs")
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of a spec without @N")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--allocation", default="uniform", choices=("uniform", "adaptive"),
                        help="widths of every row (adaptive: the engine's search, per selection and ratio)")
    parser.add_argument("--resume", action="store_true", help="keep finished rows of an earlier run")
    parser.add_argument("--tag", default="")
    CompensationOptions.add_arguments(parser.add_argument_group("least-squares refit"), skip=("method",))
    args = parser.parse_args(argv)
    try:
        compensation = CompensationOptions.from_args(args, method="lsq")
        selections = [(spec, *parse_selection(spec, args.samples)) for spec in args.selections.split(",") if spec]
    except HFPruneError as exc:
        parser.error(str(exc))
    ratios = [float(r) for r in args.ratios.split(",")]
    stem = f"obs_{args.model.replace('/', '_')}{args.tag}"
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    command = "python benchmarks/obs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    setup = {"model": args.model, "ratios": ratios, "machine": machine(),
             "calibration": f"wiki calibration split, N x {args.seq_len} (seed 0)",
             "evaluation": f"{args.eval_windows} x {args.eval_seq_len} evaluation windows of each text",
             "refit": f"lsq on {compensation.samples} x {compensation.seq_len} wiki calibration windows, "
                      f"damping {compensation.damping}", "commands": []}
    rows: list[dict] = []
    if args.resume and json_path.exists():
        earlier = json.loads(json_path.read_text())
        rows, setup["commands"] = earlier.get("rows", []), earlier.get("setup", {}).get("commands", [])
    setup["commands"].append(command)
    done = {(r["selection"], r["ratio"], r.get("allocation", "uniform")) for r in rows}

    def save() -> None:
        write_json(json_path, {"setup": setup, "rows": rows}, indent=1)
        write_text(md_path, render(setup, rows, ratios))

    torch.manual_seed(0)
    loaded = load_model(args.model)
    sweeps = {text: FidelitySweep(loaded, evaluation_windows(loaded.tokenizer, text, args.eval_windows,
                                                             args.eval_seq_len, max_length=loaded.max_length),
                                  compensation=compensation, batch_size=args.batch_size) for text in TEXTS}
    weighted = {text: FidelitySweep(loaded, sweep.windows, compensation=compensation, batch_size=args.batch_size)
                for text, sweep in sweeps.items()}  # the +wlsq refit: entropy-weighted Grams
    entropy_kept: dict[float, list[torch.Tensor]] = {}
    full = mlp_widths(loaded.model)
    for spec, name, params, samples in selections:
        todo = [r for r in ratios if (spec, r, args.allocation) not in done]
        if not todo and not (name == "entropy" and not params and samples == args.samples):
            continue
        print(f"[obs] scoring {spec} on {samples} x {args.seq_len}", flush=True)
        result = score_model(loaded, name, samples=samples, seq_len=args.seq_len, seed=0,
                             batch_size=args.batch_size, progress=False, criterion_params=params)
        if name == "entropy" and not params and samples == args.samples:
            entropy_kept = {r: top_k_indices(result.scores, uniform_widths(full, r)) for r in ratios}
        widths: dict[float, dict] = {}
        for ratio in todo:
            row = {"selection": spec, "criterion": name, "params": result.config["criterion_params"],
                   "samples": samples, "ratio": ratio, "allocation": args.allocation,
                   "score_s": round(result.seconds, 1),
                   "cost": result.config["cost"]}
            if spec.endswith("+wlsq") and weighted["wiki"].grams is None:
                start = time.perf_counter()
                ids = calibration_windows(loaded.tokenizer, "wiki", compensation.samples, compensation.seq_len, 0)
                stats = weighted_grams(loaded.model, ids, EntropyCriterion(), power=1.0, batch_size=args.batch_size,
                                       progress=False)
                for sweep in weighted.values():
                    sweep.grams, sweep.reference = stats.grams, sweeps[sweep_text(sweeps, sweep)].reference
                setup["weighted_statistics_s"] = round(time.perf_counter() - start, 1)
            for text, sweep in (weighted if spec.endswith("+wlsq") else sweeps).items():
                if sweep.grams is None and sweeps["wiki"].grams is not None:
                    sweep.grams = sweeps["wiki"].grams  # one set of refit statistics (wiki calibration)
                start = time.perf_counter()
                got = sweep.row(spec, result, f"{args.allocation}+lsq", ratio, reuse=widths.get(ratio))
                widths.setdefault(ratio, got)  # the second text reuses the first one's widths (no second search)
                row[f"kl_{text}"], row[f"top1_{text}"] = got["kl_to_dense"], got["top1_agreement"]
                row[f"eval_s_{text}"] = round(time.perf_counter() - start, 1)
            if sweeps["wiki"].grams_seconds is not None:
                setup["refit_statistics_s"] = round(sweeps["wiki"].grams_seconds, 1)
            kept = top_k_indices(result.scores, widths[ratio]["widths"])
            if ratio in entropy_kept and args.allocation == "uniform":
                shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(kept, entropy_kept[ratio]))
                row["overlap_with_entropy"] = round(shared / sum(len(k) for k in kept), 4)
            rows.append(row)
            save()
            print(f"[obs] {spec:>40} r={ratio:.1f} KL wiki {row['kl_wiki']:.4f} news {row['kl_news']:.4f} "
                  f"score {row['score_s']} s", flush=True)
    save()
    print(md_path.read_text())
    return 0


def label(row: dict) -> str:
    """A row's selection in words: obs rows name their weighting and power as recorded."""
    refit = " + weighted refit" if row["selection"].endswith("+wlsq") else ""
    if row["criterion"] != "obs":
        return row["criterion"] + refit
    p = row["params"]
    weights = "unweighted" if p["weighting"] == "none" else f"{p['weighting']}-weighted, power {p['power']:g}"
    return f"obs ({weights}){refit}"


def sweep_text(sweeps: dict, sweep: FidelitySweep) -> str:
    """The text whose evaluation windows ``sweep`` measures on."""
    return next(t for t, other in sweeps.items() if torch.equal(other.windows, sweep.windows))


def render(setup: dict, rows: list[dict], ratios: list[float]) -> str:
    lines = [f"## Refit-aware selection on `{setup['model']}` (uniform widths, every row + lsq refit)", "",
             f"- calibration (scoring): {setup['calibration']}, N per row",
             f"- refit: {setup['refit']}" + (f" (statistics {setup['refit_statistics_s']} s, once)"
                                             if "refit_statistics_s" in setup else ""),
             f"- evaluation: {setup['evaluation']}; KL(p_dense ‖ p_pruned) per token, nats",
             f"- machine: {setup['machine']}", "- commands:", "",
             *[f"      {c}" for c in setup["commands"]], ""]
    base = {(r["ratio"], t, r.get("allocation", "uniform")): r[f"kl_{t}"] for r in rows if r["selection"] == "entropy"
            for t in ("wiki", "news")}
    table = []
    for r in sorted(rows, key=lambda r: (r.get("allocation", "uniform") != "uniform", r["ratio"], r["samples"],
                                         label(r))):
        cells = []
        for text in ("wiki", "news"):
            ref = base.get((r["ratio"], text, r.get("allocation", "uniform")))
            change = f" ({r[f'kl_{text}'] / ref - 1:+.1%})" if ref and r["selection"] != "entropy" else ""
            cells.append(f"{r[f'kl_{text}']:.4f}{change}")
        table.append([label(r), r.get("allocation", "uniform"), f"{r['ratio']:.0%}", r["samples"], *cells,
                      f"{(r['kl_wiki'] + r['kl_news']) / 2:.4f}", f"{r['top1_wiki']:.3f}",
                      f"{r.get('overlap_with_entropy', float('nan')):.1%}", r["score_s"]])
    lines += ["Change in brackets: against entropy on 16 windows with the same widths rule + the same refit (the "
              "criteria table's rows).", "",
              markdown_table(["selection (+ lsq refit)", "widths", "ratio", "windows", "KL wiki", "KL news",
                              "mean of both", "top-1 wiki", "kept ∩ entropy", "scoring s"], table), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
