"""Physically remove MLP neurons: slice gate/up (fc1) rows and down (fc2) columns; the result is a smaller model.

``pruned_view`` makes a pruned copy that shares every non-MLP tensor with the original."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .adapters import mlp_handles, set_config_widths
from .errors import PruneConfigError


def _sliced_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping ``index`` along ``dim`` of the weight (0 = output rows, 1 = input columns)."""
    weight = layer.weight.detach().index_select(dim, index.to(layer.weight.device)).clone()
    has_bias = layer.bias is not None
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if has_bias:
            bias = layer.bias.detach()
            new.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new


def prune_mlp_neurons(model: nn.Module, kept: list[torch.Tensor], inplace: bool = False) -> nn.Module:
    """Keep only the neurons ``kept[l]`` (ascending LongTensor) in each layer's MLP.

    Updates ``config.intermediate_size`` when all layers end equal, else records the per-layer
    widths in ``config.intermediate_sizes``. Returns the pruned model (a copy unless inplace).
    """
    target = model if inplace else copy.deepcopy(model)
    handles = mlp_handles(target)
    if len(kept) != len(handles):
        raise PruneConfigError(f"Got kept indices for {len(kept)} layers; the model has {len(handles)}.")
    for h, index in zip(handles, kept):
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() < 1:
            raise PruneConfigError(f"Layer {h.index} would keep no neurons.")
        if index.min() < 0 or index.max() >= h.width or index.unique().numel() != index.numel():
            raise PruneConfigError(f"Layer {h.index}: kept indices must be unique and within [0, {h.width}).")
        for role, linear in h.linears.items():  # gate/up lose rows, down loses columns
            h.replace(role, _sliced_linear(linear, index, 1 if role == "down" else 0))
        if hasattr(h.mlp, "intermediate_size"):
            h.mlp.intermediate_size = int(index.numel())
    set_config_widths(target.config, [h.width for h in mlp_handles(target)])
    return target


def pruned_view(model: nn.Module, kept: list[torch.Tensor], weights_from: nn.Module | None = None) -> nn.Module:
    """A pruned copy that shares every non-MLP tensor (embeddings, attention, norms) with ``model``.

    Only the sliced MLP weights are new memory, so several variants of one base model stay cheap.
    ``weights_from``: a pruned model of the same widths whose MLP weights (e.g. a least-squares
    refit) replace the plain slices. Meant for inference and export; training it would also change
    the original.
    """
    handles = mlp_handles(model)
    memo: dict[int, object] = {}
    for h in handles:  # never copy the full-size MLP weights: they are replaced by sliced ones
        for linear in h.linears.values():
            memo[id(linear)] = linear
    mlp_ids = {id(p) for h in handles for p in h.mlp.parameters()}
    for p in model.parameters():
        if id(p) not in mlp_ids:
            memo[id(p)] = p
    for b in model.buffers():
        memo[id(b)] = b
    clone = copy.deepcopy(model, memo)
    view = prune_mlp_neurons(clone, kept, inplace=True)
    if weights_from is not None:
        with torch.no_grad():
            for mine, theirs in zip(mlp_handles(view), mlp_handles(weights_from)):
                for name, linear in mine.linears.items():
                    linear.weight.copy_(theirs.linears[name].weight)
    return view
