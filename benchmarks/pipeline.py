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

With a GGUF format (``--quant gguf-q4_0``, issue 22 §4) every order is exported as a .gguf file of that type
(an order without ``q`` as F16) and all files are measured together in llama.cpp (``core.pipeline.measure_gguf``:
prompt / generation tokens/s, interleaved repeats, KL to dense F16 from llama.cpp's logits) beside the dense
model as F16, Q8_0 and the format; the composition target of the issue is read off the rows. Exports are kept
under ``--out``/gguf-…, so a second call with more ``--orders`` only runs the new ones (and measures all):

    flock /tmp/heavy.lock python benchmarks/pipeline.py --quant gguf-q4_0 --round-to 32 --compensate lsq \
        --steps 12 --orders pqd,pdq,pq,p

Writes benchmarks/results/pipeline_gguf-q4_0{tag}.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _common import RESULTS, machine, markdown_table, write_json, write_text

from core.data.text import CalibrationOptions, evaluation_windows
from core.measure.evaluate import Reference, evaluate
from core.methods.pipeline import (
    ALL_ORDERS,
    MeasureOptions,
    PipelineOptions,
    Shared,
    ablation_plot,
    dense_gguf_file,
    gguf_path,
    measure_gguf,
    parse_order,
    row_label,
    run_ablation,
    run_pipeline,
)
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
    parser.add_argument("--eval-seq-len", type=int, default=128, help="tokens per evaluation window")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    args = parser.parse_args()
    if FORMATS[args.quant].gguf:
        return main_gguf(args)

    started = time.time()
    loaded = load_model(args.model)
    options, train, calibration, compensation = option_groups(args)
    measure = MeasureOptions(eval_windows=args.eval_windows, decode_tokens=args.decode_tokens,
                             speed_repeats=args.speed_repeats, zeroshot_limit=args.zeroshot_limit)

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


COMPOSE = 0.9  # issue 22: P→Q→D speed-up over dense F16 ≥ 90 % of (dense format ÷ dense F16) × the FLOP ideal


def paired(base_ms: list[float], this_ms: list[float]) -> float:
    """Median over interleaved rounds of base time / this time (round i of both was timed back to back)."""
    ratios = sorted(b / t for b, t in zip(base_ms, this_ms, strict=True))
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def gguf_verdicts(rows: dict[str, dict], kind: str, torch_kl: dict[str, float]) -> list[str]:
    """The issue's composition target read off the llama.cpp rows: P→Q→D in the format against dense F16, in
    prompt and in generation, against COMPOSE × (dense format ÷ dense F16) × FLOP ideal; its KL against the
    pruned fp32 model's (with the refit)."""
    out = []
    dense_fmt, pqd = rows.get(f"dense {kind.upper()}"), rows.get("pqd")
    if dense_fmt is None or pqd is None:
        return ["P→Q→D or the dense model in the format was not measured: no verdict."]
    for phase, word in (("prefill", "prompt"), ("decode", "generation")):
        fmt_up, got, ideal = dense_fmt[f"{phase}_speedup"], pqd[f"{phase}_speedup"], pqd["ideal_speedup"]
        bar = COMPOSE * fmt_up * ideal
        key = f"{phase}_ms_all"
        same = paired(dense_fmt[key], pqd[key])
        out.append(f"Composition, {word}: P→Q→D {kind.upper()} runs {got:.3f}× dense F16; dense {kind.upper()} "
                   f"{fmt_up:.3f}× × FLOP ideal {ideal:.3f}× = {fmt_up * ideal:.3f}×, 90 % of it {bar:.3f}× — "
                   f"**{'met' if got >= bar else 'missed'}** ({100 * got / (fmt_up * ideal):.0f} % of the product). "
                   f"The same target as P→Q→D over dense {kind.upper()} ≥ 90 % of the FLOP ideal, paired by round "
                   f"(median of per-round time ratios, robust to the machine's drift between rounds): {same:.3f}× = "
                   f"{100 * same / ideal:.0f} % of {ideal:.3f}× — "
                   f"**{'met' if same >= COMPOSE * ideal else 'missed'}**.")
    if "p" in rows:
        ref = rows["p"]["kl_to_dense"]
        kl = pqd["kl_to_dense"]
        fp32 = torch_kl.get("p")
        out.append(f"Quality: P→Q→D {kind.upper()} KL to dense F16 (llama.cpp) {kl:.4f} vs the pruned model with the "
                   f"refit {ref:.4f} (its F16 file in llama.cpp; torch fp32 {fp32:.4f}) — "
                   f"**{'met' if kl <= ref else 'missed'}**"
                   + (f"; the same cut without distillation (pq) {rows['pq']['kl_to_dense']:.4f}" if "pq" in rows
                      else "") + ".")
    return out


def gguf_table(names: list[str], rows: dict[str, dict], torch_kl: dict[str, float]) -> str:
    """Markdown: one row per file, speed-ups over dense F16 and over the dense file of the same type."""
    def up(r: dict, phase: str, suffix: str = "") -> str:
        value = r.get(f"{phase}_speedup{suffix}")
        if value is None:
            return "—"
        low, high = r[f"{phase}_speedup{suffix}_interval"]
        return f"{value:.2f}× ({low:.2f}–{high:.2f})"

    head = ["row", "file", "MLP widths", "file MiB", "prompt tok/s", "prompt vs dense F16", "prompt vs dense same type",
            "gen tok/s", "gen vs dense F16", "gen vs dense same type", "FLOP ideal", "gen GB/s read",
            "KL to dense F16 (llama.cpp)",
            "perplexity", "KL torch (fp32 / fake-quantised)"]
    out = []
    for name in names:
        r = rows[name]
        widths = r["widths"]
        shown = f"{min(widths)}–{max(widths)}" if len(set(widths)) > 1 else str(widths[0])
        label = name if name.startswith("dense") else row_label(name)
        out.append([label, r["gguf_type"].upper(), shown, f"{r['disk_bytes'] / 2**20:.1f}",
                    f"{r['prompt_tokens_per_s']:.0f}", up(r, "prefill"), up(r, "prefill", "_same_format"),
                    f"{r['gen_tokens_per_s']:.0f}", up(r, "decode"), up(r, "decode", "_same_format"),
                    f"{r['ideal_speedup']:.3f}×", f"{r['disk_bytes'] * r['gen_tokens_per_s'] / 1e9:.1f}",
                    f"{r['kl_to_dense']:.4f}", f"{r['perplexity']:.2f}",
                    "—" if name not in torch_kl else f"{torch_kl[name]:.4f}"])
    return markdown_table(head, out)


def option_groups(args) -> tuple[PipelineOptions, TrainOptions, CalibrationOptions, CompensationOptions]:
    """The pipeline, training, calibration and refit options both benchmarks (torch and GGUF) read from the flags."""
    options = PipelineOptions(ratio=args.ratio, quant=args.quant, criterion=args.criterion, round_to=args.round_to,
                              params=args.params)
    train = TrainOptions(steps=args.steps, minutes=args.minutes, lr=args.lr, warmup_steps=max(1, args.steps // 10),
                         eval_every=max(1, args.steps // 4) if args.steps else 20, batch_size=4)
    return (options, train, CalibrationOptions(samples=args.samples, seq_len=args.seq_len),
            CompensationOptions(method=args.compensate))


def main_gguf(args) -> None:
    """The orders in a GGUF block format, each exported as a .gguf file, all measured together in llama.cpp."""
    started = time.time()
    kind = FORMATS[args.quant].gguf
    loaded = load_model(args.model)
    options, train, calibration, compensation = option_groups(args)
    measure = MeasureOptions(eval_windows=args.eval_windows, eval_seq_len=args.eval_seq_len,
                             prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens,
                             speed_repeats=args.speed_repeats, zeroshot_limit=0)
    root = Path(args.out) / f"gguf-{kind}-{args.ratio}-{args.compensate}-{args.steps}-{args.lr}-{args.params}"
    root.mkdir(parents=True, exist_ok=True)
    shared = Shared(gguf_dir=root / "dense")
    records, torch_kl, files = {}, {}, {}
    reference = None
    for order in [parse_order(o) for o in args.orders.split(",")]:
        folder = root / order
        record_file = folder / "bench_record.json"
        if record_file.is_file():  # done in an earlier call: reuse
            saved = json.loads(record_file.read_text())
            records[order], files[order] = saved["record"], gguf_path(folder)
            if saved.get("torch_kl") is not None:
                torch_kl[order] = saved["torch_kl"]
            print(f"[{time.strftime('%H:%M:%S')}] {order}: reused", flush=True)
            continue
        shutil.rmtree(folder, ignore_errors=True)  # a half-written one from a killed call
        print(f"[{time.strftime('%H:%M:%S')}] {order}: start", flush=True)
        began = time.time()
        result = run_pipeline(loaded, options.replace(order=order), calibration=calibration,
                              allocation=AllocationOptions(), compensation=compensation, train_options=train,
                              distill=DistillOptions(), measure=measure, out=folder, measure_result=False,
                              shared=shared)
        if reference is None:
            windows = evaluation_windows(loaded.tokenizer, "wiki", args.eval_windows, args.eval_seq_len)
            reference = Reference(loaded.model, windows)
        kl = evaluate(result.model, reference.windows, reference, progress=False).kl_to_reference
        torch_kl[order] = kl
        records[order] = {k: v for k, v in result.record.items() if k != "settings"}
        records[order]["seconds"] = round(time.time() - began, 1)
        files[order] = gguf_path(folder)
        write_json(record_file, {"record": records[order], "torch_kl": kl}, default=str)
        print(f"[{time.strftime('%H:%M:%S')}] {order}: exported in {time.time() - began:.0f} s, torch KL {kl:.4f}",
              flush=True)
    dense_gguf_file(loaded, "q8_0", shared)  # the dense Q8_0 baseline too
    extra = {"dense Q8_0": shared.gguf_dense["q8_0"]} if kind != "q8_0" else {}
    print(f"[{time.strftime('%H:%M:%S')}] measuring {len(files) + 2 + len(extra)} files in llama.cpp…", flush=True)
    rows = measure_gguf({**extra, **files}, loaded, measure, shared)
    minutes = round((time.time() - started) / 60, 1)
    dense_names = ["dense F16", "dense Q8_0", f"dense {kind.upper()}"]
    names = [n for n in dict.fromkeys(dense_names) if n in rows] + [o for o in files]
    notes = gguf_verdicts(rows, kind, torch_kl)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                     if k not in ("out", "runs", "tag", "zeroshot_limit") and v not in (None, ""))
    command = f"python benchmarks/pipeline.py {flags}"
    name = f"pipeline_{args.quant}{args.tag}"
    write_json(RESULTS / f"{name}.json", {"machine": machine(), "command": command, "minutes_this_call": minutes,
                                          "rows": {n: rows[n] for n in names}, "records": records,
                                          "torch_kl": torch_kl, "verdicts": notes}, indent=2, default=str)
    distil = [[o, "QAT (fake-quantised student)" if st.get("qat") else "fp32", st.get("steps"),
               st.get("train_seconds"),
               f"{st.get('heldout_kl_before', float('nan')):.4f} → {st.get('heldout_kl_after', float('nan')):.4f}"]
              for o, rec in records.items() for st in rec["stages"]
              if st["stage"] == "distill" and not st.get("skipped")]
    header = (f"Machine: {machine()}; llama.cpp through llama-cpp-python, {rows['dense F16']['threads']} threads. "
              f"Model: {args.model}; {args.ratio:.0%} of MLP neurons removed ({args.criterion}, uniform widths rounded "
              f"to {args.round_to}, refit {args.compensate}); format {args.quant} (the q stage fake-quantises "
              "every matrix, LM head and embedding included, as the GGUF file stores it, and the activations as "
              f"llama.cpp's Q8_0 blocks); distil budget {args.steps} steps per order (batch 4 × {args.seq_len} tokens, "
              f"lr {args.lr}, {args.params} parameters, KL τ = 1). Each order is exported as a {kind.upper()} .gguf "
              "(orders without q as F16) from its trained float weights; every file is measured in one llama.cpp run: "
              "prompt "
              f"{args.prefill_tokens} tokens in one batch, {args.decode_tokens} generated tokens one decode each, "
              f"{args.speed_repeats} interleaved rounds (median, quartile interval); KL to the dense F16 file and "
              f"perplexity from llama.cpp's logits on {args.eval_windows} × {args.eval_seq_len} held-out wiki tokens. "
              "FLOP ideal = the pruning's, from the files. Last column: the torch model's KL to dense fp32 on the "
              "same windows (fp32 for p, the fake-quantised model otherwise). 'gen GB/s read' = file bytes × "
              "generated tokens/s (each weight is read once per generated token). "
              f"Command: `{command}` ({minutes} min this call, exports of earlier calls reused).")
    text = "\n".join([f"# P→Q→D in {kind.upper()}, measured in llama.cpp", "", header, "",
                      gguf_table(names, rows, torch_kl), "", "Distil stage of each order (held-out KL on "
                      "calibration-split windows, before → after):", "",
                      markdown_table(["order", "distil stage", "steps", "seconds", "held-out KL"], distil), "",
                      "## Targets (issue 22: speed-ups compose)", "", *[f"- {n}" for n in notes]]) + "\n"
    write_text(RESULTS / f"{name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
