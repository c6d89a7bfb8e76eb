"""Quantized model folders: the recipe file, ``save_quantized`` and ``load_any``.

    from core.quant_store import save_quantized, load_any
    save_quantized(loaded.model, loaded.tokenizer, "torchao-int8", "runs/q8")   # unquantized model in
    loaded = load_any("runs/q8")                                 # a quantized folder, or any load_model spec

A saved quantized folder holds the *source* weights as safetensors (dense or pruned, exactly as
``save_pretrained`` writes them), the tokenizer, ``pruning_meta.json`` when the source was pruned,
and ``quantization.json`` (the recipe). ``load_any`` applies the recipe on load; nothing is pickled.
``quantized_bytes`` in the recipe is what the quantized weights occupy in memory.

``storage="int8"`` (INT8 methods only) stores the quantized layers as their integer weights and scales
(``quantized.safetensors``: int8 ``<layer>.qweight`` + ``<layer>.scale``) instead of their float
weights, so the folder is about as small on disk as the model is in memory; ``load_any`` rebuilds the
backend's layers from them, computing exactly what quantizing the source weights computed.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from core import __version__
from core.errors import ModelLoadError
from core.export.hf import META_FILE, check_output_dir, default_export_mode, save_pruned
from core.files import atomic_folder, write_safetensors
from core.models.adapters import mlp_widths
from core.models.loading import EMBEDDED, ensure_embedded, load_model, resolve
from core.quantize.backends import (
    INT8_METHODS,
    METHODS,
    SKIP_MODULES,
    QuantizationError,
    check_method,
    int8_tensors,
    load_int8_tensors,
    quantization_of,
    quantize_model,
)

RECIPE_FILE = "quantization.json"
QUANTIZED_FILE = "quantized.safetensors"
STORAGES = ("source", "int8")


def read_recipe(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}.") from exc
    if not isinstance(recipe, dict) or recipe.get("method") not in METHODS:
        raise ModelLoadError(f"{path} names no known quantization method; expected one of {', '.join(METHODS)}.")
    return recipe


def save_quantized(model: nn.Module, tokenizer, method: str, out_dir: str | os.PathLike, *,
                   source: str = "", extra: dict | None = None, meta: dict | None = None,
                   mode: str | None = None, storage: str = "source") -> Path:
    """Write the *unquantized* ``model`` (safetensors) + tokenizer + ``quantization.json`` recipe
    to a new folder, atomically. Pass the model before ``quantize_model`` (or a copy of it).
    ``meta``: an in-memory pruned model's pruning_meta.json — the weights are then written by
    ``core.export.save_pruned`` in ``mode`` (default: hf-native for equal widths, else
    hf-remote-code), so per-layer widths reload. ``storage="int8"``: the quantized layers are stored
    as INT8 weights + scales (``quantized.safetensors``) instead of float weights."""
    check_method(method)
    if quantization_of(model):
        raise QuantizationError("save_quantized needs the unquantized source model; the recipe is applied on load.")
    if storage not in STORAGES:
        raise QuantizationError(f"Unknown storage '{storage}'; choose one of: {', '.join(STORAGES)}.")
    if storage == "int8" and method not in INT8_METHODS:
        raise QuantizationError(f"Only {', '.join(INT8_METHODS)} can be stored as INT8 weights, not {method}.")
    target = check_output_dir(out_dir)
    with atomic_folder(target) as tmp:
        if meta is not None:
            chosen = mode or default_export_mode(mlp_widths(model))[0]
            save_pruned(model, tokenizer, tmp, meta, mode=chosen)  # fills the empty tmp folder atomically
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        if meta is None and source and (Path(source) / META_FILE).is_file():
            shutil.copy2(Path(source) / META_FILE, tmp / META_FILE)
        if storage == "int8":
            tensors = int8_tensors(quantize_model(copy.deepcopy(model).cpu(), method, device="cpu"))
            _drop_tensors(tmp, {key.rsplit(".", 1)[0] for key in tensors})
            write_safetensors(tmp / QUANTIZED_FILE, tensors, {"method": method})
        weights = ("INT8 weights + scales of the quantized layers in quantized.safetensors, the other tensors "
                   "as saved" if storage == "int8" else "unquantized source weights; the method is applied on load")
        recipe = {"format": "hfprune-quantization", "version": 1, "method": method,
                  "description": METHODS[method].description, "skip_modules": list(SKIP_MODULES),
                  "source": source, "storage": storage, "weights": weights,
                  "tool_version": __version__, **(extra or {})}
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    return target


def _drop_tensors(folder: Path, layers: set[str]) -> None:
    """Remove ``<layer>.weight`` / ``<layer>.bias`` of ``layers`` from the saved safetensors files (and
    the shard index), so only their INT8 form is on disk."""
    dropped: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
        tensors = load_file(str(path))
        keep = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in layers}
        if len(keep) != len(tensors):
            dropped |= set(tensors) - set(keep)
            save_file(keep, str(path), metadata=metadata)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data.get("weight_map", {}).items() if k not in dropped}
        index.write_text(json.dumps(data, indent=2))


def _load_int8(spec: str, recipe: dict, device: str | torch.device | None):
    """A folder stored with ``storage="int8"``: the model skeleton from its config and float tensors,
    then the quantized layers rebuilt from ``quantized.safetensors`` (on the CPU; torchao layers may
    then move to ``device``)."""
    folder = Path(spec).expanduser()
    if not (folder / QUANTIZED_FILE).is_file():
        raise ModelLoadError(f"{folder} says its INT8 weights are in {QUANTIZED_FILE}, which is missing.")
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the INT8 layers' float weights are absent on purpose
    try:
        loaded = load_model(spec, dtype=torch.float32)
    finally:
        quiet.setLevel(level)
    load_int8_tensors(loaded.model, recipe["method"], load_file(str(folder / QUANTIZED_FILE)))
    if device is not None and torch.device(device).type != "cpu":
        loaded.model.to(device)
    return loaded


def check_memory(location: str, factor: float = 1.5) -> None:
    """Refuse to load a local model whose fp32 weights (× ``factor`` working room) exceed free RAM."""
    folder = Path(location)
    if not folder.is_dir():
        return
    need = sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))
    available = psutil.virtual_memory().available
    if need * factor > available:
        raise ModelLoadError(f"The model in {folder} needs about {need * factor / 2**30:.1f} GiB of memory to load "
                             f"but only {available / 2**30:.1f} GiB is free.")


def load_any(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
             device_map: str | None = None):
    """Like ``core.models.load_model``, but a folder with ``quantization.json`` comes back quantized
    (recipe applied on load, on ``device`` or the CPU). Returns a ``LoadedModel``; the method is
    ``quantization_of(loaded.model)`` and the recipe ``loaded.recipe`` (None for plain models).
    ``device_map="auto"``: accelerate spreads a plain model over the GPUs (``device`` is then ignored)."""
    spec = (spec or "").strip()
    recipe = None
    if spec and Path(spec).expanduser().is_dir():
        recipe = read_recipe(Path(spec).expanduser())
        if recipe:
            check_method(recipe["method"], device or "cpu")
    if spec:
        location, _gguf = resolve(spec)
        if device_map is None:  # a dispatched model streams to the GPUs; the CPU need not hold it
            check_memory(location)
    if recipe and device_map is not None:
        raise ModelLoadError("A quantized folder is loaded whole on one device; drop --device-map auto.")
    if recipe and recipe.get("storage") == "int8":
        loaded = _load_int8(spec, recipe, device)
        loaded.recipe = recipe
        return loaded
    loaded = load_model(spec, dtype=dtype, device_map=device_map)
    if device is not None and device_map is None:
        loaded.model.to(device)
    if recipe:
        quantize_model(loaded.model, recipe["method"], device=device)
    loaded.recipe = recipe
    return loaded


def spec_folder(spec: str) -> Path | None:
    """The local folder behind a model spec (an embedded alias is converted on first use), or None
    for a hub id or a .gguf file."""
    if spec in EMBEDDED:
        return ensure_embedded(spec)
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def load_on(spec: str, device: torch.device, method: str | None = None):
    """``load_any`` in the working dtype of ``device`` (bf16 on CUDA, fp32 on the CPU), then quantized
    in memory with ``method`` when given. Returns a ``LoadedModel``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_any(spec, dtype=dtype, device=device)
    if method:
        quantize_model(loaded.model, method, device=device)
    return loaded
