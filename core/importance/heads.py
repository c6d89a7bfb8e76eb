"""Entropy-Taylor importance of attention heads: how much the model's next-token entropy depends on
each head's output, read at the input of ``o_proj`` (the heads' outputs side by side, (B, T, heads·d)).

For a multiplier ``s_h`` on head h's slice (1 at the model's own weights), ∂H/∂s_h = Σ_t Σ_d a·∂H/∂a
over the head's slice; the score is |∂H/∂s_h| per window, summed over windows — first-order Taylor, as
for MLP neurons, with H the summed next-token entropy of the model's own distribution (no labels).
Granularity ``query`` scores each query head, ``kv`` each key/value head (the sum over the query heads
that read it).
"""
from __future__ import annotations

import torch
from torch import nn

from core.importance.criteria import entropy
from core.models.adapters import attention_handles
from core.models.forward import base_forward, chunk_rows, frozen, hooks, lm_logits

GRANULARITIES = ("query", "kv")


def head_entropy_scores(model: nn.Module, windows: torch.Tensor, granularity: str = "query") -> list[torch.Tensor]:
    """Per layer (heads_l,) for ``query`` or (kv_heads_l,) for ``kv``, fp32 on the CPU; ``windows`` (N, T) ids,
    one window per forward/backward. Other hooks already on the model (e.g. MLP gates) stay in effect."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be 'query' or 'kv', got {granularity!r}")
    handles = attention_handles(model)
    device = next(model.parameters()).device
    # one multiplier per unit and layer, all ones: the forward is the model's own
    units = [torch.ones(h.heads if granularity == "query" else h.kv_heads, device=device, requires_grad=True)
             for h in handles]

    def scale_hook(index: int, heads: int, head_dim: int, group: int):
        def hook(_module, args):
            s = units[index] if granularity == "query" else units[index].repeat_interleave(group)  # (heads,)
            x = args[0]  # (B, T, heads·d)
            return (((x.unflatten(-1, (heads, head_dim))) * s.to(x.dtype).unsqueeze(-1)).flatten(-2),
                    *args[1:])
        return hook

    registered = [h.attn.o_proj.register_forward_pre_hook(scale_hook(i, h.heads, h.head_dim, h.group))
                  for i, h in enumerate(handles)]
    totals = [torch.zeros(u.numel()) for u in units]
    step = chunk_rows(model.config.vocab_size)
    with frozen(model), hooks(registered), torch.enable_grad():
        for window in windows:
            hidden = base_forward(model, window.unsqueeze(0).to(device)).reshape(-1, model.config.hidden_size)
            loss = sum(entropy(lm_logits(model, hidden[i:i + step]).float()).sum()
                       for i in range(0, hidden.shape[0], step))  # summed next-token entropy of the window
            grads = torch.autograd.grad(loss, units)
            totals = [t + g.detach().abs().float().cpu() for t, g in zip(totals, grads)]
    return totals
