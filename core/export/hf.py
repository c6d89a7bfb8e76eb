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

import contextlib
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from core.errors import PruneConfigError
from core.export.gguf import GGUFOptions, save_gguf
from core.files import atomic_file, atomic_folder
from core.models.adapters import is_encoder, mlp_widths
from core.models.gguf_read import tensor_types, type_counts
from core.models.remote_code import MODELING_FILE, auto_map, has_pruned_heads, mlp_paths, modeling_source
from core.models.slicing import padded_copy

EXPORT_MODES = ("hf-native", "hf-remote-code", "hf-padded", "gguf")  # gguf: core.gguf_export
META_FILE = "pruning_meta.json"


def default_export_mode(widths: list[int], heads_pruned: bool = False) -> tuple[str, str]:
    """The format that works for a variant with these per-layer MLP widths, and why, in one line:
    ``hf-native`` when every layer has the same width, else ``hf-remote-code`` (true widths; the
    alternative ``hf-padded`` reloads without remote code but keeps the padded bytes and FLOPs).
    ``heads_pruned``: per-layer attention head counts (DDP) — only hf-remote-code expresses them."""
    if heads_pruned:
        return "hf-remote-code", ("hf-remote-code: the layers keep different numbers of attention heads, which "
                                  "only this format's modeling file can rebuild (reload with trust_remote_code=True).")
    if len(set(widths)) <= 1:
        return "hf-native", ("hf-native: every layer has the same width, so the standard config describes the model "
                             "and plain from_pretrained reloads it anywhere.")
    return "hf-remote-code", ("hf-remote-code: the layers have different widths, which the standard config cannot "
                              f"express ({min(widths)}–{max(widths)}); this format ships a small modeling file "
                              "(reload with trust_remote_code=True). hf-padded reloads without it but pads every "
                              "layer back to the widest, losing the size and speed gains.")


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder must not exist yet or be empty (we never overwrite a user's files)."""
    target = Path(out_dir).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PruneConfigError(f"Output path {target} already exists and is not an empty folder; choose a new path.")
    if not target.parent.exists():
        raise PruneConfigError(f"Parent folder {target.parent} does not exist.")
    return target


def save_pruned(model: nn.Module, tokenizer, out_dir: str | os.PathLike, meta: dict, mode: str = "hf-native",
                gguf=None) -> Path:
    """Write model (safetensors), tokenizer and ``pruning_meta.json`` to ``out_dir``; return it.
    ``mode="gguf"`` writes one ``model-<TYPE>.gguf`` (tokenizer inside) + ``pruning_meta.json`` instead;
    ``gguf``: its :class:`core.export.gguf.GGUFOptions` (type f32 … q4_0 or a K-quant, per-layer layout);
    the meta records how many 2-D tensors each GGUF type holds (``gguf_tensor_types``)."""
    if mode not in EXPORT_MODES:
        raise PruneConfigError(f"Unknown export mode '{mode}'; available: {', '.join(EXPORT_MODES)}.")
    if mode != "hf-remote-code" and has_pruned_heads(model):
        raise PruneConfigError(f"This model has per-layer attention head counts (head pruning), which only the "
                               f"hf-remote-code export can express; use it instead of {mode}.")
    widths = mlp_widths(model)
    if mode == "gguf":
        return _save_gguf_folder(model, tokenizer, out_dir, meta, widths, gguf)
    if mode == "hf-native" and len(set(widths)) != 1:
        raise PruneConfigError("hf-native export needs every layer at the same width; these widths differ "
                               "(use hf-remote-code or hf-padded).")
    width = _config_width(model.config, max(widths))
    if mode == "hf-native" and width != widths[0]:
        raise PruneConfigError(f"A DINOv2 config can only describe an MLP width that is a multiple of the hidden size "
                               f"({model.config.hidden_size}); {widths[0]} is not: use hf-remote-code or hf-padded.")
    target = check_output_dir(out_dir)
    with atomic_folder(target) as tmp:
        to_save = padded_copy(model, width) if mode == "hf-padded" else model
        with _config_saved_at(to_save.config, width):
            to_save.save_pretrained(str(tmp), safe_serialization=True)
        if mode == "hf-remote-code":
            _add_remote_code(model, tmp, widths)
        if tokenizer is not None:  # a tokenizer, or an encoder's image preprocessing
            tokenizer.save_pretrained(str(tmp))
        full_meta = {"export": mode, "intermediate_sizes": widths, **meta}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))
    return target


def _save_gguf_folder(model: nn.Module, tokenizer, out_dir, meta: dict, widths: list[int], options) -> Path:
    options = options or GGUFOptions()
    target = check_output_dir(out_dir)
    with atomic_folder(target) as tmp:
        path = save_gguf(model, tokenizer, tmp / options.file_name(), options, source=meta.get("model"))
        # the types the file really holds (a K-quant's mix and fallbacks are llama.cpp's choice): tensors per type
        full_meta = {"export": "gguf", "gguf_file": options.file_name(), "gguf": options.to_dict(),
                     "gguf_tensor_types": type_counts(tensor_types(path, matrices=True)),
                     "intermediate_sizes": widths, **meta}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))
    return target


def zip_folder(folder: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """Pack ``folder`` as ``archive`` (a .zip whose single top folder has the folder's name), stored
    rather than deflated (safetensors barely compress), written atomically. Returns the archive path."""
    source, target = Path(folder), Path(archive)
    with atomic_file(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for file in sorted(source.rglob("*")):
            if file.is_file():
                zf.write(file, Path(source.name) / file.relative_to(source))
    return target


def _config_width(config, width: int) -> int:
    """The width a saved config can state for ``width``: DINOv2 states ``hidden · mlp_ratio`` with an
    integer ratio, so it rounds up to a multiple of the hidden size; other families state it as is."""
    if getattr(config, "model_type", None) == "dinov2":
        return -(-width // config.hidden_size) * config.hidden_size
    return width


@contextlib.contextmanager
def _config_saved_at(config, width: int) -> Iterator[None]:
    """Temporarily make ``config`` state one MLP width (``intermediate_size``, or DINOv2's
    ``mlp_ratio``) without ``intermediate_sizes``, for save_pretrained; restored afterwards."""
    field = "mlp_ratio" if getattr(config, "model_type", None) == "dinov2" else "intermediate_size"
    value = width // config.hidden_size if field == "mlp_ratio" else width
    saved_sizes = getattr(config, "intermediate_sizes", None)
    if hasattr(config, "intermediate_sizes"):
        del config.intermediate_sizes
    saved = getattr(config, field)
    setattr(config, field, value)
    try:
        yield
    finally:
        setattr(config, field, saved)
        if saved_sizes is not None:
            config.intermediate_sizes = saved_sizes


def _add_remote_code(model: nn.Module, folder: Path, widths: list[int]) -> None:
    """Write the modeling file and point config.json at it (``intermediate_sizes`` + ``auto_map``;
    encoders also ``hfprune_mlp_paths``)."""
    (folder / MODELING_FILE).write_text(modeling_source(model))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_sizes"] = widths
    if is_encoder(model):
        config["hfprune_mlp_paths"] = mlp_paths(model)
    config["auto_map"] = auto_map(model)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def read_meta(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.exists() else None
