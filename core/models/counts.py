"""Analytic counts: parameters (dense, pruned or quantized), FLOPs per token, bytes of weights in
memory and of folders on disk, the parameter / FLOP preview of a planned pruning, and the Pareto
front of size vs quality. Measured latency / memory live in ``core.speed``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from core.errors import HFPruneError, UnsupportedArchitectureError
from core.models.adapters import blocks, is_encoder, mlp_handles, mlp_widths


@dataclass(frozen=True)
class MLPLayout:
    """What one MLP neuron costs: ``gated`` MLPs (gate/up/down) carry 3·H weights per neuron, plain
    fc1/fc2 MLPs 2·H; with ``bias`` each neuron also has 2 (gated) or 1 (plain) bias entries and the
    down projection H more per layer."""

    hidden: int
    gated: bool = True
    bias: bool = False

    @property
    def matrices(self) -> int:
        return 3 if self.gated else 2

    def params(self, widths: list[int]) -> int:
        """Parameters of the MLPs with ``widths`` d_ff per layer."""
        per_neuron = self.matrices * self.hidden + ((self.matrices - 1) if self.bias else 0)
        return sum(per_neuron * w + (self.hidden if self.bias else 0) for w in widths)


def mlp_layout(model: nn.Module) -> MLPLayout:
    """The model's MLP layout, read from its first MLP (all blocks share it)."""
    first = mlp_handles(model)[0]
    return MLPLayout(int(model.config.hidden_size), gated=first.gate is not None, bias=first.up.bias is not None)


def forward_flops_per_token(model: nn.Module, seq_len: int, widths: list[int] | None = None) -> int:
    """Approximate forward FLOPs per token (2 per multiply-accumulate) of a causal LM: q/k/v/o and MLP
    projections, both attention products at the average causal context ``seq_len``/2, and the LM head
    (none for encoders; :func:`encoder_flops` counts a whole bidirectional example). ``widths`` overrides
    the MLP widths (for previews)."""
    config = model.config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    widths = widths if widths is not None else [h.width for h in mlp_handles(model)]
    encoder = is_encoder(model)
    matrices = 2 if encoder else 3  # supported decoders are gated, encoders fc1/fc2 (works when quantized)
    attn_proj = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    attn_scores = 2 * heads * head_dim * seq_len
    per_layer = [2 * (attn_proj + matrices * hidden * w) + attn_scores for w in widths]
    head = 0 if encoder else 2 * hidden * config.vocab_size  # encoders have no LM head
    return int(sum(per_layer) + head)


def encoder_flops(model: nn.Module, tokens: int) -> int:
    """FLOPs (2 per multiply-add) of one encoder example of ``tokens`` tokens: every linear layer at its
    current shape, plus bidirectional attention's two (tokens × tokens × hidden) products per block."""
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    hidden = int(model.config.hidden_size)
    attention = 2 * tokens * tokens * hidden * len(blocks(model))
    return 2 * (linear * tokens + attention)


def pareto_front(sizes: "list[float]", quality: "list[float]", lower_is_better: bool = True) -> list[int]:
    """Indices of the Pareto-optimal variants — none other is both smaller (size, any unit) and
    better in quality — ordered by size."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], quality[i] if lower_is_better else -quality[i]))
    front: list[int] = []
    for i in order:
        if not front or (quality[i] < quality[front[-1]] if lower_is_better else quality[i] > quality[front[-1]]):
            front.append(i)
    return front


def prune_preview(model: nn.Module, widths: list[int], seq_len: int = 128) -> dict:
    """Parameters and forward FLOPs/token before → after keeping ``widths`` neurons per layer."""
    before_widths = mlp_widths(model)
    if len(widths) != len(before_widths):
        raise HFPruneError(f"Got widths for {len(widths)} layers; the model has {len(before_widths)}.")
    layout = mlp_layout(model)
    params = count_params(model)["params"]
    removed = layout.params(before_widths) - layout.params(widths)
    flops_before = forward_flops_per_token(model, seq_len, before_widths)
    flops_after = forward_flops_per_token(model, seq_len, widths)
    return {"widths_before": before_widths, "widths_after": list(widths),
            "params_before": params, "params_after": params - removed,
            "flops_before": flops_before, "flops_after": flops_after, "seq_len": seq_len}


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


def _mlp_modules(model: nn.Module) -> list[nn.Module]:
    """Each block's MLP module: through the architecture adapters, or (for torch.ao dynamic-quantized
    models, whose linears the adapters do not recognise) ``model.model.layers[i].mlp``."""
    try:
        return [h.mlp for h in mlp_handles(model)]
    except UnsupportedArchitectureError:
        layers = getattr(getattr(model, "model", None), "layers", None) or []
        return [layer.mlp for layer in layers if getattr(layer, "mlp", None) is not None]


def count_params(model: nn.Module) -> dict[str, int]:
    """Total and MLP parameters: tied weights counted once, and a quantized layer counts the weights it
    represents (its packed storage has fewer elements), so dense, pruned and quantized models compare."""
    total = _logical_count(model.modules(), set())
    mlp = sum(_logical_count(module.modules(), set()) for module in _mlp_modules(model))
    return {"params": total, "mlp_params": mlp}


param_counts = count_params  # the name the quantization code used; one implementation


def mlp_widths_any(model: nn.Module) -> list[int]:
    """d_ff per layer, read from ``gate_proj.out_features`` (works for quantized layers too)."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return [int(layer.mlp.gate_proj.out_features) for layer in layers]


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of every file in a folder (what the folder costs on disk)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
