"""core.metrics and the evaluate Reference: one dense pass gives exactly the numbers of re-running it."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny

from core import metrics
from core.importance.stats import top_k_indices
from core.measure.evaluate import Reference, evaluate, evaluate_reference
from core.models.slicing import pruned_view


def test_kl_entropy_and_overlap_match_their_definitions():
    torch.manual_seed(0)
    ref, other = torch.randn(5, 11), torch.randn(5, 11)
    p, q = ref.softmax(-1), other.softmax(-1)
    assert torch.allclose(metrics.per_token_kl(ref, other), (p * (p / q).log()).sum(-1), atol=1e-6)
    assert torch.allclose(metrics.entropy(metrics.log_probs(ref)), -(p * p.log()).sum(-1), atol=1e-6)
    assert torch.allclose(metrics.per_token_kl(ref, ref), torch.zeros(5), atol=1e-6)
    top = torch.tensor([[1, 2, 3, 4]])
    assert metrics.topk_overlap(top, torch.tensor([[4, 3, 9, 8]])).item() == 0.5
    assert [s.stop - s.start for s in metrics.row_chunks(40, 1000, chunk_bytes=16 * 4 * 1000)] == [16, 16, 8]


@pytest.mark.parametrize("budget", [1 << 30, 0, "one batch"])
def test_reference_gives_the_numbers_of_the_reference_model(budget):
    torch.manual_seed(0)
    dense = make_tiny("llama")
    layers, width = dense.config.num_hidden_layers, dense.config.intermediate_size
    variant = pruned_view(dense, top_k_indices([torch.rand(width) for _ in range(layers)], [width // 2] * layers))
    windows = torch.randint(0, dense.config.vocab_size, (6, 16))
    if budget == "one batch":
        budget = 4 * 16 * dense.config.vocab_size * 4
    reference = Reference(dense, windows, 4, budget_bytes=budget)
    direct = evaluate(variant, windows, dense, progress=False).to_dict()
    assert evaluate(variant, windows, reference, progress=False).to_dict() == direct
    assert evaluate(variant, windows, reference, progress=False).to_dict() == direct  # cached batches reused
    assert evaluate_reference(reference, progress=False).to_dict() == evaluate(dense, windows, progress=False).to_dict()
    assert reference.cached_bytes <= budget
    with pytest.raises(ValueError):
        evaluate(variant, windows[:4], reference, progress=False)
