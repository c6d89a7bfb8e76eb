"""Fake quantisation for quantisation-aware training: the final number formats the pipeline's ``q``
stage can target, torchao's ``FakeQuantizedLinear`` swapped in with each format's quantisers
(straight-through gradients), and the conversion to the real format by ``core.quantize.backends`` — or,
for the GGUF block formats (``gguf-q8_0`` / ``gguf-q5_0`` / ``gguf-q4_0``), a GGUF file of that type
written from the trained float weights (``core.export.gguf``), which llama.cpp runs.

Weights (N, K) and activations (…, K) keep their shapes; only their values are rounded.

GGUF block formats: every 2-D matrix of the file — the LM head and the token embedding included — is
stored in blocks of 32 consecutive values along a row (the input dimension K), one fp16 scale per block,
symmetric (no offset): Q8_0 rounds x / d to an integer in [-127, 127] with d = max|x| / 127; Q5_0 / Q4_0
take the block's value of largest magnitude *with its sign*, m, and d = m / -16 (m / -8), so m itself lands
exactly on the most negative code and the codes run [-16, 15] ([-8, 7]). The fake quantisers below
repeat the ``gguf`` package's arithmetic (``gguf.quants``, what ``core.export.gguf`` writes) step by step in
fp32, so a fake-quantised weight equals the dequantised weight in the file. In the dot product llama.cpp
quantises the activations too, to Q8_0 blocks of 32 along K (the matrices' ``vec_dot_type``); that is
cheap to simulate and the GGUF formats do (``activations``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from core.export.gguf import GGUFOptions, save_gguf
from core.quantize.backends import QuantizationError, linear_targets, quantize_model


@dataclass(frozen=True)
class Format:
    """A final number format: how its fake quantisation is made and which ``core.quantize`` method
    converts it (the same method ``load_any`` applies from the exported recipe)."""

    name: str
    method: str
    description: str
    activations: str  # "fp32" | "int8 per call (asymmetric, 7-bit range)" …
    cuda_only: bool = False
    gguf: str | None = None  # the GGUF tensor type the conversion writes (core.export.gguf), None for torch formats
    block: int = 1  # values per quantisation block along K: kept widths must be multiples of it


GGUF_FAKE_BLOCK = 32  # Q8_0 / Q5_0 / Q4_0 (gguf.constants.GGML_QUANT_SIZES); core.export.gguf.GGUF_BLOCK agrees

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("int8-dynamic", "fbgemm-int8-dynamic",
           "INT8 activations (one asymmetric scale per call, fbgemm's 7-bit range) × per-channel INT8 weights, "
           "fbgemm kernels: the format that is faster than fp32 on this CPU", "int8 per call"),
    Format("int8-weight", "torchao-int8", "per-channel INT8 weights (torchao), fp32 activations and compute",
           "fp32"),
    Format("nf4", "bnb-nf4", "bitsandbytes 4-bit NormalFloat weights (block 64), bf16 compute; CUDA only", "bf16",
           cuda_only=True),
    *(Format(f"gguf-{kind}", "", f"GGUF {kind.upper()} ({bits}-bit weights, one fp16 scale per block of 32 along "
             f"the input, LM head and embedding included), converted to a .gguf file and run in llama.cpp",
             "Q8_0 blocks of 32 (llama.cpp's dot product)", gguf=kind, block=GGUF_FAKE_BLOCK)
      for kind, bits in (("q8_0", 8), ("q5_0", 5), ("q4_0", 4))),
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


class GGUFBlockError(QuantizationError):
    """A matrix whose rows do not fill a GGUF format's blocks."""


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), as ``gguf.quants.np_roundf`` computes it; torch.round rounds half to even."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def gguf_dequantized(x: torch.Tensor, kind: str) -> torch.Tensor:
    """What GGUF type ``kind`` (q8_0 / q5_0 / q4_0) stores of ``x`` (…, K), read back: (…, K) fp32, the same
    numbers ``gguf.quants.dequantize(gguf.quants.quantize(x))`` gives (blocks of 32 along the last dimension,
    K a multiple of 32; no gradient)."""
    shape = x.shape
    b = x.detach().to(torch.float32).reshape(-1, GGUF_FAKE_BLOCK)
    if kind == "q8_0":
        d = b.abs().amax(dim=-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        codes = _roundf(b * inv)
    else:
        half = {"q5_0": 16, "q4_0": 8}[kind]
        signed_max = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))  # first of equal magnitudes, like numpy
        d = signed_max / -half
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        codes = torch.trunc(b * inv + 8.5 if half == 8 else b * inv + 16.5).clamp(0, 2 * half - 1) - half
    return (codes * d.to(torch.float16).to(torch.float32)).reshape(shape)


class GGUFBlockFakeQuantizer(nn.Module):
    """Straight-through round trip of a tensor (…, K) through a GGUF block type: weights (N, K) as the file
    stores them, or activations (…, K) as Q8_0 the way llama.cpp's dot product quantises its input.

    Hand-written rather than torchao's per-group ``IntxFakeQuantizeConfig`` (group_size=32, symmetric):
    torchao's symmetric scale is max|x| / ((qmax − qmin) / 2) — 127.5 for int8, 7.5 for int4 — and it
    rounds half to even with an fp32 scale, while GGUF divides by 127 (Q8_0) or takes the *signed*
    largest value over −8 / −16 (Q4_0 / Q5_0, codes [−8, 7] / [−16, 15]), rounds half away from zero and
    stores the scale in fp16; torchao's weights would differ from the file's in most blocks. It plugs
    into torchao's ``FakeQuantizedLinear`` as its weight / activation fake quantiser."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, K) → (…, K), K a multiple of 32
        return x + (gguf_dequantized(x, self.kind).to(x.dtype) - x).detach()

    def extra_repr(self) -> str:
        return self.kind


class _EmbeddingRowsHook:
    """Forward hook of the token embedding in a GGUF format: the looked-up rows (B, T, hidden) become the
    file's dequantised rows (the embedding matrix is stored in the format, blocks along hidden)."""

    def __init__(self, kind: str) -> None:
        self.quantizer = GGUFBlockFakeQuantizer(kind)

    def __call__(self, _module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        return self.quantizer(output)


def check_gguf_rows(model: nn.Module, fmt: Format) -> None:
    """Refuse (one sentence naming the layer) a linear whose input width K does not fill the format's blocks."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.in_features % fmt.block:
            pruned = name.endswith("down_proj")
            hint = (f" (its kept MLP width): prune with round-to {fmt.block} or a multiple" if pruned
                    else ": a size of the model that pruning does not change")
            raise GGUFBlockError(f"{fmt.name} stores rows in blocks of {fmt.block} values, but '{name}' has "
                                 f"{module.in_features} inputs{hint}.")


def _fake_quantize_gguf(model: nn.Module, fmt: Format) -> None:
    """Every linear — the LM head included — gets GGUF block fake quantisers for its weight and (Q8_0) its
    input; the token embedding's looked-up rows are fake-quantised by a forward hook. Tied embeddings stay
    tied (the Parameters are shared)."""
    from torchao.quantization.qat import FakeQuantizedLinear

    check_gguf_rows(model, fmt)
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                fq = FakeQuantizedLinear.from_linear(child)
                fq.weight_fake_quantizer = GGUFBlockFakeQuantizer(fmt.gguf)
                fq.activation_fake_quantizer = GGUFBlockFakeQuantizer("q8_0")
                setattr(parent, attr, fq)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embed, nn.Embedding):
        embed.register_forward_hook(_EmbeddingRowsHook(fmt.gguf))


def fake_quantize(model: nn.Module, fmt: Format) -> nn.Module:
    """Swap every plain ``nn.Linear`` outside the LM head for torchao's ``FakeQuantizedLinear`` with the
    format's fake quantisers (in place; linears already fake-quantised are left alone). The weight
    Parameters are shared, so trainable parameters stay the same objects."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig

    if fmt.gguf:
        _fake_quantize_gguf(model, fmt)
        model.hfprune_fake_quant = fmt.name
        return model
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
    """Every ``FakeQuantizedLinear`` back to a plain ``nn.Linear`` with the same weight Parameter, and the GGUF
    formats' embedding hook removed (in place)."""
    from torchao.quantization.qat import FakeQuantizedLinear

    for parent in list(model.modules()):
        for key, hook in list(parent._forward_hooks.items()):
            if isinstance(hook, _EmbeddingRowsHook):
                del parent._forward_hooks[key]
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
    format's backend quantises them (``core.quantize.quantize_model``). A GGUF format has no torch
    backend — its conversion is the file (:func:`convert_gguf`) — so here it stays fake-quantised,
    which computes what the file holds."""
    if fmt.gguf:
        if fake_format(model) != fmt.name:
            unfake(model)
            fake_quantize(model, fmt)
        return model
    unfake(model)
    return quantize_model(model, fmt.method)


def convert_gguf(model: nn.Module, tokenizer, fmt: Format, path, *, source: str | None = None,
                 name: str | None = None):
    """Fake quantisation → a GGUF file of the format's type at ``path`` (atomically), written from the
    trained float weights by ``core.export.gguf.save_gguf`` (it quantises them with the same arithmetic
    the fake quantisers simulate); the model is left plain (unfaked). Returns the path."""
    unfake(model)
    return save_gguf(model, tokenizer, path, GGUFOptions(type=fmt.gguf), source=source, name=name)
