"""CLI subcommand ``zeroshot``: zero-shot accuracy with lm-eval (shipped offline tasks by default).

    python -m core zeroshot --model runs/q8 --limit 100
"""
from __future__ import annotations

from core.measure.speed import pick_device
from core.measure.zeroshot import ZeroShotError, check_tasks, run_zeroshot
from core.measure.zeroshot_tasks import SHIPPED_TASKS
from core.quantize.backends import METHODS, check_method, quantization_of
from core.quantize.store import load_on


def register(sub) -> None:
    """Add the ``zeroshot`` subcommand."""
    z = sub.add_parser("zeroshot", help="zero-shot accuracy with lm-eval (shipped offline tasks by default)")
    z.add_argument("--model", default="smollm2-135m", help="alias, folder (quantized folders too), .gguf or hub id")
    z.add_argument("--tasks", default=",".join(SHIPPED_TASKS),
                   help=f"comma-separated lm-eval task names (offline: {', '.join(SHIPPED_TASKS)}; hub tasks "
                        f"such as boolq,piqa,arc_easy need network)")
    z.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    z.add_argument("--batch-size", type=int, default=8)
    z.add_argument("--num-fewshot", type=int, default=0)
    z.add_argument("--method", choices=list(METHODS), help="quantize the model in memory first")
    z.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    z.add_argument("--json", action="store_true", help="print one JSON line")
    z.add_argument("--quiet", action="store_true")
    z.set_defaults(handler=cmd_zeroshot)


def cmd_zeroshot(args) -> dict:
    tasks = check_tasks([t for t in args.tasks.split(",")])
    if args.limit is not None and args.limit < 1:
        raise ZeroShotError(f"--limit must be at least 1 item per task (got {args.limit}).")
    device = pick_device(args.device)
    if args.method:
        check_method(args.method, device)
    loaded = load_on(args.model, device, args.method)
    result = run_zeroshot(loaded.model, loaded.tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                          num_fewshot=args.num_fewshot, progress=not args.quiet)
    return {"model": args.model, "quantization": quantization_of(loaded.model), **result}
