"""Command line: ``python -m core <command>`` — the same engine as the dashboard.

One module per subcommand group, each with ``register(subparsers)`` that adds its parsers and sets
``handler=`` on them via ``set_defaults``; a handler takes the parsed args and returns a JSON-able
dict. A new group is added to ``GROUPS``:

    core/cli/prune.py      score, prune, eval, models
    core/cli/quantize.py   quantize
    core/cli/zeroshot.py   zeroshot
    core/cli/vision.py     encoders on score / prune (dispatch by --model), vision-eval
    core/cli/speed.py      bench (measured latency / memory)
    core/cli/inspector.py  neuron, stability, report (neuron inspector, rank stability, HTML report)
    core/cli/recover.py    recover (distil a pruned model from its teacher: full / mlp / lora)
    core/cli/data.py       data (how a text source is split into calibration / evaluation text)
    core/cli/ddp.py        ddp (deterministic differentiable pruning: learned gates, hardened and exported)
    core/cli/pipeline.py   pipeline (prune → quantize → distil in any order, export, measure; --ablation)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

from core import distributed
from core.errors import HFPruneError
from core.export.hf import EXPORT_MODES
from core.progress import quiet_third_party

GROUPS: list[str] = ["core.cli.prune", "core.cli.quantize", "core.cli.zeroshot", "core.cli.speed",
                     "core.cli.inspector", "core.cli.recover", "core.cli.data", "core.cli.ddp", "core.cli.pipeline",
                     "core.cli.vision"]  # vision wraps prune's score/prune: keep it after core.cli.prune


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m core`` parser with every group's subcommands."""
    parser = argparse.ArgumentParser(prog="python -m core", description="HFPrune Studio engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in GROUPS:
        importlib.import_module(module).register(sub)
    for command in sub.choices.values():
        command.add_argument("--trust-remote-code", action="store_true",
                             help="run Python code shipped inside a model folder or hub repo (auto_map); "
                                  "our own hf-remote-code exports are trusted without it")
    return parser


def add_model_out_arguments(parser: argparse.ArgumentParser, export_help: str) -> None:
    """The flags every "train, then export a model folder" command ends with: --export, --out, --quiet."""
    parser.add_argument("--export", choices=EXPORT_MODES, help=export_help)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_scores_out(path: str) -> Path:
    """``--out`` of a ``score`` command: a new ``.safetensors`` file in an existing folder, else one sentence."""
    out = Path(path)
    if out.exists():
        raise HFPruneError(f"Output file {out} already exists; choose a new path.")
    if out.suffix != ".safetensors":
        raise HFPruneError(f"--out must end in .safetensors, got '{out.name}'.")
    if not out.parent.exists():
        raise HFPruneError(f"Parent folder {out.parent} does not exist.")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_third_party(progress_bars=not getattr(args, "quiet", False))
    if args.trust_remote_code:
        os.environ["HFPRUNE_TRUST_REMOTE_CODE"] = "1"
    try:
        with distributed.process_group():  # under torchrun: one process group for the command (gloo/NCCL)
            result = args.handler(args)
    except HFPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:  # the estimate said it fits but the device disagreed
        print("error: the device ran out of memory; lower --batch-size or --seq-len, add --grad-checkpointing, "
              "or spread the model with --device-map auto.", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as exc:  # a full disk, a permission problem, no memory: one sentence
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {type(exc).__name__}: {detail}{where}", file=sys.stderr)
        return 2
    if result is None:  # a non-main rank of a torchrun job: rank 0 prints
        return 0
    if getattr(args, "json", False) or args.command != "eval":
        print(json.dumps(result, indent=None if getattr(args, "json", False) else 2))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    return 0
