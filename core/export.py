"""Save pruned models so they reload with plain transformers: safetensors + pruning_meta.json.

``hf-native``: every layer has the same width, so ``config.intermediate_size`` says it all and
``AutoModelForCausalLM.from_pretrained`` reloads it anywhere. Writes go to a temporary sibling
folder that is renamed into place at the end, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from .adapters import mlp_widths
from .errors import PruneConfigError

EXPORT_MODES = ("hf-native",)
META_FILE = "pruning_meta.json"


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder must not exist yet or be empty (we never overwrite a user's files)."""
    target = Path(out_dir).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PruneConfigError(f"Output path {target} already exists and is not an empty folder; choose a new path.")
    if not target.parent.exists():
        raise PruneConfigError(f"Parent folder {target.parent} does not exist.")
    return target


def save_pruned(model: nn.Module, tokenizer, out_dir: str | os.PathLike, meta: dict, mode: str = "hf-native") -> Path:
    """Write model (safetensors), tokenizer and ``pruning_meta.json`` to ``out_dir``; return it."""
    if mode not in EXPORT_MODES:
        raise PruneConfigError(f"Unknown export mode '{mode}'; available: {', '.join(EXPORT_MODES)}.")
    widths = mlp_widths(model)
    if mode == "hf-native" and len(set(widths)) != 1:
        raise PruneConfigError("hf-native export needs every layer at the same width; these widths differ.")
    target = check_output_dir(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if hasattr(model.config, "intermediate_sizes"):
            del model.config.intermediate_sizes
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        full_meta = {"export": mode, "intermediate_sizes": widths, **meta}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_meta(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.exists() else None
