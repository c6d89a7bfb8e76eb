"""Parameter and FLOP counts (measured latency lives with the benchmarks)."""
from __future__ import annotations

from torch import nn

from .adapters import mlp_handles


def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters (tied weights counted once) and MLP parameters."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    mlp = sum(p.numel() for h in mlp_handles(model) for p in h.mlp.parameters())
    return {"params": total, "mlp_params": mlp}


def mlp_params_for_widths(hidden: int, widths: list[int], bias: bool = False) -> int:
    """Parameters of gated MLPs with the given d_ff per layer: 3·H·d_ff (+ biases)."""
    return sum(3 * hidden * w + ((2 * w + hidden) if bias else 0) for w in widths)


def forward_flops_per_token(model: nn.Module, seq_len: int, widths: list[int] | None = None) -> int:
    """Approximate forward FLOPs per token (2 per multiply-accumulate) for linear layers and attention
    scores at context ``seq_len``; ``widths`` overrides the MLP widths (for previews)."""
    config = model.config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    widths = widths if widths is not None else [h.width for h in mlp_handles(model)]
    attn_proj = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    attn_scores = 2 * heads * head_dim * seq_len
    per_layer = [2 * (attn_proj + 3 * hidden * w) + attn_scores for w in widths]
    return int(sum(per_layer) + 2 * hidden * config.vocab_size)


def pareto_front(sizes: "list[float]", quality: "list[float]", lower_is_better: bool = True) -> list[int]:
    """Indices of the Pareto-optimal variants — none other is both smaller (size, any unit) and
    better in quality — ordered by size."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], quality[i] if lower_is_better else -quality[i]))
    front: list[int] = []
    for i in order:
        if not front or (quality[i] < quality[front[-1]] if lower_is_better else quality[i] > quality[front[-1]]):
            front.append(i)
    return front
