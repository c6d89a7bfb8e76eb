"""Encoders on the existing ``score``, ``prune`` and ``models`` commands, plus ``vision-eval``.

    python -m core score --model dinov2-small --criterion amp_entropy --out scores.safetensors
    python -m core prune --model dinov2-small --criterion amp_entropy --ratio 0.4 --allocation adaptive --out out/
    python -m core vision-eval --model out/ --reference dinov2-small

``--model`` naming an encoder (``dinov2-small``, ``minilm-l6``, or a ViT / DINOv2 / CLIP / BERT folder
or hub id) runs the AMP path of :mod:`core.vision`; anything else runs the LLM path unchanged. This
group registers after ``core.cli.prune`` and wraps its two handlers: it adds the encoder flags and
the encoder criteria to ``--criterion``, and gives the shared calibration flags encoder defaults
(64 examples, batches of 32 — the similarity entropy is over a batch) when they are not typed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from core.cli import check_scores_out
from core.data.images import labelled_images, stratified_split
from core.errors import PruneConfigError
from core.export.hf import check_output_dir, read_meta
from core.measure.encoders import feature_fidelity, labelled_scores, size_report, throughput
from core.methods.encoders import (
    EncoderOptions,
    default_export,
    plan_encoder_widths,
    prune_encoder,
    save_encoder,
    score_encoder,
)
from core.methods.oneshot import ScoreResult
from core.models.encoders import ENCODERS, is_encoder_spec, load_encoder
from core.prune.allocate import check_ratio

# flags shared with the LLM commands whose defaults differ for encoders: None = "not typed"
_SHARED = ("samples", "seq_len", "batch_size", "heldout_samples", "adaptive_mode", "criterion", "min_keep")


def register(sub) -> None:
    """Wrap ``score`` / ``prune`` (encoder dispatch) and add ``vision-eval``."""
    for name, mine in (("score", cmd_score), ("prune", cmd_prune)):
        parser = sub.choices.get(name)
        if parser is None:  # the LLM group is not registered: nothing to extend
            continue
        original = parser.get_default("handler")
        llm_defaults = {dest: parser.get_default(dest) for dest in _SHARED}
        group = parser.add_argument_group("encoders (dinov2-small, minilm-l6, ViT / DINOv2 / CLIP / BERT)")
        group.add_argument("--image-size", type=int, default=224, help="side of the calibration crops (default 224)")
        group.add_argument("--temp-inv", type=float, default=None,
                           help="amp_entropy: inverse temperature of the similarity logits "
                                "(default 20 DINOv2, 15 CLIP)")
        group.add_argument("--no-self-similarity", action="store_true",
                           help="amp_entropy: leave each example's similarity to itself out of its softmax")
        parser.set_defaults(handler=_dispatcher(original, mine, llm_defaults), **dict.fromkeys(_SHARED))

    models = sub.choices.get("models")
    if models is not None:  # list the embedded encoders next to the LLM aliases
        listed = models.get_default("handler")
        models.set_defaults(handler=lambda args: {**listed(args), **_encoder_aliases()})

    ev = sub.add_parser("vision-eval",
                        help="encoders: feature cosine, kNN / probe accuracy, size, images/s vs a reference")
    ev.add_argument("--model", required=True, help="encoder to measure (alias, folder or hub id)")
    ev.add_argument("--reference", default=None, help="dense encoder to compare with (default: the model's source)")
    ev.add_argument("--dataset", default="digits", choices=("digits", "lfw"), help="labelled set (default digits)")
    ev.add_argument("--eval-size", type=int, default=112, help="image side for the labelled set (default 112)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(handler=cmd_eval)


def _encoder_aliases() -> dict:
    return {alias: f"{entry.description} (encoder)" for alias, entry in ENCODERS.items()}


def _dispatcher(original, mine, llm_defaults: dict):
    def handler(args):
        if is_encoder_spec(args.model):
            return mine(args)
        for dest, value in llm_defaults.items():
            if getattr(args, dest, None) is None:
                setattr(args, dest, value)
        typed = {"--temp-inv": args.temp_inv is not None, "--no-self-similarity": args.no_self_similarity}
        for flag, given in typed.items():
            if given:
                raise PruneConfigError(f"{flag} applies to encoders only; '{args.model}' is not one.")
        return original(args)
    return handler


def _encoder_options(args, loaded):
    values = {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size, "seed": args.seed,
              "image_size": args.image_size, "heldout_samples": getattr(args, "heldout_samples", None),
              "mode": getattr(args, "adaptive_mode", None), "halvings": getattr(args, "halvings", None),
              "min_keep": getattr(args, "min_keep", None), "round_to": getattr(args, "round_to", None)}
    if loaded.kind == "text" and getattr(args, "source", None):
        values["source"] = args.source
    return EncoderOptions(**{k: v for k, v in values.items() if v is not None})


def _criterion(args) -> tuple[str, dict]:
    name = args.criterion or "amp_entropy"
    params = {}
    if args.temp_inv is not None or args.no_self_similarity:
        if name != "amp_entropy":
            raise PruneConfigError(f"--temp-inv / --no-self-similarity apply to amp_entropy, not '{name}'.")
        params = {"temp_inv": args.temp_inv, "self_similarity": not args.no_self_similarity}
    return name, params


def cmd_score(args) -> dict:
    out = check_scores_out(args.out)
    name, params = _criterion(args)
    loaded = load_encoder(args.model)
    result = score_encoder(loaded, name, _encoder_options(args, loaded), criterion_params=params,
                           progress=not args.quiet)
    result.save(out)
    return {"out": str(out), "seconds": round(result.seconds, 2), **result.config}


def cmd_prune(args) -> dict:
    if args.ratio is None:
        raise PruneConfigError("Give --ratio (fraction of MLP neurons removed); --param-ratio is for LLMs.")
    check_ratio(args.ratio)
    check_output_dir(args.out)
    if getattr(args, "compensate", "none") != "none":  # present only when typed (only_given)
        raise PruneConfigError("--compensate is for LLMs; encoders recover by distillation (benchmarks/vision.py).")
    if args.export == "gguf":
        raise PruneConfigError("--export gguf is for LLMs; encoders export as hf-native, hf-remote-code or hf-padded.")
    name, params = _criterion(args)
    loaded = load_encoder(args.model)
    options = _encoder_options(args, loaded)
    result = ScoreResult.load(args.scores) if args.scores else score_encoder(
        loaded, name, options, criterion_params=params, progress=not args.quiet)
    plan = plan_encoder_widths(loaded, result, args.ratio, args.allocation, options,
                               temp_inv=params.get("temp_inv"), self_similarity=params.get("self_similarity", True),
                               progress=not args.quiet)
    pruned = prune_encoder(loaded, result, args.ratio, args.allocation, options, plan=plan, progress=not args.quiet)
    export = args.export or default_export(pruned.widths, pruned.model)
    target = save_encoder(pruned, loaded, args.out, mode=export)
    tokens = _tokens(loaded, options)
    return {"out": str(target), "export": export, "criterion": result.config.get("criterion"),
            "criterion_params": result.config.get("criterion_params", {}), "ratio": args.ratio,
            "allocation": args.allocation, "achieved_ratio": round(pruned.meta["achieved_ratio"], 5),
            "intermediate_sizes": pruned.widths, "before": size_report(loaded.model, tokens),
            "after": size_report(pruned.model, tokens), "scoring_seconds": round(result.seconds, 2),
            **({"adaptive_tolerance": plan.adaptive.tolerance, "adaptive_seconds": round(plan.adaptive.seconds, 1)}
               if plan.adaptive is not None else {})}


def _tokens(loaded, options) -> int:
    if loaded.kind == "text":
        return options.seq_len
    patch = int(getattr(loaded.model.config, "patch_size", 14))
    return (options.image_size // patch) ** 2 + 1


def cmd_eval(args: argparse.Namespace) -> dict:
    loaded = load_encoder(args.model)
    meta = read_meta(args.model) if Path(args.model).is_dir() else None
    reference_spec = args.reference or (meta or {}).get("model")
    if loaded.kind != "image":
        raise PruneConfigError("vision-eval measures image encoders; text encoders are measured in "
                               "benchmarks/vision.py.")
    images, labels = labelled_images(args.dataset, args.eval_size)
    pixels = loaded.preprocess.normalize(images)  # (N, 3, S, S) at --eval-size
    train, test = stratified_split(labels)
    patch = int(getattr(loaded.model.config, "patch_size", 14))
    scores = labelled_scores(loaded.model, pixels, labels, train, test, args.batch_size)
    out = {"model": args.model, "dataset": args.dataset, "examples": int(labels.numel()),
           **{k: round(v, 4) for k, v in scores.items()},
           **size_report(loaded.model, (loaded.preprocess.size // patch) ** 2 + 1)}
    crops = loaded.preprocess(torch.rand(32, 3, loaded.preprocess.size, loaded.preprocess.size))
    out["images_per_second"] = round(throughput(loaded.model, crops)["examples_per_second"], 2)
    if reference_spec:
        reference = load_encoder(reference_spec)
        out["reference"] = reference_spec
        out.update({f"reference_{k}": round(v, 4) for k, v in
                    labelled_scores(reference.model, pixels, labels, train, test, args.batch_size).items()})
        out.update({k: round(v, 5) for k, v in feature_fidelity(reference.model, loaded.model, pixels[test]).items()})
        out["reference_images_per_second"] = round(throughput(reference.model, crops)["examples_per_second"], 2)
    return out
