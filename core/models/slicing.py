"""Physically remove MLP neurons: slice gate/up (fc1) rows and down (fc2) columns; the result is a smaller model.

``pruned_view`` makes a pruned copy that shares every non-MLP tensor with the original."""
from __future__ import annotations

import copy

import torch
from torch import nn

from core.errors import PruneConfigError
from core.models.adapters import attention_handles, mlp_handles, set_config_widths


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


def prune_attention_heads(model: nn.Module, kept_heads: list[torch.Tensor], kept_kv: list[torch.Tensor],
                          inplace: bool = False) -> nn.Module:
    """Keep query heads ``kept_heads[l]`` and KV heads ``kept_kv[l]`` (ascending) in each layer.

    Every kept query head must read a kept KV head and every kept KV head must keep the same number of
    query heads (HF attention repeats each KV head ``heads // kv_heads`` times); the kept query heads
    are then contiguous per KV head, so the new layout's head i reads new KV head ``i // group``.
    q/o lose the removed heads' rows/columns, k/v the removed KV heads' rows. The config records the
    per-layer counts as ``layer_num_attention_heads`` / ``layer_num_key_value_heads`` (exported
    through hf-remote-code). Returns the pruned model (a copy unless inplace)."""
    target = model if inplace else copy.deepcopy(model)
    handles = attention_handles(target)
    if len(kept_heads) != len(handles) or len(kept_kv) != len(handles):
        raise PruneConfigError(f"Got kept heads for {len(kept_heads)} layers; the model has {len(handles)}.")
    for h, heads, kv in zip(handles, kept_heads, kept_kv):
        heads = torch.as_tensor(heads, dtype=torch.long).sort().values
        kv = torch.as_tensor(kv, dtype=torch.long).sort().values
        if heads.numel() < 1 or kv.numel() < 1:
            raise PruneConfigError(f"Layer {h.index} would keep no attention heads.")
        if heads.unique().numel() != heads.numel() or heads.min() < 0 or heads.max() >= h.heads \
                or kv.unique().numel() != kv.numel() or kv.min() < 0 or kv.max() >= h.kv_heads:
            raise PruneConfigError(f"Layer {h.index}: kept heads must be unique and within range.")
        owners = heads // h.group  # (kept,) the KV head each kept query head reads
        per_kv = torch.bincount(owners, minlength=h.kv_heads)[kv]
        if set(owners.tolist()) != set(kv.tolist()) or per_kv.unique().numel() != 1:
            raise PruneConfigError(f"Layer {h.index}: every kept KV head must keep the same number of query heads "
                                   "and every kept query head its KV head.")
        d = h.head_dim
        rows = (heads.unsqueeze(1) * d + torch.arange(d)).reshape(-1)  # (kept·d,) query rows / o columns
        kv_rows = (kv.unsqueeze(1) * d + torch.arange(d)).reshape(-1)
        attn = h.attn
        attn.q_proj = _sliced_linear(attn.q_proj, rows, 0)
        attn.k_proj = _sliced_linear(attn.k_proj, kv_rows, 0)
        attn.v_proj = _sliced_linear(attn.v_proj, kv_rows, 0)
        attn.o_proj = _sliced_linear(attn.o_proj, rows, 1)
        attn.num_key_value_groups = heads.numel() // kv.numel()
    handles = attention_handles(target)
    target.config.layer_num_attention_heads = [h.heads for h in handles]
    target.config.layer_num_key_value_heads = [h.kv_heads for h in handles]
    return target


def padded_copy(model: nn.Module, width: int) -> nn.Module:
    """A copy of ``model`` whose every MLP is zero-padded to ``width`` hidden neurons (same outputs)."""
    clone = copy.deepcopy(model)
    for h in mlp_handles(clone):
        extra = width - h.width
        if extra == 0:
            continue
        for name, old in h.linears.items():
            out_dim, in_dim = (width, old.in_features) if name != "down" else (old.out_features, width)
            new = nn.Linear(in_dim, out_dim, bias=old.bias is not None, dtype=old.weight.dtype,
                            device=old.weight.device)
            with torch.no_grad():
                new.weight.zero_()
                new.weight[: old.weight.shape[0], : old.weight.shape[1]] = old.weight
                if old.bias is not None:
                    new.bias.zero_()
                    new.bias[: old.bias.shape[0]] = old.bias
            h.replace(name, new)
        if hasattr(h.mlp, "intermediate_size"):
            h.mlp.intermediate_size = width
    return clone
