"""The six-order ablation of prune → quantize → distil on the embedded model, measured on this CPU.

Every order of {prune, quantize, distill} (``core.pipeline.run_ablation``) at the same settings and the
same training budget, plus the dense fp32 model, the one-shot pruned fp32 model (``p``) and the dense
post-training-quantised model (``q``): size on disk, weights in memory, measured prefill (1 × 512) and
decode latency with their speed-ups over dense fp32 (median and quartile interval) beside the FLOP ideal,
peak memory, perplexity and KL to dense on held-out wiki windows, both shipped zero-shot tasks.

Rows are stored as runs under ``--runs`` and exported under ``--out``, so an interrupted benchmark resumes
where it stopped when run again with the same flags.

    flock /tmp/heavy.lock python benchmarks/pipeline.py --ratio 0.2 --steps 40 --zeroshot-limit 40

Writes benchmarks/results/pipeline{tag}.{json,md} and pipeline{tag}.png.
"""
from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS, machine, markdown_table, write_json, write_text

from core.data.text import CalibrationOptions
from core.methods.pipeline import ALL_ORDERS, MeasureOptions, PipelineOptions, ablation_plot, run_ablation
from core.models.loading import load_model
from core.paths import cache_dir
from core.prune.allocate import AllocationOptions
from core.prune.compensate import CompensationOptions
from core.quantize.fake import FORMATS
from core.runs import RunStore
from core.train.loop import DistillOptions, TrainOptions


def verdicts(rows: list[dict], ratio: float) -> list[str]:
    """The issue's targets and the seed's three claims, read off the measured rows."""
    by = {r["order"]: r for r in rows}
    out = []

    def speed(r: dict) -> str:
        return f"prefill {r['prefill_speedup']:.2f}× / decode {r['decode_speedup']:.2f}×"

    if "p" in by:
        out.append(f"Claim 1 (pruning alone buys little speed): the {ratio:.0%} one-shot pruned fp32 model runs at "
                   f"{speed(by['p'])} against a FLOP ideal of {by['p']['ideal_speedup']:.2f}×.")
    if "q" in by:
        out.append(f"Claim 2 (INT8 is what makes it fast): the dense model in {by['q']['format']} runs at "
                   f"{speed(by['q'])} (KL to dense {by['q']['kl_to_dense']:.4f}).")
    full = [by[o] for o in ALL_ORDERS if o in by]
    if full:
        ranked = sorted(full, key=lambda r: r["kl_to_dense"])
        out.append("Claim 3 (distil last, after quantizing): KL to dense by order, best first: " + ", ".join(
            f"{r['order']} {r['kl_to_dense']:.4f}" for r in ranked) + ".")
    if "pqd" in by:
        r = by["pqd"]
        fast = r["prefill_speedup"] >= 1.4 and r["decode_speedup"] >= 1.4
        out.append(f"Target speed (P→Q→D ≥ 1.4× dense fp32 in prefill and decode): {speed(r)} — "
                   f"{'met' if fast else 'not met'}.")
        if "p" in by:
            paid = r["kl_to_dense"] <= by["p"]["kl_to_dense"]
            out.append(f"Target quality (P→Q→D KL ≤ one-shot pruned fp32 KL): {r['kl_to_dense']:.4f} vs "
                       f"{by['p']['kl_to_dense']:.4f} — {'met' if paid else 'not met'}.")
    return out


def distil_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        for stage in r.get("stages") or []:
            if stage.get("stage") != "distill":
                continue
            if stage.get("skipped"):
                out.append([r["order"], "skipped: " + stage["skipped"], 0, 0, 0, "–"])
                continue
            kind = "QAT (fake-quantised student)" if stage.get("qat") else "fp32 (quantised afterwards)"
            out.append([r["order"], kind, stage.get("steps"), stage.get("tokens_seen"), stage.get("train_seconds"),
                        f"{stage.get('heldout_kl_before', float('nan')):.4f} → "
                        f"{stage.get('heldout_kl_after', float('nan')):.4f}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--quant", default="int8-dynamic", choices=list(FORMATS))
    parser.add_argument("--criterion", default="entropy")
    parser.add_argument("--round-to", type=int, default=16)
    parser.add_argument("--compensate", default="none", choices=("none", "lsq"))
    parser.add_argument("--params", default="full", choices=("full", "mlp"))
    parser.add_argument("--steps", type=int, default=40, help="distil budget per order (steps; same for every order)")
    parser.add_argument("--minutes", type=float, default=0.0, help="…or a wall-clock budget per order")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=CalibrationOptions.samples,
                        help="calibration windows for scoring")
    parser.add_argument("--seq-len", type=int, default=CalibrationOptions.seq_len,
                        help="tokens per scoring / training window")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--zeroshot-limit", type=int, default=40)
    parser.add_argument("--orders", default=",".join(ALL_ORDERS))
    parser.add_argument("--out", default=str(cache_dir() / "bench" / "pipeline"))
    parser.add_argument("--runs", default=str(cache_dir() / "bench" / "pipeline_runs"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    started = time.time()
    loaded = load_model(args.model)
    options = PipelineOptions(ratio=args.ratio, quant=args.quant, criterion=args.criterion, round_to=args.round_to,
                              params=args.params)
    train = TrainOptions(steps=args.steps, minutes=args.minutes, lr=args.lr, warmup_steps=max(1, args.steps // 10),
                         eval_every=max(1, args.steps // 4) if args.steps else 20, batch_size=4)
    measure = MeasureOptions(eval_windows=args.eval_windows, decode_tokens=args.decode_tokens,
                             speed_repeats=args.speed_repeats, zeroshot_limit=args.zeroshot_limit)
    calibration = CalibrationOptions(samples=args.samples, seq_len=args.seq_len)
    compensation = CompensationOptions(method=args.compensate)

    def say(event: dict) -> None:
        if event.get("state") in ("start", "resumed"):
            print(f"[{time.strftime('%H:%M:%S')}] {event.get('order') or 'dense'}: {event.get('stage')} "
                  f"{event['state']}", flush=True)

    def row_done(row: dict) -> None:
        print(json.dumps({k: row.get(k) for k in ("order", "kl_to_dense", "perplexity", "prefill_speedup",
                                                   "decode_speedup", "resumed")}), flush=True)

    result = run_ablation(loaded, options, out_root=args.out, orders=tuple(args.orders.split(",")),
                          store=RunStore(args.runs), calibration=calibration, allocation=AllocationOptions(),
                          compensation=compensation, train_options=train, distill=DistillOptions(), measure=measure,
                          on_event=say, on_row=row_done)
    minutes = round((time.time() - started) / 60, 1)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                     if k not in ("out", "runs", "tag") and v not in (None, ""))
    command = f"python benchmarks/pipeline.py {flags}"
    notes = verdicts(result.rows, args.ratio)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"pipeline{args.tag}"
    write_json(RESULTS / f"{name}.json",
               {"machine": machine(), "command": command, "minutes_this_call": minutes,
                "settings_key": result.settings_key, "rows": result.rows, "verdicts": notes}, indent=2, default=str)
    ablation_plot(result.rows, RESULTS / f"{name}.png")
    kinds = {r.get("storage") for r in result.rows if r.get("storage")}
    storage = ("INT8 layers stored as int8 weights + scales, embeddings and norms fp32" if "int8" in kinds else
               "fp32 source weights + recipe; the INT8 weights are made on load")
    header = (f"Machine: {machine()}. Model: {args.model}; {args.ratio:.0%} of MLP neurons removed "
              f"({args.criterion}, uniform widths rounded to {args.round_to}, refit {args.compensate}); format "
              f"{args.quant}; distil budget {args.steps or args.minutes} {'steps' if args.steps else 'min'} per order "
              f"(batch 4 × {args.seq_len} tokens, lr {args.lr}, {args.params} parameters, KL τ = 1, calibration-split "
              f"text); perplexity / KL on {args.eval_windows} × 128 held-out wiki tokens; prefill 1 × 512 and "
              f"{args.decode_tokens}-token decode, median of ≥ {args.speed_repeats} repeats (interval = quartiles); "
              f"zero-shot on the first {args.zeroshot_limit} items per task. Disk = the exported folder ({storage}). "
              f"Command: `{command}` ({minutes} min this call; "
              f"rows reused from stored runs: {sum(1 for r in result.rows if r.get('resumed'))}).")
    text = "\n".join([header, "", result.table, "", "Distil stage of each order (held-out KL on calibration-split "
                      "windows, before → after; the student ends at its best held-out checkpoint):", "",
                      markdown_table(["order", "distil stage", "steps", "tokens", "seconds", "held-out KL"],
                                     distil_rows(result.rows)), "",
                      "1-minute load average of this 2-core machine while each row was timed (other work shares "
                      "it; speed-ups read across rows timed at different loads are less certain): " + ", ".join(
                          f"{r.get('order') or 'dense'} {r.get('load_average', float('nan')):.1f}"
                          for r in result.rows) + ".", "", *[f"- {n}" for n in notes]]) + "\n"
    write_text(RESULTS / f"{name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
