"""Fake quantisation for quantisation-aware training: the final number formats the pipeline's ``q``
stage can target, torchao's ``FakeQuantizedLinear`` swapped in with each format's quantisers
(straight-through gradients), and the conversion to the real format by ``core.quantize.backends``.

Weights (N, K) and activations (…, K) keep their shapes; only their values are rounded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from core.quantize.backends import linear_targets, quantize_model


@dataclass(frozen=True)
class Format:
    """A final number format: how its fake quantisation is made and which ``core.quantize`` method
    converts it (the same method ``load_any`` applies from the exported recipe)."""

    name: str
    method: str
    description: str
    activations: str  # "fp32" | "int8 per call (asymmetric, 7-bit range)" …
    cuda_only: bool = False


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("int8-dynamic", "fbgemm-int8-dynamic",
           "INT8 activations (one asymmetric scale per call, fbgemm's 7-bit range) × per-channel INT8 weights, "
           "fbgemm kernels: the format that is faster than fp32 on this CPU", "int8 per call"),
    Format("int8-weight", "torchao-int8", "per-channel INT8 weights (torchao), fp32 activations and compute",
           "fp32"),
    Format("nf4", "bnb-nf4", "bitsandbytes 4-bit NormalFloat weights (block 64), bf16 compute; CUDA only", "bf16",
           cuda_only=True),
)}



class PerCallActivationFakeQuantizer(nn.Module):
    """fbgemm's dynamic activation quantisation, simulated: one (scale, zero point) per call over the
    whole input (B, T, K), asymmetric over [min(x, 0), max(x, 0)] into fbgemm's reduced range [0, 127]
    with fbgemm's zero-point rule (ChooseQuantizationParams); straight-through gradient
    (``torch.fake_quantize_per_tensor_affine``). Hand-written because torchao's
    ``IntxFakeQuantizeConfig`` has no per-tensor granularity; it plugs into torchao's
    ``FakeQuantizedLinear.activation_fake_quantizer``."""

    qmin, qmax = 0, 127

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, K) → (…, K)
        scale, zero_point = fbgemm_qparams(float(x.detach().min()), float(x.detach().max()), self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, self.qmin, self.qmax)


def fbgemm_qparams(low: float, high: float, qmin: int = 0, qmax: int = 127) -> tuple[float, int]:
    """(scale, zero point) as fbgemm's ChooseQuantizationParams computes them for dynamic INT8 inputs."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (qmax - qmin)
    if float(torch.tensor(scale, dtype=torch.float32)) == 0.0 or math.isinf(1.0 / float(scale or 1.0)):
        scale = 0.1
    from_min, from_max = qmin - low / scale, qmax - high / scale
    initial = from_min if abs(qmin) - abs(low / scale) < abs(qmax) - abs(high / scale) else from_max
    zero_point = qmin if initial < qmin else qmax if initial > qmax else int(round(initial))
    return float(torch.tensor(scale, dtype=torch.float32)), zero_point


class NF4WeightFakeQuantizer(nn.Module):
    """bitsandbytes NF4 (block 64) round trip of the weight with a straight-through gradient: the same
    quantiser the conversion uses, so the forward is the converted model's. Hand-written because
    torchao's QAT configs have no NF4; needs CUDA (bitsandbytes' 4-bit kernels)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # (N, K) → (N, K)
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_4bit(w.detach().to(torch.bfloat16).contiguous(), blocksize=64, quant_type="nf4")
        deq = bnbf.dequantize_4bit(q, state, quant_type="nf4").to(w.dtype)
        return w + (deq - w).detach()


def fake_quantize(model: nn.Module, fmt: Format) -> nn.Module:
    """Swap every plain ``nn.Linear`` outside the LM head for torchao's ``FakeQuantizedLinear`` with the
    format's fake quantisers (in place; linears already fake-quantised are left alone). The weight
    Parameters are shared, so trainable parameters stay the same objects."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig

    targets = {id(linear) for _p, _a, linear, _n in linear_targets(model)}
    if not targets:
        return model
    if fmt.name == "nf4":
        for parent, attr, linear, _name in linear_targets(model):
            fq = FakeQuantizedLinear.from_linear(linear)
            fq.weight_fake_quantizer = NF4WeightFakeQuantizer()
            setattr(parent, attr, fq)
    else:
        weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)  # absmax / 127.5, [-128, 127]
        quantize_(model, QATConfig(weight_config=weight, step="prepare"),
                  filter_fn=lambda module, _fqn: id(module) in targets)
        if fmt.activations != "fp32":
            for module in model.modules():
                if isinstance(module, FakeQuantizedLinear) and module.activation_fake_quantizer is None:
                    module.activation_fake_quantizer = PerCallActivationFakeQuantizer()
    model.hfprune_fake_quant = fmt.name
    return model


def unfake(model: nn.Module) -> nn.Module:
    """Every ``FakeQuantizedLinear`` back to a plain ``nn.Linear`` with the same weight Parameter (in place)."""
    from torchao.quantization.qat import FakeQuantizedLinear

    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, FakeQuantizedLinear):
                setattr(parent, attr, child.to_linear())
    if hasattr(model, "hfprune_fake_quant"):
        del model.hfprune_fake_quant
    return model


def fake_format(model: nn.Module) -> str | None:
    """The format a model is fake-quantised in (None for a plain model)."""
    return getattr(model, "hfprune_fake_quant", None)


def convert(model: nn.Module, fmt: Format) -> nn.Module:
    """Fake quantisation → the real format (in place): plain linears with the trained weights, then the
    format's backend quantises them (``core.quantize.quantize_model``)."""
    unfake(model)
    return quantize_model(model, fmt.method)
