"""DDP vs one-shot pruning at equal wall-clock training budgets on the CPU (issue 12).

For each ratio of MLP neurons removed, on the default model:

- ``one-shot uniform+lsq`` / ``one-shot global+lsq``: entropy-Taylor scores (16 x 128 calibration
  windows), the same width in every layer or one global ranking after per-layer normalisation
  (min 10 % per layer), then the least-squares down_proj refit (128 x 128 windows) — no training;
- ``one-shot+recovery``: the uniform+lsq model distilled from the dense one (core.recover, MLP
  projections, lr 1e-3) for the budget;
- ``DDP cold``: gates N(1, 0.01) trained for the budget (core.ddp), hardened at the exact target;
- ``DDP warm``: the same, gates started from the entropy scores.

Every model is measured on the held-out *evaluation* articles against the dense model: mean per-token
KL, top-1 agreement, perplexity; with the training tokens seen, the training minutes and the
preparation seconds (scores, refit statistics) each row needed, and the per-layer widths chosen.
Before the grid, short DDP probes pick the gate learning rate by the hardened model's KL on a held-out
slice of the *calibration* split (never the evaluation articles) unless ``--lr`` is given.

    python benchmarks/ddp.py --ratios 0.2,0.3 --minutes 2

Heavy: run under ``flock /tmp/heavy.lock``. Writes benchmarks/results/ddp{tag}.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from _common import RESULTS, machine, markdown_table, write_json, write_text

from core.data.text import evaluation_windows
from core.importance.stats import top_k_indices
from core.measure.evaluate import Reference, evaluate
from core.methods.gates import TRAIN_DEFAULTS, DDPOptions, ddp
from core.methods.oneshot import CompensationOptions, compensation_grams, plan_widths, score_model
from core.methods.recover import RecoverOptions, recover
from core.models.loading import LoadedModel, load_model
from core.models.slicing import prune_mlp_neurons
from core.prune.compensate import compensate_pruned
from core.train.loop import TrainOptions


def measure(model, windows, reference: Reference) -> dict:
    result = evaluate(model, windows, reference, batch_size=4, progress=False)
    return {"kl": result.kl_to_reference, "top1": result.top1_agreement, "perplexity": result.perplexity}


def render(setup: dict, rows: list[dict], probes: list[dict]) -> str:
    lines = [f"## DDP vs one-shot on `{setup['model']}` at equal wall-clock training budgets", "",
             f"- evaluation: {setup['evaluation']}", f"- training text: {setup['training']}",
             f"- DDP: {setup['ddp']}", f"- recovery: {setup['recovery']}", f"- machine: {setup['machine']}",
             "- commands:", ""]
    lines += [f"      {c}" for c in setup["commands"]] + [""]
    headers = ["ratio", "method", "train min", "prep s", "tokens", "steps", "KL", "top-1", "ppl",
               "widths min / mean / max", "hardened held-out KL"]
    table = []
    for r in sorted(rows, key=lambda r: (r["ratio"], r["order"])):
        w = r["widths"]
        held = (f"{r['heldout_before']:.3f} → {r['heldout_after']:.3f}" if r.get("heldout_after") is not None
                else "-")
        table.append([f"{r['ratio']:.0%}", r["method"], f"{r['minutes']:g}", f"{r['prep_seconds']:.0f}",
                      r.get("tokens", 0), r.get("steps", 0), f"{r['kl']:.4f}", f"{r['top1']:.3f}",
                      f"{r['perplexity']:.2f}", f"{min(w)} / {sum(w) / len(w):.0f} / {max(w)}", held])
    lines.append(markdown_table(headers, table))
    if probes:
        lines += ["", "### Gate learning-rate probes (DDP cold, first ratio; chosen by the hardened model's KL on "
                  "held-out *calibration* windows)", "",
                  markdown_table(["lr", "minutes", "steps", "tokens", "hardened held-out KL", "final ŝ", "chosen"],
                                 [[p["lr"], f"{p['minutes']:g}", p["steps"], p["tokens"], f"{p['heldout_after']:.4f}",
                                   f"{p['expected_sparsity']:.3f}", "yes" if p.get("chosen") else ""]
                                  for p in probes])]
    lines += ["", "### Per-layer MLP widths", ""]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["order"])):
        if r["method"].startswith(("one-shot global", "DDP")):
            lines.append(f"- {r['ratio']:.0%} {r['method']}: {r['widths']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget of every trained row")
    parser.add_argument("--lr", type=float, default=0.0, help="gate learning rate (0 = pick by the probes)")
    parser.add_argument("--probe-lrs", default="0.05,0.1")
    parser.add_argument("--probe-minutes", type=float, default=1.0)
    parser.add_argument("--seq-len", type=int, default=DDPOptions.seq_len,
                        help="training window length (DDP and recovery)")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"],
                        help="training windows per step (DDP and recovery)")
    parser.add_argument("--methods", default="oneshot,recovery,cold,warm",
                        help="rows to run: oneshot (uniform/global +lsq), recovery, cold, warm, cold-l10 / warm-l10 "
                             "(DDP with ten times the λ learning rates)")
    parser.add_argument("--recovery-lr", type=float, default=1e-3)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    json_path, md_path = RESULTS / f"ddp{args.tag}.json", RESULTS / f"ddp{args.tag}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",") if r]
    methods = {m for m in args.methods.split(",") if m}
    command = "python benchmarks/ddp.py " + " ".join(sys.argv[1:] if argv is None else argv)
    setup = {"model": args.model, "machine": machine(), "commands": [command],
             "evaluation": f"wiki evaluation articles, {args.eval_windows} x {args.eval_seq_len} tokens; KL(dense ‖ "
                           "model) per token, top-1 agreement, perplexity",
             "training": f"wiki calibration split, {args.batch_size} x {args.seq_len}-token windows per step (8 x 128 "
                         "held out for the KL curve)",
             "ddp": "MLP neurons, warm-up "
                    f"{TRAIN_DEFAULTS['warmup_steps']} steps then cosine, λ lr 2e-2 / 0.4 (ascent, constant), "
                    "loss CE + 2·KL, hardened at the exact global top-k; warm start: entropy scores mapped to "
                    "[0.5, 1]",
             "recovery": f"MLP projections, AdamW lr {args.recovery_lr:g}, KL to dense (τ 1), warm-up 3 steps"}
    rows: list[dict] = []
    probes: list[dict] = []

    def save():
        write_json(json_path, {"setup": setup, "rows": rows, "probes": probes}, indent=1)
        write_text(md_path, render(setup, rows, probes))
    dense = load_model(args.model)
    eval_ids = evaluation_windows(dense.tokenizer, "wiki", args.eval_windows, args.eval_seq_len,
                                  max_length=dense.max_length)
    reference = Reference(dense.model, eval_ids, 4)
    t = time.perf_counter()
    scores = score_model(dense, "entropy", samples=16, seq_len=128, seed=0, progress=False).scores
    score_seconds = time.perf_counter() - t
    t = time.perf_counter()
    compensation = CompensationOptions("lsq")
    grams = compensation_grams(dense, compensation, progress=False) if methods & {"oneshot", "recovery"} else []
    gram_seconds = time.perf_counter() - t
    print(f"[bench] scores {score_seconds:.0f} s, lsq statistics {gram_seconds:.0f} s", flush=True)

    def ddp_run(ratio: float, lr: float, minutes: float, warm: bool, lambda_scale: float = 1.0):
        options = DDPOptions(ratio=ratio, warm_start=warm, seq_len=args.seq_len, lambda_lr=2e-2 * lambda_scale,
                             lambda2_lr=0.4 * lambda_scale)
        train = TrainOptions(**{**TRAIN_DEFAULTS, "lr": lr, "minutes": minutes, "batch_size": args.batch_size})
        return ddp(dense, options, train, scores=scores if warm else None)

    lr = args.lr
    if not lr:
        for probe_lr in [float(x) for x in args.probe_lrs.split(",") if x]:
            print(f"[bench] probe lr {probe_lr:g}", flush=True)
            result = ddp_run(ratios[0], probe_lr, args.probe_minutes, warm=False)
            record = result.meta["ddp"]
            probes.append({"lr": probe_lr, "minutes": args.probe_minutes, "steps": record["steps"],
                           "tokens": record["tokens_seen"], "heldout_after": record["heldout_kl_hardened_after"],
                           "expected_sparsity": result.history[-1]["mlp"]["expected_sparsity"]})
            save()
        best = min(probes, key=lambda p: p["heldout_after"])
        best["chosen"] = True
        lr = best["lr"]
    setup["ddp"] = f"gate lr {lr:g}, " + setup["ddp"]

    for ratio in ratios:
        oneshot = {}
        for order, allocation in enumerate(("uniform", "global")):
            if not methods & {"oneshot", "recovery"}:
                break
            widths = plan_widths(dense.model, ratio, allocation, scores=scores)
            kept = top_k_indices(scores, widths)
            model = compensate_pruned(prune_mlp_neurons(dense.model, kept), dense.model, kept, grams,
                                      compensation.damping)
            oneshot[allocation] = (model, kept, widths)
            if "oneshot" not in methods:
                continue
            rows.append({"ratio": ratio, "method": f"one-shot {allocation}+lsq", "order": order, "minutes": 0.0,
                         "prep_seconds": score_seconds + gram_seconds, "widths": widths,
                         **measure(model, eval_ids, reference)})
            save()
        if "recovery" in methods:
            model, kept, widths = oneshot["uniform"]
            print(f"[bench] {ratio:g} one-shot + recovery", flush=True)
            student = LoadedModel(model, dense.tokenizer, f"{args.model}-uniform-lsq-{ratio:g}", "")
            result = recover(student, dense, RecoverOptions(params="mlp", seq_len=args.seq_len),
                             TrainOptions(minutes=args.minutes, lr=args.recovery_lr, warmup_steps=3, eval_every=10,
                                          batch_size=args.batch_size))
            tr = result.train
            rows.append({"ratio": ratio, "method": "one-shot uniform+lsq + recovery", "order": 2,
                         "minutes": args.minutes, "prep_seconds": score_seconds + gram_seconds, "widths": widths,
                         "tokens": tr.tokens, "steps": tr.steps, "heldout_before": tr.initial_heldout,
                         "heldout_after": tr.final_heldout, "best_step": tr.best_step, "timing": tr.timing,
                         **measure(result.model, eval_ids, reference)})
            save()
        variants = [(3, False, 1.0), (4, True, 1.0), (5, False, 10.0), (6, True, 10.0)]
        for order, warm, lambda_scale in variants:
            key = ("warm" if warm else "cold") + ("-l10" if lambda_scale != 1.0 else "")
            name = ("DDP warm" if warm else "DDP cold") + (f" λ lr ×{lambda_scale:g}" if lambda_scale != 1.0 else "")
            if key not in methods:
                continue
            print(f"[bench] {ratio:g} {name}", flush=True)
            result = ddp_run(ratio, lr, args.minutes, warm, lambda_scale)
            record = result.meta["ddp"]
            rows.append({"ratio": ratio, "method": name, "order": order, "minutes": args.minutes,
                         "prep_seconds": score_seconds if warm else 0.0, "widths": result.plan.widths(),
                         "tokens": record["tokens_seen"], "steps": record["steps"],
                         "heldout_before": record["heldout_kl_hardened_before"],
                         "heldout_after": record["heldout_kl_hardened_after"], "best_step": record["best_step"],
                         "final_point": record["final_point"], "timing": record["timing"],
                         "curve": [{k: p[k] for k in ("step", "tokens", "heldout", "elapsed")}
                                   for p in record["curve"] if p["heldout"] is not None],
                         **measure(result.model, eval_ids, reference)})
            save()
            print(f"[bench]   KL {rows[-1]['kl']:.4f} ({record['steps']} steps)", flush=True)
    save()


if __name__ == "__main__":
    main()
