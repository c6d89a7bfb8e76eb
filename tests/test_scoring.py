"""Taylor scoring: matches a brute-force autograd computation, needs no weight gradients."""
import pytest
import torch
import torch.nn.functional as F

from conftest import ARCHS, make_tiny

from core.errors import HFPruneError
from core.importance.criteria import REGISTRY, ScoreOptions, get_criterion
from core.models.adapters import mlp_handles


def brute_force(model, windows, loss_fn, aggregate="sum_abs"):
    """Σ_samples Σ_t |a·∂L/∂a| with L computed per sample on full logits, via retain_grad."""
    totals = [torch.zeros(h.width) for h in mlp_handles(model)]
    for sample in windows:
        captured = []
        hooks = [h.down.register_forward_pre_hook(lambda m, args: (args[0].retain_grad(), captured.append(args[0])) and None)
                 for h in mlp_handles(model)]
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=sample[None]).logits.float()[0]  # (T, V)
        loss_fn(logits, sample).backward()
        for h in hooks:
            h.remove()
        for layer, a in enumerate(captured):
            prod = (a * a.grad)[0]  # (T, d_ff)
            per_t = prod.sum(0)  # (d_ff,) Σ_t a·g of this window
            totals[layer] += {"sum_abs": prod.abs().sum(0), "abs_sum": per_t.abs(), "sq_sum": per_t.pow(2)}[aggregate]
    if aggregate == "abs_sum":
        totals = [t / len(windows) for t in totals]
    return totals


def entropy_loss(logits, sample):
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1).mean()


def ce_loss(logits, sample):
    return F.cross_entropy(logits[:-1], sample[1:])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,loss_fn", [("entropy", entropy_loss), ("cross_entropy", ce_loss)])
def test_taylor_matches_brute_force(arch, name, loss_fn):
    model = make_tiny(arch)
    windows = torch.randint(0, 49152, (5, 12), generator=torch.Generator().manual_seed(1))
    expected = brute_force(model, windows, loss_fn)
    got = get_criterion(name)(model, windows, ScoreOptions(batch_size=2, progress=False))
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=2e-4, atol=1e-9)
        assert g.abs().sum() > 0


def test_amp_aggregate_matches_brute_force():
    from core.importance.taylor import taylor_scores

    model = make_tiny("llama")
    windows = torch.randint(0, 49152, (3, 10), generator=torch.Generator().manual_seed(2))
    expected = brute_force(model, windows, entropy_loss, aggregate="abs_sum")
    got = taylor_scores(model, windows, get_criterion("entropy"), batch_size=3, aggregate="abs_sum", progress=False)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=2e-4, atol=1e-9)


def test_no_weight_gradients_and_flags_restored():
    model = make_tiny("qwen2")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a user-frozen weight stays frozen
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    get_criterion("entropy")(model, torch.randint(0, 49152, (2, 8)), ScoreOptions(progress=False))
    assert all(p.grad is None for p in model.parameters())
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}


def test_batch_size_does_not_change_scores():
    model = make_tiny("llama")
    windows = torch.randint(0, 49152, (6, 8), generator=torch.Generator().manual_seed(3))
    one = get_criterion("entropy")(model, windows, ScoreOptions(batch_size=1, progress=False))
    six = get_criterion("entropy")(model, windows, ScoreOptions(batch_size=6, progress=False))
    for a, b in zip(one, six):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10)


def test_chunked_vocab_loss_matches_unchunked(monkeypatch):
    import core.models.forward as forward

    model = make_tiny("llama")
    windows = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(4))
    full = get_criterion("entropy")(model, windows, ScoreOptions(progress=False))
    monkeypatch.setattr(forward, "LOGIT_CHUNK_BYTES", 49152 * 4 * 5)  # 16-row floor → several chunks
    chunked = get_criterion("entropy")(model, windows, ScoreOptions(progress=False))
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10)


def test_gradient_free_criteria_shapes_and_values():
    model = make_tiny("mistral", intermediate_size=48)
    windows = torch.randint(0, 49152, (3, 8))
    for name in REGISTRY:
        scores = get_criterion(name)(model, windows, ScoreOptions(progress=False))
        assert [s.shape for s in scores] == [torch.Size([48])] * 2
        assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores)
    h = mlp_handles(model)[1]
    expected = h.gate.weight.norm(dim=1) + h.up.weight.norm(dim=1) + h.down.weight.norm(dim=0)
    torch.testing.assert_close(get_criterion("magnitude")(model, windows, ScoreOptions())[1], expected)
    r1 = get_criterion("random")(model, windows, ScoreOptions(seed=5))
    r2 = get_criterion("random")(model, windows, ScoreOptions(seed=5))
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))


def _down_inputs(model, windows) -> torch.Tensor:
    """All calibration activations a at layer 0's down_proj input: (tokens, d_ff)."""
    captured = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=windows)
    hook.remove()
    return captured[0].reshape(-1, captured[0].shape[-1])


def test_wanda_and_fluctuation_match_their_definitions():
    model = make_tiny("llama")
    windows = torch.randint(0, 49152, (2, 8), generator=torch.Generator().manual_seed(4))
    a = _down_inputs(model, windows)
    w_down = model.model.layers[0].mlp.down_proj.weight  # (hidden, d_ff)
    wanda = get_criterion("wanda")(model, windows, ScoreOptions(batch_size=1, progress=False))[0]
    torch.testing.assert_close(wanda, w_down.abs().mean(0) * a.norm(dim=0), rtol=1e-4, atol=1e-8)
    fluctuation = get_criterion("fluctuation")(model, windows, ScoreOptions(batch_size=1, progress=False))[0]
    expected = a.var(dim=0, unbiased=False) * w_down.pow(2).sum(0)  # FLAP: Var(a_j) · ‖W_down[:, j]‖²
    torch.testing.assert_close(fluctuation, expected, rtol=1e-3, atol=1e-7)


def test_unknown_criterion_lists_valid_names():
    with pytest.raises(HFPruneError, match="Unknown criterion 'nope'.*entropy"):
        get_criterion("nope")


def test_hand_written_losses_match_autograd():
    """The criteria's fused entropy / CE (one (R, V) tensor kept for backward) equal the textbook forms."""
    from core.importance.criteria import cross_entropy, entropy, entropy_ce

    gen = torch.Generator().manual_seed(3)
    z = torch.randn(6, 40, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([3, -100, 39, 0, 7, -100])
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets), (z,))
    assert torch.autograd.gradcheck(entropy, (z,))
    expected = F.cross_entropy(z, targets.clamp_min(0), reduction="none") * (targets >= 0)
    torch.testing.assert_close(cross_entropy(z, targets), expected)
    logp = F.log_softmax(z, -1)
    torch.testing.assert_close(entropy(z), -(logp.exp() * logp).sum(-1))
    for w in (0.0, 0.3, 1.0):  # the fused mix equals the weighted sum of its parts, gradients included
        assert torch.autograd.gradcheck(lambda x: entropy_ce(x, targets, w), (z,))
        torch.testing.assert_close(entropy_ce(z, targets, w), w * entropy(z) + (1 - w) * expected)


def test_fisher_square_of_window_sums_matches_brute_force_in_batches():
    """Fisher's sq_sum = Σ_windows (Σ_t a·g)², computed batched; checked with the labels fixed to the
    real next tokens so a brute-force pass can reproduce the same loss."""
    from core.importance.criteria import FisherCriterion, cross_entropy

    class FixedLabels(FisherCriterion):
        def token_loss(self, logits, targets, teacher):
            return cross_entropy(logits, targets)

    model = make_tiny("qwen2")
    windows = torch.randint(0, 49152, (5, 12), generator=torch.Generator().manual_seed(2))
    T = windows.shape[1]
    expected = brute_force(model, windows, lambda z, x: F.cross_entropy(z[:-1], x[1:], reduction="sum") / T,
                           aggregate="sq_sum")
    for batch_size in (1, 2, 5):
        got = FixedLabels()(model, windows, ScoreOptions(batch_size=batch_size, progress=False))
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=2e-4, atol=1e-12)
