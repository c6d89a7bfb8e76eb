"""Save pruned models so they reload with transformers: safetensors + pruning_meta.json.

Three formats (``pruning_meta.json`` always records per-layer widths and kept indices):

- ``hf-native``: every layer has the same width, so ``config.intermediate_size`` says it all and
  ``AutoModelForCausalLM.from_pretrained`` reloads it anywhere (uniform widths only);
- ``hf-remote-code``: true per-layer widths; ``config.json`` carries ``intermediate_sizes`` and an
  ``auto_map`` to a small modeling file (reload with ``trust_remote_code=True``);
- ``hf-padded``: every layer zero-padded to the widest one; plain ``from_pretrained`` reloads it and
  the outputs are identical (a padded neuron has zero gate, up and down weights, so it adds exactly 0),
  at the cost of the padded bytes and FLOPs.

Writes go to a temporary sibling folder that is renamed into place at the end, so a failure leaves
nothing half-written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .adapters import mlp_handles, mlp_widths
from .errors import PruneConfigError
from .files import atomic_file, atomic_folder

EXPORT_MODES = ("hf-native", "hf-remote-code", "hf-padded")
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
        raise PruneConfigError("hf-native export needs every layer at the same width; these widths differ "
                               "(use hf-remote-code or hf-padded).")
    target = check_output_dir(out_dir)
    with atomic_folder(target) as tmp:
        to_save = padded_copy(model, max(widths)) if mode == "hf-padded" else model
        config = to_save.config
        saved_sizes = getattr(config, "intermediate_sizes", None)
        if hasattr(config, "intermediate_sizes"):
            del config.intermediate_sizes
        saved_width = config.intermediate_size
        config.intermediate_size = max(widths)
        try:
            to_save.save_pretrained(str(tmp), safe_serialization=True)
        finally:
            config.intermediate_size = saved_width
            if saved_sizes is not None:
                config.intermediate_sizes = saved_sizes
        if mode == "hf-remote-code":
            _add_remote_code(model, tmp, widths)
        tokenizer.save_pretrained(str(tmp))
        full_meta = {"export": mode, "intermediate_sizes": widths, **meta}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))
    return target


def zip_folder(folder: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """Pack ``folder`` as ``archive`` (a .zip whose single top folder has the folder's name), stored
    rather than deflated (safetensors barely compress), written atomically. Returns the archive path."""
    import zipfile

    source, target = Path(folder), Path(archive)
    with atomic_file(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for file in sorted(source.rglob("*")):
            if file.is_file():
                zf.write(file, Path(source.name) / file.relative_to(source))
    return target


def padded_copy(model: nn.Module, width: int) -> nn.Module:
    """A copy of ``model`` whose every MLP is zero-padded to ``width`` hidden neurons (same outputs)."""
    import copy

    import torch

    clone = copy.deepcopy(model)
    for h in mlp_handles(clone):
        extra = width - h.width
        if extra == 0:
            continue
        for name in ("gate", "up", "down"):
            old: nn.Linear = getattr(h, name)
            out_dim, in_dim = (width, old.in_features) if name != "down" else (old.out_features, width)
            new = nn.Linear(in_dim, out_dim, bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
            with torch.no_grad():
                new.weight.zero_()
                new.weight[: old.weight.shape[0], : old.weight.shape[1]] = old.weight
                if old.bias is not None:
                    new.bias.zero_()
                    new.bias[: old.bias.shape[0]] = old.bias
            setattr(h.mlp, f"{name}_proj", new)
        if hasattr(h.mlp, "intermediate_size"):
            h.mlp.intermediate_size = width
    return clone


def _add_remote_code(model: nn.Module, folder: Path, widths: list[int]) -> None:
    """Write the modeling file and point config.json at it (``intermediate_sizes`` + ``auto_map``)."""
    from .remote_code import MODELING_FILE, auto_map, modeling_source

    (folder / MODELING_FILE).write_text(modeling_source(model))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_sizes"] = widths
    config["auto_map"] = auto_map(model)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def read_meta(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.exists() else None
