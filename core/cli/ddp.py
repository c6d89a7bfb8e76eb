"""CLI subcommand ``ddp``: learn which MLP neurons / attention heads to remove with deterministic
differentiable pruning (core.ddp) and export the hardened model.

    python -m core ddp --model smollm2-135m --ratio 0.2 --minutes 3 --out ddp20
    python -m core ddp --model smollm2-135m --ratio 0.3 --units both --head-ratio 0.2 --steps 200 --warm-start --out d
"""
from __future__ import annotations

from core.cli import add_model_out_arguments
from core.export.hf import check_output_dir
from core.methods.gates import TRAIN_DEFAULTS, DDPOptions, ddp, save_ddp
from core.models.loading import load_model
from core.train.loop import TrainOptions


def register(sub) -> None:
    """Add the ``ddp`` subcommand."""
    parser = sub.add_parser("ddp", help="deterministic differentiable pruning: train gates against the dense model, "
                                        "harden them at the exact target, export")
    parser.add_argument("--model", required=True, help="model alias, hub id or folder")
    DDPOptions.add_arguments(parser)
    TrainOptions.add_arguments(parser, defaults=TRAIN_DEFAULTS)
    add_model_out_arguments(parser, "export mode (default: hf-native for uniform MLP widths without head pruning, "
                                    "hf-remote-code otherwise; head-pruned models export only as hf-remote-code)")
    parser.set_defaults(handler=cmd_ddp)


def cmd_ddp(args) -> dict:
    options = DDPOptions.from_args(args)  # every option is checked before the model loads
    train_options = TrainOptions.from_args(args)
    check_output_dir(args.out)
    loaded = load_model(args.model)
    result = ddp(loaded, options, train_options, progress=not args.quiet)
    target = save_ddp(result, loaded.tokenizer, args.out, args.export)
    record, meta = result.meta["ddp"], result.meta
    out = {"out": str(target), "model": args.model, "units": options.units, "ratio": meta["ratio"],
           "achieved_ratio": meta["achieved_ratio"], "params_removed_share": meta["params_removed_share"],
           "intermediate_sizes": meta["intermediate_sizes"], "steps": record["steps"],
           "tokens_seen": record["tokens_seen"], "seconds": record["seconds"], "ended_by": record["ended_by"],
           "heldout_kl_hardened_before": record["heldout_kl_hardened_before"],
           "heldout_kl_hardened_after": record["heldout_kl_hardened_after"], "best_step": record["best_step"],
           "final_point": record["final_point"]}
    if "heads" in meta:
        out["heads"] = {k: meta["heads"][k] for k in ("granularity", "achieved_ratio", "layer_num_attention_heads",
                                                       "layer_num_key_value_heads")}
    return out
