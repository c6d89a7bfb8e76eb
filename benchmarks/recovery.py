"""Recovery after pruning at equal wall-clock budgets: one-shot vs KD recipes (full / mlp / LoRA).

For each ratio and compensation (the default model, entropy scores on 16 x 128 calibration windows,
uniform widths, with and without the least-squares down_proj refit) the pruned student is trained by
``core.recover.recover`` with each recipe for each budget in minutes, and the result is measured on
the held-out *evaluation* articles against the dense model: mean per-token KL, top-1 agreement,
perplexity; with the tokens seen and tokens/s. The same script times a bare
forward+backward+optimizer step (dense teacher forward, student forward, full-vocabulary KL via
``F.kl_div``, backward, AdamW) per parameter set and compares it with the loop's time per token.

    python benchmarks/recovery.py --ratios 0.2,0.3 --compensation none,lsq --minutes 2,5 \
        --recipe "mlp:params=mlp,lr=1e-3" --recipe "lora:params=lora,lr=1e-3" --tag _main

A recipe is ``NAME:key=value,...`` with keys params, lr, tau, alpha, seq_len, batch_size, warmup_steps,
min_lr_ratio, lora_rank, lora_alpha, weight_decay; rows already in the results file are kept
(``--resume``), so a long run can be continued. Writes benchmarks/results/recovery{tag}.{json,md}
and a KL-vs-minutes plot (PNG, needs matplotlib) with ``--plot``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from _common import RESULTS, machine, markdown_table, write_json, write_text

from core.data.text import evaluation_windows
from core.export.hf import read_meta, save_pruned
from core.measure.evaluate import evaluate
from core.methods.oneshot import CompensationOptions, prune_with_scores, score_model
from core.methods.recover import LoraOptions, RecoverOptions, recover
from core.models.loading import load_model
from core.paths import cache_dir
from core.train.loop import DistillOptions, TrainOptions

TRAIN_KEYS = {"lr": float, "warmup_steps": int, "min_lr_ratio": float, "batch_size": int, "weight_decay": float,
              "eval_every": int}
DISTILL_KEYS = {"tau": float, "alpha": float}
RECOVER_KEYS = {"params": str, "seq_len": int}
LORA_KEYS = {"lora_rank": int, "lora_alpha": float}


def parse_recipe(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    spec = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        kinds = {**TRAIN_KEYS, **DISTILL_KEYS, **RECOVER_KEYS, **LORA_KEYS}
        if key not in kinds:
            raise SystemExit(f"unknown recipe key '{key}' in {text}")
        spec[key] = kinds[key](value)
    return name, spec


def student_folder(args, loaded, ratio: float, compensation: str) -> Path:
    """A pruned student (entropy, uniform), built once and cached on disk."""
    folder = cache_dir() / "bench" / "recovery" / f"{args.model}-entropy-uniform-{ratio:g}-{compensation}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"[bench] pruning {ratio:g} ({compensation})", flush=True)
    scores = score_model(loaded, "entropy", samples=16, seq_len=128, seed=0, progress=False)
    options = CompensationOptions("lsq") if compensation == "lsq" else CompensationOptions()
    pruned = prune_with_scores(loaded, scores, ratio, compensation=options, progress=False)
    save_pruned(pruned.model, loaded.tokenizer, folder, pruned.meta)
    return folder


def measure(model, windows, reference, batch_size: int) -> dict:
    result = evaluate(model, windows, reference, batch_size=batch_size, progress=False)
    return {"kl": result.kl_to_reference, "top1": result.top1_agreement, "perplexity": result.perplexity}


def bare_step_seconds_per_token(student, teacher, windows: torch.Tensor, params_name: str, lr: float,
                                batch_size: int, steps: int = 4) -> float:
    """A minimal KD step (the reference the loop is compared with): teacher logits, student logits,
    full-vocabulary KL, backward, AdamW; seconds per token over ``steps`` steps after one warm-up."""
    import torch.nn.functional as F

    from core.methods.recover import attach_lora, param_set

    model = student
    wrapped = None
    if params_name == "lora":
        wrapped, params = attach_lora(model, LoraOptions())
        model = wrapped.get_base_model()
    else:
        params = param_set(model, params_name)
    for p in model.parameters():
        p.requires_grad_(False)
    for _n, p in params.named:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for _n, p in params.named], lr=lr)
    model.train()
    total = 0.0
    for step in range(steps + 1):
        batch = windows[step * batch_size:(step + 1) * batch_size]
        start = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(input_ids=batch, use_cache=False).logits.float()
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(t_logits, -1).flatten(0, 1),
                        log_target=True, reduction="batchmean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _n, p in params.named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:
            total += time.perf_counter() - start
    if wrapped is not None:
        wrapped.unload()
    return total / (steps * batch_size * windows.shape[1])


def render(setup: dict, rows: list[dict]) -> str:
    lines = [f"## Recovery on `{setup['model']}` at equal wall-clock budgets", "",
             f"- students: {setup['students']}", f"- evaluation: {setup['evaluation']}",
             f"- training text: {setup['training']}", f"- machine: {setup['machine']}",
             "- commands (in order; later ones resume the same file):", ""]
    lines += [f"      {c}" for c in setup.get("commands", [setup["command"]])] + [""]
    headers = ["ratio", "refit", "recipe", "budget min", "KL", "vs one-shot", "top-1", "ppl", "tokens", "tok/s",
               "held-out KL", "steps"]
    table = []
    oneshot = {(r["ratio"], r["compensation"]): r["kl"] for r in rows if r["recipe"] == "one-shot"}
    for r in sorted(rows, key=lambda r: (r["ratio"], r["compensation"], r["minutes"], r["recipe"])):
        base = oneshot.get((r["ratio"], r["compensation"]))
        change = f"{100 * (r['kl'] / base - 1):+.1f} %" if base and r["recipe"] != "one-shot" else "-"
        table.append([f"{r['ratio']:.0%}", r["compensation"], r["recipe"], f"{r['minutes']:g}", f"{r['kl']:.4f}",
                      change, f"{r['top1']:.3f}", f"{r['perplexity']:.2f}", r.get("tokens", 0),
                      f"{r.get('tokens_per_second', 0):.0f}",
                      (f"{r['heldout_before']:.3f} → {r['heldout_after']:.3f}" if r.get("heldout_after") is not None
                       else "-"), r.get("steps", 0)])
    lines.append(markdown_table(headers, table))
    if setup.get("recipes"):
        lines += ["", "Recipes:", ""] + [f"- `{name}`: {spec}" for name, spec in setup["recipes"].items()]
    if setup.get("overhead"):
        lines += ["", "### Loop overhead: time per token of the loop vs a bare forward+backward+AdamW step", "",
                  markdown_table(["params", "bare KD step ms/token", "loop ms/token (training only)",
                                  "loop / bare", "loop ms/token (with held-out evals)"],
                                 [[o["params"], f"{1e3 * o['bare']:.3f}", f"{1e3 * o['loop']:.3f}",
                                   f"{o['loop'] / o['bare']:.2f}", f"{1e3 * o['loop_all']:.3f}"]
                                  for o in setup["overhead"]])]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """KL to dense on the evaluation articles vs training minutes, one panel per (ratio, refit) that has
    trained rows: a marker per measured budget (one colour per recipe, the same in every panel), the
    training run's held-out KL curve (calibration slice, dotted) when it was recorded, the one-shot
    model (dashed grey), the uncompensated one-shot (grey dash-dot) and the −30 % target (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oneshot = {(r["ratio"], r["compensation"]): r["kl"] for r in rows if r["recipe"] == "one-shot"}
    groups = sorted({(r["ratio"], r["compensation"]) for r in rows if r["recipe"] != "one-shot"})
    if not groups:
        return
    recipes = sorted({r["recipe"] for r in rows} - {"one-shot"})
    colour = {name: f"C{i}" for i, name in enumerate(recipes)}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 3.8), squeeze=False)
    for ax, (ratio, comp) in zip(axes[0], groups):
        base = oneshot.get((ratio, comp))
        for recipe in recipes:
            cell = sorted((r for r in rows if (r["ratio"], r["compensation"], r["recipe"]) == (ratio, comp, recipe)),
                          key=lambda r: r["minutes"])
            if not cell:
                continue
            points = ([(0.0, base)] if base is not None else []) + [(r["minutes"], r["kl"]) for r in cell]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour[recipe], label=recipe)
            longest = cell[-1]
            if longest.get("curve"):
                ax.plot([p["elapsed"] / 60 for p in longest["curve"]], [p["heldout"] for p in longest["curve"]],
                        ls=":", color=colour[recipe], lw=1, label=f"{recipe}: held-out KL while training")
        if base is not None:
            ax.axhline(base, color="grey", lw=0.8, ls="--", label="one-shot")
            ax.axhline(0.7 * base, color="red", lw=0.8, ls=":", label="target (−30 % vs one-shot)")
        plain = oneshot.get((ratio, "none"))
        if comp != "none" and plain is not None:
            ax.axhline(plain, color="grey", lw=0.8, ls="-.", label="one-shot, no refit")
        ax.set_title(f"{ratio:.0%} of MLP neurons removed, {'+ least-squares refit' if comp == 'lsq' else 'no refit'}")
        ax.set_xlabel("training minutes (this CPU)")
        ax.set_ylabel("KL to dense (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--compensation", default="none,lsq")
    parser.add_argument("--minutes", default="2,5", help="training budgets (comma-separated)")
    parser.add_argument("--recipe", action="append", default=[], help="NAME:key=value,... (repeatable)")
    parser.add_argument("--cells", default="", help="only these ratio/compensation/minutes/recipe cells, "
                        "e.g. '0.2/lsq/15/mlp;0.3/lsq/15/mlp' (default: every combination)")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--heldout-windows", type=int, default=RecoverOptions.heldout_windows)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--overhead", default="", help="parameter sets to time bare step vs loop (e.g. full,mlp,lora)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the results file and exit")
    args = parser.parse_args(argv)

    stem = f"recovery{args.tag}"
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        plot(json.loads(json_path.read_text())["rows"], RESULTS / f"{stem}.png")
        return
    recipes = dict(parse_recipe(r) for r in args.recipe)
    ratios = [float(r) for r in args.ratios.split(",") if r]
    compensations = [c for c in args.compensation.split(",") if c]
    budgets = [float(m) for m in args.minutes.split(",") if m]
    cells = [tuple(c.split("/")) for c in args.cells.split(";") if c]
    command = "python benchmarks/recovery.py " + " ".join(sys.argv[1:] if argv is None else argv)
    setup = {"model": args.model, "students": "entropy scores (16 x 128 calibration windows), uniform widths; "
             "+lsq = least-squares down_proj refit on 128 x 128 calibration windows",
             "evaluation": f"wiki evaluation articles, {args.eval_windows} x {args.eval_seq_len} tokens, KL(dense ‖ "
             "student) per token, top-1 agreement, perplexity", "training": "wiki calibration split, held-out slice "
             f"of {args.heldout_windows} windows for the held-out KL curve", "machine": machine(), "command": command,
             "recipes": {}, "overhead": []}
    rows: list[dict] = []
    if args.resume and json_path.exists():
        earlier = json.loads(json_path.read_text())
        rows = earlier.get("rows", [])
        setup["recipes"] = earlier.get("setup", {}).get("recipes", {})
        setup["overhead"] = earlier.get("setup", {}).get("overhead", [])
        setup["commands"] = earlier.get("setup", {}).get("commands", [earlier.get("setup", {}).get("command", "")])
    setup["commands"] = [c for c in setup.get("commands", []) if c] + [command]
    setup["recipes"].update(recipes)
    done = {(r["ratio"], r["compensation"], r["minutes"], r["recipe"]) for r in rows}

    def save():
        write_json(json_path, {"setup": setup, "rows": rows}, indent=1)
        write_text(md_path, render(setup, rows))
        if args.plot:
            plot(rows, RESULTS / f"{stem}.png")

    dense = load_model(args.model)
    eval_ids = evaluation_windows(dense.tokenizer, "wiki", args.eval_windows, args.eval_seq_len,
                                  max_length=dense.max_length)
    for ratio in ratios:
        for comp in compensations:
            folder = student_folder(args, dense, ratio, comp)
            if (ratio, comp, 0.0, "one-shot") not in done:
                student = load_model(str(folder))
                rows.append({"ratio": ratio, "compensation": comp, "recipe": "one-shot", "minutes": 0.0,
                             **measure(student.model, eval_ids, dense.model, 4)})
                done.add((ratio, comp, 0.0, "one-shot"))
                save()
            for minutes in budgets:
                for name, spec in recipes.items():
                    key = (ratio, comp, minutes, name)
                    if key in done or (cells and (f"{ratio:g}", comp, f"{minutes:g}", name) not in cells):
                        continue
                    print(f"[bench] {ratio:g} {comp} {minutes:g} min {name} {spec}", flush=True)
                    student = load_model(str(folder))
                    train = TrainOptions(minutes=minutes, eval_every=args.eval_every,
                                         **{k: v for k, v in spec.items() if k in TRAIN_KEYS})
                    distill = DistillOptions(**{k: v for k, v in spec.items() if k in DISTILL_KEYS})
                    options = RecoverOptions(heldout_windows=args.heldout_windows,
                                             **{k: v for k, v in spec.items() if k in RECOVER_KEYS})
                    lora = LoraOptions(**{k[5:]: v for k, v in spec.items() if k in LORA_KEYS})
                    result = recover(student, dense, options, train, distill, lora, meta=read_meta(folder))
                    t = result.train
                    rows.append({"ratio": ratio, "compensation": comp, "recipe": name, "minutes": minutes,
                                 **measure(result.model, eval_ids, dense.model, 4), "tokens": t.tokens,
                                 "steps": t.steps, "seconds": round(t.seconds, 1),
                                 "tokens_per_second": round(t.tokens_per_second, 1),
                                 "heldout_before": t.initial_heldout, "heldout_after": t.final_heldout,
                                 "best_step": t.best_step, "timing": t.timing,
                                 "curve": [{k: p[k] for k in ("step", "tokens", "heldout", "elapsed")}
                                           for p in t.curve if p["heldout"] is not None]})
                    done.add(key)
                    save()
                    print(f"[bench]   KL {rows[-1]['kl']:.4f} tokens {t.tokens} ({t.tokens_per_second:.0f}/s)",
                          flush=True)
    for params_name in [p for p in args.overhead.split(",") if p]:
        if any(o["params"] == params_name for o in setup["overhead"]):
            continue
        folder = student_folder(args, dense, ratios[0], compensations[-1])
        windows = torch.randint(0, 40000, (20, 128), generator=torch.Generator().manual_seed(0))
        bare = bare_step_seconds_per_token(load_model(str(folder)).model, dense.model, windows, params_name, 1e-4, 4)
        student = load_model(str(folder))
        result = recover(student, dense, RecoverOptions(params=params_name, heldout_windows=args.heldout_windows),
                         TrainOptions(steps=8, lr=1e-4, eval_every=4, warmup_steps=0))
        t = result.train
        loop = (t.seconds - t.timing["heldout"] - t.timing["checkpoint"]) / t.tokens
        setup["overhead"].append({"params": params_name, "bare": bare, "loop": loop, "loop_all": t.seconds / t.tokens,
                                  "timing": t.timing})
        save()
        print(f"[bench] overhead {params_name}: bare {1e3 * bare:.3f} ms/token, loop {1e3 * loop:.3f}", flush=True)
    save()


if __name__ == "__main__":
    main()
