"""Quantized model folders: the recipe file, ``save_quantized`` and ``load_any``.

    from core.quant_store import save_quantized, load_any
    save_quantized(loaded.model, loaded.tokenizer, "torchao-int8", "runs/q8")   # unquantized model in
    loaded = load_any("runs/q8")                                 # a quantized folder, or any load_model spec

A saved quantized folder holds the *source* weights as safetensors (dense or pruned, exactly as
``save_pretrained`` writes them), the tokenizer, ``pruning_meta.json`` when the source was pruned,
and ``quantization.json`` (the recipe). ``load_any`` applies the recipe on load; nothing is pickled.
``quantized_bytes`` in the recipe is what the quantized weights occupy in memory.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import psutil
import torch
from torch import nn

from . import __version__
from .adapters import mlp_widths
from .errors import ModelLoadError
from .export import META_FILE, check_output_dir, default_export_mode, save_pruned
from .files import atomic_folder
from .models import EMBEDDED, ensure_embedded, load_model, resolve
from .quantize import METHODS, SKIP_MODULES, QuantizationError, check_method, quantization_of, quantize_model

RECIPE_FILE = "quantization.json"


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
                   mode: str | None = None) -> Path:
    """Write the *unquantized* ``model`` (safetensors) + tokenizer + ``quantization.json`` recipe
    to a new folder, atomically. Pass the model before ``quantize_model`` (or a copy of it).
    ``meta``: an in-memory pruned model's pruning_meta.json — the weights are then written by
    ``core.export.save_pruned`` in ``mode`` (default: hf-native for equal widths, else
    hf-remote-code), so per-layer widths reload."""
    check_method(method)
    if quantization_of(model):
        raise QuantizationError("save_quantized needs the unquantized source model; the recipe is applied on load.")
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
        recipe = {"format": "hfprune-quantization", "version": 1, "method": method,
                  "description": METHODS[method].description, "skip_modules": list(SKIP_MODULES),
                  "source": source, "weights": "unquantized source weights; the method is applied on load",
                  "tool_version": __version__, **(extra or {})}
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    return target


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
