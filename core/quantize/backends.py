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

from core.errors import HFPruneError

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


def linear_targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear, str]]:
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
    for _parent, _attr, linear, name in linear_targets(model):
        odd = [n for n in (linear.in_features, linear.out_features) if n % NF4_CUDA_MULTIPLE]
        if odd:
            raise QuantizationError(
                f"bitsandbytes NF4 on CUDA needs layer widths that are multiples of {NF4_CUDA_MULTIPLE}, but {name} "
                f"is {linear.in_features} → {linear.out_features}; prune with --round-to 64 (or "
                f"{NF4_CUDA_MULTIPLE}), or choose bnb-8bit or torchao-int8.")


def _bnb_swap(model: nn.Module, method: str, device: torch.device) -> None:
    import bitsandbytes as bnb

    compute = next(model.parameters()).dtype
    for parent, attr, linear, _name in linear_targets(model):
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
    targets = {id(linear) for _p, _a, linear, _n in linear_targets(model)}
    quantize_(model, config, filter_fn=lambda module, _fqn: id(module) in targets)


def _torch_dynamic(model: nn.Module, per_channel: bool = False) -> nn.Module:
    # torchao has no eager INT8 x INT8 kernel that is fast on AVX2 CPUs; fbgemm (torch.ao's dynamic
    # Linear) is, so the fast CPU format uses it with per-channel weights.
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {name: qconfig for _p, _a, _l, name in linear_targets(model)}
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
    if not linear_targets(model):
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


# ----------------------------------------------------------------------------------------------
# INT8 weights as plain tensors (what an INT8 folder stores on disk) and back
# ----------------------------------------------------------------------------------------------
INT8_METHODS = ("torchao-int8", "torchao-int8-dynamic", "fbgemm-int8-dynamic", "torch-dynamic-int8")


def int8_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The integer weights of a model quantized with one of :data:`INT8_METHODS`, by linear name:
    ``<name>.qweight`` int8 (N, K), ``<name>.scale`` (per output row (N,) / (N, 1), or (1,) for a
    per-tensor scale, in the backend's own dtype so a reload is exact) and ``<name>.bias`` when the
    layer has one. Zero points are 0 for these symmetric formats (checked)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    method = quantization_of(model)
    if method not in INT8_METHODS:
        raise QuantizationError(f"Only {', '.join(INT8_METHODS)} models have INT8 weights to store (this one: "
                                f"{method or 'not quantized'}).")
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, DynamicLinear):
            weight, bias = module._weight_bias()
            if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                scale, zero = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
            else:
                scale = torch.tensor([weight.q_scale()], dtype=torch.float64)
                zero = torch.tensor([weight.q_zero_point()])
        elif isinstance(module, nn.Linear) and type(module.weight).__name__ == "Int8Tensor":
            weight, bias = module.weight, module.bias
            scale, zero = weight.scale, weight.zero_point
        else:
            continue
        if zero is not None and bool((zero != 0).any()):
            raise QuantizationError(f"{name} has non-zero weight zero points; its INT8 weights cannot be stored.")
        out[f"{name}.qweight"] = (weight.qdata if hasattr(weight, "qdata") else weight.int_repr()).contiguous()
        out[f"{name}.scale"] = scale.detach().contiguous()
        if bias is not None:
            out[f"{name}.bias"] = bias.detach().float().contiguous()
    return out


@torch.no_grad()
def load_int8_tensors(model: nn.Module, method: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Put the stored INT8 weights (:func:`int8_tensors`) into a plain model of the same shapes, as the
    backend's own quantized layers (in place, on the CPU): the result computes exactly what
    ``quantize_model(model, method)`` of the original weights computed."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if method not in INT8_METHODS:
        raise QuantizationError(f"INT8 weights load only for {', '.join(INT8_METHODS)}, not {method}.")
    entry = check_method(method, "cpu")
    _import_backend(entry)
    targets = linear_targets(model)
    missing = [name for _p, _a, _l, name in targets if f"{name}.qweight" not in tensors]
    if missing:
        raise QuantizationError(f"The stored INT8 weights lack {missing[0]} (and {len(missing) - 1} more layers).")
    for parent, attr, linear, name in targets:
        qweight, scale = tensors[f"{name}.qweight"], tensors[f"{name}.scale"]
        if tuple(qweight.shape) != (linear.out_features, linear.in_features):
            raise QuantizationError(f"The stored INT8 weight of {name} is {tuple(qweight.shape)}, the model's layer "
                                    f"{(linear.out_features, linear.in_features)}.")
        bias = tensors.get(f"{name}.bias")
        if method.startswith("torchao-"):
            from torchao.quantization.granularity import PerRow
            from torchao.quantization.quantize_.workflows.int8.int8_tensor import (
                Int8Tensor,
                QuantizeTensorToInt8Kwargs,
            )

            act = QuantizeTensorToInt8Kwargs(granularity=PerRow()) if method == "torchao-int8-dynamic" else None
            weight = Int8Tensor(qweight, scale, [1, linear.in_features], torch.float32,
                                zero_point=torch.zeros_like(scale, dtype=torch.int8), act_quant_kwargs=act)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias, requires_grad=False)
            continue
        if scale.numel() == 1:
            q = torch._make_per_tensor_quantized_tensor(qweight, float(scale), 0)
        else:
            zeros = torch.zeros_like(scale, dtype=torch.long)
            q = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zeros, 0)
        layer = DynamicLinear(linear.in_features, linear.out_features, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(q, bias)
        setattr(parent, attr, layer)
    model.eval()
    model.hfprune_quantization = method
    return model
