"""Whole-MLP reconstruction (the ``region`` compensation, issue 21 §3) against global distillation at
the same CPU minutes.

The student for each ratio is the recovery benchmark's one-shot cut: entropy scores on 16 × 128 wiki
calibration windows, uniform widths, the least-squares refit (128 × 128 windows, damping 0.1). From
that student each row runs either

- a region configuration (``core.methods.oneshot.reconstruct_mlps``: every MLP fitted layer by layer to
  the dense MLP on the pruned model's own inputs; closed-form down refit, then optional Adam steps), or
- MLP-only distillation (``core.methods.recover.recover``, params mlp, lr 3e-4, 3 warm-up steps, no
  held-out evaluations) for a wall-clock budget, or
- region followed by distillation (``region+kd``),

and is measured against the dense model on the wiki evaluation articles (16 × 128, the recovery
benchmark's evaluation) and the news text's evaluation split (8 × 128): mean per-token KL. Each row
records wall seconds and this process's CPU seconds (``time.process_time``, both threads) of its own
work; the one-shot cut's cost is common to every row and reported once.

A row spec is ``NAME:key=value,...`` with keys ``samples, steps, lr, batch, damping, target`` (region;
damping of its closed-form refit, default 0.1; target local or stream), ``kd`` (minutes
of distillation; alone it is a pure distillation row). Rows go to
benchmarks/results/region_<model>{tag}.json as they finish (``--resume`` keeps them).

    flock /tmp/heavy.lock .venv/bin/python benchmarks/region.py --resume \\
        --row "closed-32:samples=32" --row "kd-1:kd=1"
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

from _common import RESULTS, machine, markdown_table, write_json, write_text

from core.data.text import evaluation_windows
from core.measure.evaluate import Reference, evaluate
from core.methods.oneshot import (
    CompensationOptions,
    compensation_grams,
    prune_with_scores,
    reconstruct_mlps,
    score_model,
)
from core.methods.recover import RecoverOptions, recover
from core.models.loading import LoadedModel, load_model
from core.prune.compensate import compensate_pruned
from core.train.loop import TrainOptions

KEYS = {"samples": int, "steps": int, "lr": float, "batch": int, "damping": float, "target": str, "kd": float}


def parse_row(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    spec = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in KEYS:
            raise SystemExit(f"unknown row key '{key}' in {text}; use {', '.join(KEYS)}")
        spec[key] = KEYS[key](value)
    return name, spec


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--row", action="append", default=[], help="row spec (repeatable)")
    parser.add_argument("--kd-lr", type=float, default=3e-4)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    rows_wanted = [parse_row(r) for r in args.row]
    ratios = [float(r) for r in args.ratios.split(",")]
    stem = f"region_{args.model.replace('/', '_')}{args.tag}"
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    command = "python benchmarks/region.py " + " ".join(sys.argv[1:] if argv is None else argv)
    setup = {"model": args.model, "machine": machine(), "commands": [], "kd_lr": args.kd_lr}
    rows: list[dict] = []
    if args.resume and json_path.exists():
        earlier = json.loads(json_path.read_text())
        rows, setup = earlier["rows"], {**setup, **earlier["setup"]}
    setup["commands"].append(command)
    done = {(r["row"], r["ratio"]) for r in rows}

    def save() -> None:
        write_json(json_path, {"setup": setup, "rows": rows}, indent=1)
        write_text(md_path, render(setup, rows))

    loaded = load_model(args.model)
    texts = {"wiki": evaluation_windows(loaded.tokenizer, "wiki", 16, 128),
             "news": evaluation_windows(loaded.tokenizer, "news", 8, 128)}
    references = {t: Reference(loaded.model, w, 4) for t, w in texts.items()}

    def measure(model) -> dict:
        return {f"kl_{t}": evaluate(model, w, references[t], progress=False).kl_to_reference for t, w in texts.items()}

    lsq = CompensationOptions("lsq", samples=128, seq_len=128, damping=0.1)
    grams = scores = None
    for ratio in ratios:
        todo = [(n, s) for n, s in [("lsq", {}), *rows_wanted] if (n, ratio) not in done]
        if not todo:
            continue
        if scores is None:
            with Clock() as c:
                scores = score_model(loaded, "entropy", samples=16, seq_len=128, seed=0, progress=False)
                grams = compensation_grams(loaded, lsq, progress=False)
            setup["one_shot_s"] = {"entropy_scores_16x128": round(scores.seconds, 1),
                                   "lsq_statistics_128x128": round(c.wall - scores.seconds, 1)}
        cut = prune_with_scores(loaded, scores, ratio, progress=False, compensation=CompensationOptions("none"))
        compensate_pruned(cut.model, loaded.model, cut.kept, grams, lsq.damping)
        meta = {**cut.meta, "compensation": lsq.to_dict()}
        for name, spec in todo:
            print(f"[region] {ratio:.0%} {name} {spec}", flush=True)
            student = copy.deepcopy(cut.model)
            row = {"row": name, "ratio": ratio, **spec}
            wall = cpu = 0.0
            if "samples" in spec:
                options = CompensationOptions("region", samples=128, seq_len=128, damping=spec.get("damping", 0.1),
                                              region_samples=spec["samples"], region_steps=spec.get("steps", 0),
                                              region_lr=spec.get("lr", 1e-3), region_batch=spec.get("batch", 1024),
                                              region_target=spec.get("target", "local"))
                with Clock() as c:
                    report = reconstruct_mlps(loaded, student, options, progress=False)
                wall, cpu = wall + c.wall, cpu + c.cpu
                row.update(region_wall_s=round(c.wall, 1), region_error_start=report.to_dict()["mean_error_start"],
                           region_error_end=report.to_dict()["mean_error_end"])
            if spec.get("kd"):
                pupil = LoadedModel(student, loaded.tokenizer, "student", "")
                with Clock() as c:
                    got = recover(pupil, loaded, RecoverOptions(params="mlp", heldout_windows=0),
                                  TrainOptions(minutes=spec["kd"], lr=args.kd_lr, warmup_steps=3, eval_every=0,
                                               keep_best=False), meta=meta)
                student = got.model
                wall, cpu = wall + c.wall, cpu + c.cpu
                row.update(kd_wall_s=round(c.wall, 1), kd_tokens=got.train.tokens, kd_steps=got.train.steps)
            row.update(wall_s=round(wall, 1), cpu_s=round(cpu, 1), **measure(student))
            rows.append(row)
            save()
            print(f"[region] {ratio:.0%} {name}: KL wiki {row['kl_wiki']:.4f} news {row['kl_news']:.4f} "
                  f"in {wall / 60:.2f} min wall, {cpu / 60:.2f} CPU-min", flush=True)
    save()
    print(md_path.read_text())
    return 0


def render(setup: dict, rows: list[dict]) -> str:
    lines = [f"## Whole-MLP reconstruction vs distillation on `{setup['model']}`", "",
             "- student: entropy scores 16 x 128, uniform widths, lsq refit (128 x 128, damping 0.1)"
             + (f"; one-shot cost {setup['one_shot_s']}" if "one_shot_s" in setup else ""),
             "- region: reconstruction on `samples` x 128 wiki calibration windows; `steps` Adam steps per layer of "
             "`batch` tokens at `lr` after the closed-form down refit",
             f"- kd: `python -m core recover` MLP-only distillation, lr {setup['kd_lr']}, for `kd` wall minutes",
             "- evaluation: KL(dense ‖ student) per token, wiki evaluation articles 16 x 128, news evaluation 8 x 128",
             "- time: this row's own work after the one-shot cut, wall minutes and process CPU minutes (2 threads)",
             f"- machine: {setup['machine']}", "- commands:", "", *[f"      {c}" for c in setup["commands"]], ""]
    base = {(r["ratio"]): r for r in rows if r["row"] == "lsq"}
    table = []
    for r in sorted(rows, key=lambda r: (r["ratio"], r["wall_s"], r["row"])):
        b = base.get(r["ratio"])
        gain = (1 - r["kl_wiki"] / b["kl_wiki"]) if b else float("nan")
        per_min = gain / (r["wall_s"] / 60) if r["wall_s"] else float("nan")
        config = ", ".join(f"{k}={r[k]}" for k in KEYS if k in r)
        table.append([f"{r['ratio']:.0%}", r["row"], config or "-", f"{r['kl_wiki']:.4f}",
                      f"{-gain:+.1%}" if b and r is not b else "-", f"{r['kl_news']:.4f}",
                      f"{r['wall_s'] / 60:.2f}", f"{r['cpu_s'] / 60:.2f}",
                      f"{per_min:.1%}" if r["wall_s"] else "-"])
    lines += [markdown_table(["ratio", "row", "settings", "KL wiki", "vs lsq", "KL news", "wall min", "CPU min",
                              "KL drop per wall min"], table), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
