"""Entropy-Taylor head scores (core.importance.heads) are the derivative they claim to be: for one window,
|∂H/∂s_h| with s_h scaling head h's output equals a central finite difference of the summed entropy."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny

from core.importance.criteria import entropy
from core.importance.heads import head_entropy_scores
from core.models.adapters import attention_handles


def summed_entropy(model, window: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=window.unsqueeze(0), use_cache=False).logits[0]  # (T, V)
        return float(entropy(logits.double()).sum())


@pytest.mark.parametrize("granularity", ["query", "kv"])
def test_head_scores_match_a_finite_difference(granularity):
    model = make_tiny("llama").double()
    window = torch.randint(0, 49152, (12,), generator=torch.Generator().manual_seed(3))
    scores = head_entropy_scores(model, window.unsqueeze(0), granularity)
    handles = attention_handles(model)
    assert [s.shape[0] for s in scores] == [h.heads if granularity == "query" else h.kv_heads for h in handles]
    eps = 1e-2  # RMSNorm computes in fp32 even in a double model: a smaller step drowns in its rounding
    for layer in (0, 1):
        h = handles[layer]
        width = h.head_dim * (1 if granularity == "query" else h.group)  # columns of o_proj one unit owns
        for unit in range(scores[layer].numel()):
            cols = slice(unit * width, (unit + 1) * width)
            weight = h.attn.o_proj.weight
            saved = weight.detach().clone()
            with torch.no_grad():
                weight[:, cols] = saved[:, cols] * (1 + eps)
            up = summed_entropy(model, window)
            with torch.no_grad():
                weight[:, cols] = saved[:, cols] * (1 - eps)
            down = summed_entropy(model, window)
            with torch.no_grad():
                weight.copy_(saved)
            numeric = abs(up - down) / (2 * eps)
            assert float(scores[layer][unit]) == pytest.approx(numeric, rel=1e-2, abs=1e-7)


def test_unknown_granularity_is_refused():
    with pytest.raises(ValueError, match="granularity"):
        head_entropy_scores(make_tiny("llama"), torch.zeros(1, 4, dtype=torch.long), "slot")
