"""Quantization backends and applying them to a dense or pruned model (in memory).

    from core.quantize import quantize_model
    model = quantize_model(loaded.model, "torchao-int8")       # in place; returns the model

Methods (every ``nn.Linear`` inside the transformer blocks; the LM head stays in full precision
because it is tied to the input embeddings in the supported models):

``bnb-8bit``              bitsandbytes LLM.int8 (``Linear8bitLt``, threshold 6.0), CPU or CUDA
``bnb-nf4``               bitsandbytes 4-bit NormalFloat (``Linear4bit``, block 64), CPU or CUDA
``torchao-int8``          torchao ``Int8WeightOnlyConfig`` (per-channel int8 weights)
``torchao-int8-dynamic``  torchao ``Int8DynamicActivationInt8WeightConfig``
``torch-dynamic-int8``    legacy ``torch.ao.quantization.quantize_dynamic`` (deprecated, CPU only,
                          per-tensor int8; very lossy on SmolLM2 — kept as a baseline to show that)
``fbgemm-int8-dynamic``   the same fbgemm kernels with per-channel INT8 weights (activations still one
                          scale per call): on CPUs without AVX-512 VNNI the only INT8 path faster than
                          fp32 (torchao's dynamic INT8 runs ``torch._int_mm``, ~15× slower than fp32
                          there; see benchmarks/results/int8_backends_cpu.md). CPU only.

Saving a quantized model (weights + recipe) and loading it back live in ``core.quant_store``; the
byte and parameter accounting of quantized models in ``core.counts``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .errors import HFPruneError

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
        Method("fbgemm-int8-dynamic", "torch", "torch",
               "fbgemm dynamic int8 activations (one scale per call) x per-channel int8 weights (CPU)", cuda=False),
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


def _torch_dynamic(model: nn.Module, per_channel: bool = False) -> nn.Module:
    # torchao has no eager INT8 x INT8 kernel that is fast on AVX2 CPUs; fbgemm (torch.ao's dynamic
    # Linear) is, so the fast CPU format uses it with per-channel weights.
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {name: qconfig for _p, _a, _l, name in _linear_targets(model)}
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
            _torch_dynamic(model, per_channel=method == "fbgemm-int8-dynamic")
    model.hfprune_quantization = method
    return model
