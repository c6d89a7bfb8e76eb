"""Quantize a dense or pruned model, save it as weights + recipe, and reload it.

    from core.quantize import quantize_model, save_quantized, load_any
    model = quantize_model(loaded.model, "torchao-int8")       # in place; returns the model
    loaded = load_any("runs/q8")                                 # a quantized folder, or any load_model spec

Methods (every ``nn.Linear`` inside the transformer blocks; the LM head stays in full precision
because it is tied to the input embeddings in the supported models):

``bnb-8bit``              bitsandbytes LLM.int8 (``Linear8bitLt``, threshold 6.0), CPU or CUDA
``bnb-nf4``               bitsandbytes 4-bit NormalFloat (``Linear4bit``, block 64), CPU or CUDA
``torchao-int8``          torchao ``Int8WeightOnlyConfig`` (per-channel int8 weights)
``torchao-int8-dynamic``  torchao ``Int8DynamicActivationInt8WeightConfig``
``torch-dynamic-int8``    legacy ``torch.ao.quantization.quantize_dynamic`` (deprecated, CPU only,
                          per-tensor int8; very lossy on SmolLM2 — kept as a baseline to show that)

A saved quantized folder holds the *source* weights as safetensors (dense or pruned, exactly as
``save_pretrained`` writes them), the tokenizer, ``pruning_meta.json`` when the source was pruned,
and ``quantization.json`` (the recipe). ``load_any`` applies the recipe on load; nothing is pickled.
``quantized_bytes`` in the recipe is what the quantized weights occupy in memory.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import HFPruneError, ModelLoadError
from .export import META_FILE, check_output_dir
from .paths import atomic_folder

RECIPE_FILE = "quantization.json"
SKIP_MODULES = ("lm_head",)


class QuantizationError(HFPruneError):
    """Unknown method, missing backend, unsupported device, or a model that is already quantized."""


@dataclass(frozen=True)
class Method:
    name: str
    backend: str  # importable module
    package: str  # pip requirement
    description: str
    cpu: bool = True
    cuda: bool = True
    legacy: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("bnb-8bit", "bitsandbytes", "bitsandbytes==0.50.2", "bitsandbytes LLM.int8 8-bit weights"),
        Method("bnb-nf4", "bitsandbytes", "bitsandbytes==0.50.2", "bitsandbytes 4-bit NormalFloat (NF4) weights"),
        Method("torchao-int8", "torchao", "torchao==0.18.0", "torchao int8 weight-only"),
        Method("torchao-int8-dynamic", "torchao", "torchao==0.18.0", "torchao int8 dynamic activations + int8 weights"),
        Method("torch-dynamic-int8", "torch", "torch", "legacy torch.ao quantize_dynamic int8 (deprecated, lossy)",
               cuda=False, legacy=True),
    )
}


def check_method(method: str, device: str | torch.device = "cpu") -> Method:
    """Validate a method name, its backend and the device before any model work."""
    if method not in METHODS:
        raise QuantizationError(f"Unknown quantization method '{method}'; available: {', '.join(METHODS)}.")
    entry = METHODS[method]
    if importlib.util.find_spec(entry.backend) is None:
        raise QuantizationError(f"Method {method} needs the '{entry.backend}' package, which is not installed; "
                                f"install it with: pip install {entry.package}.")
    kind = torch.device(device).type
    if kind == "cuda" and not entry.cuda:
        raise QuantizationError(f"Method {method} runs on the CPU only; use torchao-int8-dynamic on a GPU.")
    if kind not in ("cpu", "cuda"):
        raise QuantizationError(f"Quantization runs on cpu or cuda, not '{kind}'.")
    return entry


@contextlib.contextmanager
def _quiet():
    """Backends print deprecation and kernel-availability chatter on import and first use."""
    loggers = [logging.getLogger(n) for n in ("bitsandbytes", "torchao", "torch.ao")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _import_backend(entry: Method):
    try:
        with _quiet(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return __import__(entry.backend)
    except Exception as exc:  # a broken install (missing native library, ...)
        raise QuantizationError(f"The '{entry.backend}' package is installed but does not import "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from exc


def quantization_of(model: nn.Module) -> str | None:
    """The method a model was quantized with by this module, or None."""
    return getattr(model, "hfprune_quantization", None)


def _linear_targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear, str]]:
    """(parent, attribute, linear, full name) for every plain nn.Linear not in SKIP_MODULES."""
    out = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            full = f"{parent_name}.{attr}" if parent_name else attr
            if type(child) is nn.Linear and attr not in SKIP_MODULES:
                out.append((parent, attr, child, full))
    return out


# bitsandbytes' NF4 CUDA kernels fail with "misaligned address" on a layer with 1229 outputs (a 20 %-pruned
# SmolLM2 MLP) and run with 1216 or 1232 (measured on an H100, bitsandbytes 0.50.2).
NF4_CUDA_MULTIPLE = 16


def check_bnb_shapes(model: nn.Module, method: str, device: str | torch.device) -> None:
    """Refuse, before anything is converted, layer shapes the bitsandbytes kernels cannot run on ``device``."""
    if method != "bnb-nf4" or torch.device(device).type != "cuda":
        return
    for _parent, _attr, linear, name in _linear_targets(model):
        odd = [n for n in (linear.in_features, linear.out_features) if n % NF4_CUDA_MULTIPLE]
        if odd:
            raise QuantizationError(
                f"bitsandbytes NF4 on CUDA needs layer widths that are multiples of {NF4_CUDA_MULTIPLE}, but {name} "
                f"is {linear.in_features} → {linear.out_features}; prune with --round-to 64 (or "
                f"{NF4_CUDA_MULTIPLE}), or choose bnb-8bit or torchao-int8.")


def _bnb_swap(model: nn.Module, method: str, device: torch.device) -> None:
    import bitsandbytes as bnb

    compute = next(model.parameters()).dtype
    for parent, attr, linear, _name in _linear_targets(model):
        has_bias = linear.bias is not None
        weight = linear.weight.data.detach().to("cpu").contiguous().clone()
        if method == "bnb-8bit":
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                      has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute,
                                    quant_type="nf4")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if linear.in_features % 64 or linear.out_features % 32:
                # bitsandbytes' AVX512-bf16 CPU repacking assumes K % 64 == 0 and N % 32 == 0 and crashes on
                # other shapes (e.g. pruned widths such as 1229); those layers keep the generic NF4 kernel.
                new.support_avx512bf16_for_cpu = False
        if has_bias:
            new.bias = nn.Parameter(linear.bias.data.detach().to("cpu").clone(), requires_grad=False)
        new = new.to(device)  # bitsandbytes quantizes when the module is moved to its device
        if has_bias and new.bias is not None:
            new.bias.data = new.bias.data.to(compute)
        setattr(parent, attr, new)


def _torchao(model: nn.Module, method: str) -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if method == "torchao-int8" else Int8DynamicActivationInt8WeightConfig()
    targets = {id(linear) for _p, _a, linear, _n in _linear_targets(model)}
    quantize_(model, config, filter_fn=lambda module, _fqn: id(module) in targets)


def _torch_dynamic(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = {name: default_dynamic_qconfig for _p, _a, _l, name in _linear_targets(model)}
    return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, *, device: str | torch.device | None = None) -> nn.Module:
    """Quantize ``model`` in place with ``method`` on ``device`` (default: where the model is) and
    return it. The model must be a plain (dense or pruned) floating-point model."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    entry = check_method(method, device)
    if quantization_of(model):
        raise QuantizationError(f"This model is already quantized ({quantization_of(model)}); start from the "
                                f"unquantized model.")
    if not _linear_targets(model):
        raise QuantizationError("The model has no plain nn.Linear layers to quantize.")
    _import_backend(entry)
    check_bnb_shapes(model, method, device)
    model.eval()
    with _quiet():
        if method.startswith("bnb-"):
            _bnb_swap(model, method, device)
            model.to(device)
        elif method.startswith("torchao-"):
            model.to(device)
            _torchao(model, method)
        else:
            if next(model.parameters()).dtype != torch.float32:
                model.to(torch.float32)
            _torch_dynamic(model)
    model.hfprune_quantization = method
    return model


def _tensor_bytes(tensor: torch.Tensor) -> int:
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor).__module__.startswith("torchao"):
        names, _ctx = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def _quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors a bitsandbytes QuantState keeps alive (absmax, code table, offset and the
    nested state's), read from its attributes: ``as_dict`` clones the nested code table, and a
    temporary's freed address could collide with another tensor's in the dedup by data_ptr."""
    found: list[torch.Tensor] = []
    while state is not None:
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if isinstance(value, torch.Tensor):
                found.append(value)
        state = getattr(state, "state2", None)
    return found


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy in memory, quantized storage and scales included
    (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0

    def add(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if tensor is None:
            return
        key = id(tensor) if type(tensor).__module__.startswith("torchao") else tensor.data_ptr()
        if key in seen:
            return
        seen.add(key)
        total += _tensor_bytes(tensor)

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        for part in _quant_state_tensors(getattr(tensor, "quant_state", None)):
            add(part)
        scb = getattr(tensor, "SCB", None)
        if isinstance(scb, torch.Tensor):
            add(scb)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for module in model.modules():
        if isinstance(module, DynamicLinear):
            weight, bias = module._weight_bias()
            total += weight.numel()  # int8
            if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += weight.q_per_channel_scales().numel() * 8 + weight.q_per_channel_zero_points().numel() * 8
            else:
                total += 16
            if bias is not None:
                total += bias.numel() * bias.element_size()
    return total


def _is_quantized_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear) or (isinstance(module, nn.Linear) and type(module) is not nn.Linear) or (
        isinstance(module, nn.Linear) and type(module.weight).__module__.startswith("torchao"))


def _logical_count(modules, seen: set) -> int:
    total = 0
    for module in modules:
        if _is_quantized_linear(module):
            total += module.in_features * module.out_features
            bias = module.bias() if callable(getattr(module, "bias", None)) else module.bias
            total += bias.numel() if bias is not None else 0
            continue
        for p in module.parameters(recurse=False):
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
    return total


def param_counts(model: nn.Module) -> dict[str, int]:
    """Like ``core.bench.count_params`` (logical parameters, tied weights once) but also for
    quantized models, whose packed storage has fewer elements than the weights it represents."""
    total = _logical_count(model.modules(), set())
    mlp = 0
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    for layer in layers:
        if getattr(layer, "mlp", None) is not None:
            mlp += _logical_count(layer.mlp.modules(), set())
    return {"params": total, "mlp_params": mlp}


def mlp_widths_any(model: nn.Module) -> list[int]:
    """d_ff per layer, read from ``gate_proj.out_features`` (works for quantized layers too)."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return [int(layer.mlp.gate_proj.out_features) for layer in layers]


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of every file in a folder (what the folder costs on disk)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


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
                   source: str = "", extra: dict | None = None) -> Path:
    """Write the *unquantized* ``model`` (safetensors) + tokenizer + ``quantization.json`` recipe
    to a new folder, atomically. Pass the model before ``quantize_model`` (or a copy of it)."""
    check_method(method)
    if quantization_of(model):
        raise QuantizationError("save_quantized needs the unquantized source model; the recipe is applied on load.")
    target = check_output_dir(out_dir)
    with atomic_folder(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if source and (Path(source) / META_FILE).is_file():
            shutil.copy2(Path(source) / META_FILE, tmp / META_FILE)
        recipe = {"format": "hfprune-quantization", "version": 1, "method": method,
                  "description": METHODS[method].description, "skip_modules": list(SKIP_MODULES),
                  "source": source, "weights": "unquantized source weights; the method is applied on load",
                  "tool_version": __version__, **(extra or {})}
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    return target


def check_memory(location: str, factor: float = 1.5) -> None:
    """Refuse to load a local model whose fp32 weights (× ``factor`` working room) exceed free RAM."""
    import psutil

    folder = Path(location)
    if not folder.is_dir():
        return
    need = sum(p.stat().st_size for p in folder.glob("*.safetensors")) + sum(p.stat().st_size for p in folder.glob("*.bin"))
    available = psutil.virtual_memory().available
    if need * factor > available:
        raise ModelLoadError(f"The model in {folder} needs about {need * factor / 2**30:.1f} GiB of memory to load "
                             f"but only {available / 2**30:.1f} GiB is free.")


def load_any(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """Like ``core.models.load_model``, but a folder with ``quantization.json`` comes back quantized
    (recipe applied on load, on ``device`` or the CPU). Returns a ``LoadedModel``; the method is
    ``quantization_of(loaded.model)`` and the recipe ``loaded.recipe`` (None for plain models)."""
    from .models import load_model, resolve

    spec = (spec or "").strip()
    recipe = None
    if spec and Path(spec).expanduser().is_dir():
        recipe = read_recipe(Path(spec).expanduser())
        if recipe:
            check_method(recipe["method"], device or "cpu")
    if spec:
        location, _gguf = resolve(spec)
        check_memory(location)
    loaded = load_model(spec, dtype=dtype)
    if device is not None:
        loaded.model.to(device)
    if recipe:
        quantize_model(loaded.model, recipe["method"], device=device)
    loaded.recipe = recipe
    return loaded
