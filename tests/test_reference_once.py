"""The dense reference, once: the adaptive search's fidelity and the training loop's held-out KL are the
numbers of the one ``core.models.reference.Reference`` (as ``evaluate`` reports them), and its byte
budget bounds what it keeps without changing any number."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny

from core import metrics
from core.importance.stats import top_k_indices
from core.measure.evaluate import Reference as MeasureReference
from core.measure.evaluate import evaluate, evaluate_reference
from core.models import forward
from core.models.forward import base_forward
from core.models.reference import Reference
from core.models.slicing import pruned_view
from core.prune.adaptive import MaskedEvaluator
from core.train.loop import LogitDistillation, ParamSet, TrainOptions, train


def _setup(arch: str = "llama"):
    """(dense, per-layer scores, the dense model with each layer's top half kept, windows (5, 16))."""
    dense = make_tiny(arch)
    layers, width = dense.config.num_hidden_layers, dense.config.intermediate_size
    gen = torch.Generator().manual_seed(3)
    scores = [torch.rand(width, generator=gen) for _ in range(layers)]
    variant = pruned_view(dense, top_k_indices(scores, [width // 2] * layers))
    windows = torch.randint(0, dense.config.vocab_size, (5, 16), generator=gen)
    return dense, scores, variant, windows


def _batch_bytes(model, batch: int, seq_len: int) -> int:
    return batch * seq_len * model.config.vocab_size * 4


def test_one_reference_home_and_one_chunking_function():
    assert MeasureReference is Reference  # the old import path gives the one class
    for vocab in (1000, 49152, 262144):
        assert forward.chunk_rows(vocab) == metrics.rows_per_chunk(vocab, forward.LOGIT_CHUNK_BYTES)
        assert [s.stop - s.start for s in metrics.row_chunks(100, vocab)][0] == min(100, metrics.rows_per_chunk(vocab))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # gemma: the LM head's soft-capping
def test_hidden_states_reference_equals_the_models_own_logits(arch):
    dense, _scores, _variant, windows = _setup(arch)
    plain = Reference(dense, windows, 2)
    split = Reference(dense, windows, 2, hidden_states=lambda ids: base_forward(dense, ids))
    for index in range(len(plain)):
        a, b = plain.batch(index), split.batch(index)
        assert torch.allclose(a.logp, b.logp, atol=1e-5) and torch.equal(a.argmax, b.argmax)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_adaptive_evaluator_numbers_are_the_references(arch):
    dense, scores, variant, windows = _setup(arch)
    layers, width = dense.config.num_hidden_layers, dense.config.intermediate_size
    reference = Reference(dense, windows, 2)
    expected = evaluate(variant, windows, reference, batch_size=2, progress=False)
    dense_metrics = evaluate_reference(reference, progress=False)

    kl = MaskedEvaluator(dense, windows, scores, "kl", batch_size=2)
    kl.masks = [kl.width_mask(i, width // 2) for i in range(layers)]
    assert kl.dense_value == 0.0
    assert kl.value() == pytest.approx(expected.kl_to_reference, rel=1e-4, abs=1e-7)
    assert kl.reference.cached_bytes == _batch_bytes(dense, 5, 16)  # every dense batch kept: 2 + 2 + 1 windows

    ent = MaskedEvaluator(dense, windows, scores, "entropy", batch_size=2)
    assert ent.dense_value == pytest.approx(dense_metrics.entropy, rel=1e-6)
    ent.masks = [ent.width_mask(i, width // 2) for i in range(layers)]
    assert ent.value() == pytest.approx(expected.entropy, rel=1e-6)
    assert ent.reference.cached_bytes == 0  # entropy keeps nothing of the dense pass

    # the search's restart at a later layer (earlier blocks from their cached inputs) gives the same number
    kl.masks = [None] * layers
    kl.masks[layers - 1] = kl.width_mask(layers - 1, width // 3)
    assert kl.value(start=layers - 1) == pytest.approx(kl.value(start=0), rel=1e-6)


def test_adaptive_evaluator_within_a_small_budget_gives_the_same_numbers():
    """Dense batches beyond the budget are recomputed — outside the masks, so the numbers do not move."""
    dense, scores, _variant, windows = _setup()
    layers, width = dense.config.num_hidden_layers, dense.config.intermediate_size
    values = []
    for budget in (1 << 30, _batch_bytes(dense, 2, 16), 0):
        ev = MaskedEvaluator(dense, windows, scores, "kl", batch_size=2, budget_bytes=budget)
        assert ev.reference.cached_bytes <= budget
        ev.masks[1] = ev.width_mask(1, width // 4)
        row = [ev.value(start=1), ev.value(start=0)]
        ev.masks = [ev.width_mask(i, width // 2) for i in range(layers)]
        values.append([*row, ev.value()])
    assert values[0] == values[1] == values[2]


def test_training_heldout_is_the_references_kl():
    dense, scores, variant, windows = _setup()
    expected = evaluate(variant, windows, Reference(dense, windows, 2), batch_size=2, progress=False).kl_to_reference
    objective = LogitDistillation()
    calls = []
    handle = dense.model.register_forward_hook(lambda *_: calls.append(1))  # the teacher's decoder stack
    try:
        first = objective.heldout(variant, dense, windows, 2, None)
        again = objective.heldout(variant, dense, windows, 2, None)
    finally:
        handle.remove()
    assert first == pytest.approx(expected, rel=1e-5, abs=1e-8) and again == first
    assert len(calls) == 3  # three batches, run once: the second evaluation reuses the cached log-probs
    assert isinstance(objective._reference, Reference)
    assert objective._reference.cached_bytes <= LogitDistillation.heldout_budget_bytes

    small = LogitDistillation()
    small.heldout_budget_bytes = 0  # nothing kept: the teacher runs again, the number is the same
    assert small.heldout(variant, dense, windows, 2, None) == first and small._reference.cached_bytes == 0

    # inside train(): the step-0 held-out value is the same number
    params = ParamSet("mlp", [(n, p) for n, p in variant.named_parameters() if "mlp" in n])
    data = torch.randint(0, dense.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(4))
    result = train(variant, dense, LogitDistillation(), data, params,
                   TrainOptions(steps=1, lr=1e-3, warmup_steps=0, batch_size=2, eval_every=1), heldout=windows)
    assert result.initial_heldout == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_the_budget_bounds_the_cached_bytes_and_changes_no_number():
    dense, _scores, variant, windows = _setup()
    one_batch = _batch_bytes(dense, 2, 16)
    full = Reference(dense, windows, 2, budget_bytes=1 << 30)
    for budget in (0, one_batch - 1, one_batch, one_batch + one_batch // 2, 3 * one_batch):
        reference = Reference(dense, windows, 2, budget_bytes=budget)
        for index in [*range(len(reference)), *range(len(reference))]:  # twice: cached batches are reused
            got, want = reference.batch(index), full.batch(index)
            assert torch.equal(got.logp, want.logp) and torch.equal(got.top10, want.top10)
            assert reference.cached_bytes <= budget
        kept = sum(b.nbytes for b in reference._cache.values())
        assert reference.cached_bytes == kept
        assert (budget >= one_batch // 2) == (kept > 0)  # the last batch holds one window, half a batch
        assert evaluate(variant, windows, reference, batch_size=2, progress=False) == \
            evaluate(variant, windows, full, batch_size=2, progress=False)
