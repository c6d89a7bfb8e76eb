"""CLI subcommands ``score``, ``prune``, ``eval`` and ``models`` (pruning and its evaluation).

    python -m core score --model smollm2-135m --criterion entropy --out scores.safetensors
    python -m core prune --model smollm2-135m --ratio 0.2 --out runs/pruned20
    python -m core eval --model runs/pruned20 --reference smollm2-135m
"""
from __future__ import annotations

import argparse

from core import distributed
from core.cli import check_scores_out
from core.data.text import CalibrationOptions, calibration_windows, evaluation_windows
from core.errors import PruneConfigError
from core.export.gguf import GGUFOptions, gguf_round_to
from core.export.hf import EXPORT_MODES, check_output_dir, read_meta, save_pruned
from core.importance.criteria import ALL_CRITERIA, add_parameter_arguments, parameters_from_args
from core.measure.evaluate import evaluate
from core.methods.oneshot import (
    ALLOCATIONS,
    ScoreResult,
    prune_with_scores,
    score_model,
)
from core.models.adapters import mlp_widths
from core.models.counts import count_params, mlp_layout
from core.models.loading import EMBEDDED
from core.models.placement import PlacementOptions, load_placed, scoring_preflight
from core.prune.allocate import AllocationOptions, check_ratio, neuron_ratio_for_param_ratio, uniform_widths
from core.prune.compensate import CompensationOptions
from core.quantize.backends import quantization_of
from core.quantize.store import load_any


def register(sub) -> None:
    """Add the ``score``, ``prune``, ``eval`` and ``models`` subcommands."""
    score = sub.add_parser("score", help="score every MLP neuron and save the scores (.safetensors)")
    _common(score)
    _criterion_options(score)
    score.add_argument("--out", required=True, help="output .safetensors file")
    score.set_defaults(handler=cmd_score)

    prune = sub.add_parser("prune", help="score, prune and export a smaller model folder")
    _common(prune)
    _criterion_options(prune)
    prune.add_argument("--scores", help="reuse a scores file from 'score' instead of scoring again")
    prune.add_argument("--ratio", type=float, help="fraction of MLP neurons removed, 0 <= R < 1")
    prune.add_argument("--param-ratio", type=float,
                       help="share of ALL parameters to remove, taken from the MLPs (the seed papers' unit: "
                            "20 %% of LLaMA-2-7B ~ 31 %% of its MLP neurons); converted to --ratio")
    prune.add_argument("--allocation", default="uniform", choices=ALLOCATIONS)
    prune.add_argument("--round-to", type=int, default=None,
                       help="round kept widths to a multiple (8/64/128); default 1, or with --export gguf the "
                            "--gguf-type's block (32 for q8_0 / q5_0 / q4_0, 256 for the K-quants), which an "
                            "explicit value must be a multiple of")
    AllocationOptions.add_arguments(prune)
    # only typed flags: the encoder path (core.cli.vision) refuses a refit the user asked for, not the default
    CompensationOptions.add_arguments(prune, only_given=True)
    prune.add_argument("--export", default=None, choices=EXPORT_MODES,
                       help="hf-native (uniform widths; default for uniform), hf-remote-code (default otherwise), "
                            "hf-padded, gguf (one .gguf file for llama.cpp / Ollama, tokenizer inside)")
    GGUFOptions.add_arguments(prune)
    prune.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    prune.set_defaults(handler=cmd_prune)

    ev = sub.add_parser("eval", help="perplexity and fidelity to a reference model")
    _common(ev, data=False)
    ev.add_argument("--reference", help="model to compare against (KL, top-1 agreement, top-10 overlap)")
    ev.add_argument("--text", default="wiki", help="evaluation text: wiki (held-out articles), news, or a file")
    ev.add_argument("--windows", type=int, default=8, help="non-overlapping evaluation windows")
    ev.add_argument("--seq-len", type=int, default=128)
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(handler=cmd_eval)

    models = sub.add_parser("models", help="list the embedded model aliases")
    models.set_defaults(handler=cmd_models)


def _common(parser: argparse.ArgumentParser, data: bool = True) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="embedded alias, hub id, model folder or .gguf file")
    if data:
        CalibrationOptions.add_arguments(parser)
    PlacementOptions.add_arguments(parser, skip=() if data else ("grad_checkpointing", "memory_check"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _criterion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--criterion", default="entropy", choices=sorted(ALL_CRITERIA),
                        help="LLMs: entropy (default) …; encoders: amp_entropy (default), magnitude, wanda, …")
    add_parameter_arguments(parser)  # every criterion's own knobs, declared once on its Params


def cmd_score(args) -> dict:
    out = check_scores_out(args.out)
    params = parameters_from_args(args, args.criterion)
    calib = CalibrationOptions.from_args(args)
    placement = PlacementOptions.from_args(args)
    loaded = load_placed(args.model, placement)
    scoring_preflight(loaded.model, placement, batch_size=calib.batch_size, seq_len=calib.seq_len,
                      criterion=args.criterion)
    result = score_model(loaded, args.criterion, **calib.to_dict(), progress=not args.quiet, criterion_params=params,
                         grad_checkpointing=placement.grad_checkpointing)
    if not distributed.is_main():  # under torchrun every rank holds the same reduced scores; rank 0 writes
        return None
    result.save(out)
    tokens = result.config["tokens"]
    return {"out": str(out), "seconds": round(result.seconds, 2),
            "seconds_per_1k_tokens": round(1000 * result.seconds / tokens, 3), **result.config}


def cmd_prune(args) -> dict:
    if (args.ratio is None) == (args.param_ratio is None):
        raise PruneConfigError("Give exactly one of --ratio (share of MLP neurons) and --param-ratio (share of all "
                               "parameters).")
    if args.ratio is not None:  # a bad ratio fails here, before the model loads
        args.ratio = check_ratio(args.ratio)
    compensation = CompensationOptions.from_args(args)
    calib = CalibrationOptions.from_args(args)
    check_output_dir(args.out)
    params = parameters_from_args(args, args.criterion)
    options = AllocationOptions.from_args(args)
    if args.export == "hf-native" and args.allocation != "uniform":
        raise PruneConfigError(f"--export hf-native needs uniform widths; the '{args.allocation}' allocation gives "
                               "each layer its own width: use --export hf-remote-code or hf-padded.")
    export = args.export or ("hf-native" if args.allocation == "uniform" else "hf-remote-code")
    gguf = GGUFOptions.from_args(args) if export == "gguf" else None
    # a GGUF block type needs block-aligned rows: round to its block unless the user chose a multiple of it
    args.round_to = gguf_round_to(gguf.type, args.round_to) if gguf else (1 if args.round_to is None else args.round_to)
    placement = PlacementOptions.from_args(args)
    loaded = load_placed(args.model, placement)
    if args.param_ratio is not None:  # the share of all parameters → the share of MLP neurons for this model
        args.ratio = neuron_ratio_for_param_ratio(loaded.model, args.param_ratio)
    if args.allocation == "uniform":  # fail on a layer-emptying ratio before spending time on scoring
        uniform_widths(mlp_widths(loaded.model), args.ratio, args.round_to)  # ratio: checked / derived above
    if compensation.method != "none":  # fail on too little calibration text before spending time on scoring
        calibration_windows(loaded.tokenizer, args.source, compensation.samples, compensation.seq_len, args.seed,
                            max_length=loaded.max_length)
    if compensation.method == "region":
        calibration_windows(loaded.tokenizer, args.source, compensation.region_samples, compensation.seq_len,
                            args.seed, max_length=loaded.max_length)
    if args.scores:
        result = ScoreResult.load(args.scores)
    else:
        scoring_preflight(loaded.model, placement, batch_size=calib.batch_size, seq_len=calib.seq_len,
                          criterion=args.criterion)
        result = score_model(loaded, args.criterion, **calib.to_dict(), progress=not args.quiet,
                             criterion_params=params, grad_checkpointing=placement.grad_checkpointing)
    if not distributed.is_main():  # the data-parallel part is the scoring; rank 0 prunes and writes
        return None
    pruned = prune_with_scores(loaded, result, args.ratio, allocation=args.allocation, round_to=args.round_to,
                               options=options, progress=not args.quiet, compensation=compensation)
    target = save_pruned(pruned.model, loaded.tokenizer, args.out, pruned.meta, mode=export, gguf=gguf)
    before, after = count_params(loaded.model), count_params(pruned.model)
    return {"out": str(target), "export": export, "criterion": result.config.get("criterion"), "ratio": args.ratio,
            "allocation": args.allocation, "compensation": compensation.method, "round_to": args.round_to,
            **({"gguf_type": gguf.type, "gguf_tensor_types": read_meta(target).get("gguf_tensor_types")}
               if gguf else {}),
            "achieved_ratio": round(pruned.meta["achieved_ratio"], 5),
            "params_removed_share": round(pruned.meta["params_removed_share"], 5), "param_ratio": args.param_ratio,
            "criterion_params": result.config.get("criterion_params", {}),
            "intermediate_sizes": pruned.widths, "params_before": before["params"], "params_after": after["params"],
            "scoring_seconds": round(result.seconds, 2)}


def cmd_eval(args) -> dict:
    placement = PlacementOptions.from_args(args)
    device, device_map = placement.resolve_device(), (None if placement.device_map == "none" else "auto")
    where = {"dtype": placement.resolve_dtype(device), "device": device, "device_map": device_map}
    loaded = load_any(args.model, **where)  # a quantized folder comes back quantized (its recipe applied on load)
    windows = evaluation_windows(loaded.tokenizer, args.text, args.windows, args.seq_len, max_length=loaded.max_length)
    reference = load_any(args.reference, **where).model if args.reference else None
    result = evaluate(loaded.model, windows, reference, batch_size=args.batch_size, progress=not args.quiet)
    return {"model": args.model, "reference": args.reference, "text": args.text,
            "quantization": quantization_of(loaded.model), **result.to_dict(),
            **_padded_effective_params(args.model, loaded.model, result.params, result.mlp_params)}


def _padded_effective_params(spec: str, model, params: int, mlp_params: int) -> dict:
    """For an hf-padded export, the parameters of its real (unpadded) widths from pruning_meta.json:
    the zero padding is counted in ``params``/``mlp_params`` but computes nothing."""
    try:
        meta = read_meta(spec) or {}
    except (OSError, ValueError):
        return {}
    widths = meta.get("intermediate_sizes")
    if meta.get("export") != "hf-padded" or not widths:
        return {}
    effective = mlp_layout(model).params([int(w) for w in widths])
    return {"effective_mlp_params": effective, "effective_params": params - mlp_params + effective}


def cmd_models(_args) -> dict:
    return {alias: entry.description for alias, entry in EMBEDDED.items()}
