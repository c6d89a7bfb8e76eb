"""CLI subcommand ``recover``: distil a pruned model back toward the model it was cut from.

    python -m core recover --model pruned30 --params mlp --minutes 10 --lr 3e-4 --out recovered30
    python -m core recover --model pruned30 --teacher smollm2-135m --params lora --lora-rank 16 --steps 200 --out r30
    python -m core recover --model pruned30 --teacher-logits cached --minutes 10 --out recovered30
"""
from __future__ import annotations

from core import distributed
from core.cli import add_model_out_arguments
from core.export.hf import check_output_dir, read_meta
from core.methods.recover import (
    TRAIN_DEFAULTS,
    LoraOptions,
    RecoverOptions,
    default_teacher,
    recover,
    save_recovered,
)
from core.models.loading import load_model
from core.train.loop import DistillOptions, TrainOptions
from core.train.teacher_cache import TeacherOptions


def register(sub) -> None:
    """Add the ``recover`` subcommand."""
    parser = sub.add_parser("recover", help="distil a pruned model from its teacher (full / mlp / lora), export it")
    parser.add_argument("--model", required=True, help="the student: a pruned model folder (or any model spec)")
    parser.add_argument("--teacher", help="the teacher (default: the model named in the student's pruning_meta.json)")
    RecoverOptions.add_arguments(parser)
    TrainOptions.add_arguments(parser, defaults=TRAIN_DEFAULTS)
    DistillOptions.add_arguments(parser)
    LoraOptions.add_arguments(parser)
    TeacherOptions.add_arguments(parser)
    add_model_out_arguments(parser, "export mode (default: the student's own; else hf-native for uniform widths, "
                                    "hf-remote-code otherwise)")
    parser.set_defaults(handler=cmd_recover)


def cmd_recover(args) -> dict:
    # every option is validated before any model is loaded, and the output path before any training
    options = RecoverOptions.from_args(args)
    train_options = TrainOptions.from_args(args)
    distill = DistillOptions.from_args(args)
    lora = LoraOptions.from_args(args)
    teacher_options = TeacherOptions.from_args(args)
    if options.params == "lora":
        lora.target_list()
    check_output_dir(args.out)
    teacher_spec = args.teacher or default_teacher(args.model)
    student = load_model(args.model)
    teacher = load_model(teacher_spec)
    distributed.to_rank_device(student.model, teacher.model)  # torchrun on GPUs: one GPU per rank
    meta = read_meta(student.path) if student.path else None
    result = recover(student, teacher, options, train_options, distill, lora, meta=meta, progress=not args.quiet,
                     teacher_options=teacher_options)
    if not distributed.is_main():  # data-parallel training ends with the same weights on every rank
        return None
    target = save_recovered(result, student.tokenizer, args.out, args.export)
    record = result.meta["recovery"]
    return {"out": str(target), "student": args.model, "teacher": teacher_spec, "params": options.params,
            "trainable_params": record["trainable_params"], "steps": record["steps"],
            "tokens_seen": record["tokens_seen"], "seconds": record["seconds"], "ended_by": record["ended_by"],
            "tokens_per_second": record["tokens_per_second"], "heldout_kl_before": record["heldout_kl_before"],
            "heldout_kl_after": record["heldout_kl_after"], "best_step": record["best_step"],
            "cpu_seconds": record["cpu_seconds"], "teacher_logits": record["teacher_logits"],
            "intermediate_sizes": result.meta["intermediate_sizes"], **_shares(result.meta),
            "timing": record["timing"]}


def _shares(meta: dict) -> dict:
    """Share of MLP neurons and of all parameters removed, when the student's meta records them."""
    keys = ("achieved_ratio", "params_removed_share")
    return {k: meta[k] for k in keys if k in meta}
