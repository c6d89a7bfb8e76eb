"""The ``obs`` criterion: greedy structured OBS on a (gradient-weighted) down_proj-input Gram."""
import itertools

import pytest
import torch

from conftest import make_tiny, run_cli

from core.errors import HFPruneError
from core.importance.criteria import EntropyCriterion, ScoreOptions, get_criterion
from core.importance.criteria import entropy as entropy_rows
from core.importance.obs import obs_removal_scores, weighted_grams
from core.importance.stats import top_k_indices

WINDOWS = torch.randint(0, 49152, (3, 12), generator=torch.Generator().manual_seed(5))


def _problem(d: int, seed: int, correlated: bool):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(60, d, generator=g, dtype=torch.float64)
    if correlated:
        a = a @ torch.randn(d, d, generator=g, dtype=torch.float64)
    else:
        a = a * torch.rand(d, generator=g, dtype=torch.float64).mul(3).add(0.2)  # independent, unequal scales
    weight = torch.randn(5, d, generator=g, dtype=torch.float64)
    return weight, a.T @ a


def _error(weight: torch.Tensor, h_damped: torch.Tensor, kept: tuple[int, ...]) -> float:
    """Brute force: the least-squares error of rebuilding W a from the kept neurons, tr(W_R [H⁻¹]_RR⁻¹ W_Rᵀ)."""
    removed = [j for j in range(weight.shape[1]) if j not in kept]
    h_inv = torch.linalg.inv(h_damped)
    w_r = weight[:, removed]
    return float((w_r @ torch.linalg.solve(h_inv[removed][:, removed], w_r.T)).trace())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_selects_what_brute_force_selects(seed):
    d, damping = 7, 0.01
    # uncorrelated activations: the error is additive over neurons, so the greedy is exact at every width
    weight, gram = _problem(d, seed, correlated=False)
    h = gram + damping * gram.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    scores = obs_removal_scores(weight, gram, damping, block=1)
    for k in range(1, d):
        best = min(itertools.combinations(range(d), k), key=lambda kept: _error(weight, h, kept))
        assert tuple(top_k_indices([scores], [k])[0].tolist()) == best
    # correlated activations: the first removals match brute force, and each score is the exact joint error
    weight, gram = _problem(d, seed, correlated=True)
    h = gram + damping * gram.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    for block in (1, 2):
        scores = obs_removal_scores(weight, gram, damping, block=block)
        best = min(itertools.combinations(range(d), d - 1), key=lambda kept: _error(weight, h, kept))
        assert tuple(top_k_indices([scores], [d - 1])[0].tolist()) == best
        for k in range(block if block > 1 else 1, d, block):  # block boundaries: the cumulative error
            kept = tuple(top_k_indices([scores], [d - k])[0].tolist())
            removed_score = float(scores[[j for j in range(d) if j not in kept]].max())
            assert removed_score == pytest.approx(_error(weight, h, kept), rel=1e-4)
    assert len(set(scores.tolist())) == d  # no ties: every width has one kept set


def test_token_weights_are_gradient_norms_shaped_per_token():
    model = make_tiny("llama", intermediate_size=24)
    stats = weighted_grams(model, WINDOWS, EntropyCriterion(), power=1.0, batch_size=2, progress=False,
                           keep_weights=True)
    tokens = WINDOWS.numel()
    assert stats.tokens == tokens and len(stats.weights) == 2
    for w, gram in zip(stats.weights, stats.grams):
        assert w.shape == (tokens,) and float(w.min()) >= 0 and float(w.max()) > 0
        assert gram.shape == (24, 24) and torch.allclose(gram, gram.T)
    # the Gram is Σ_t w_t a_t a_tᵀ with a the down_proj input of the same tokens
    captured = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        for batch in WINDOWS.split(2):
            model(input_ids=batch)
    hook.remove()
    a = torch.cat([c.reshape(-1, 24) for c in captured]).double()
    w = stats.weights[1].double()
    torch.testing.assert_close(stats.grams[1], (a * w[:, None]).T @ a, rtol=1e-4, atol=1e-8)
    # w_t = ‖∂L/∂y_t‖ with L = Σ_windows mean_t entropy_t and y the layer's down_proj output (autograd)
    outputs = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, args, out: outputs.append(out) or out.retain_grad())
    norms = []
    for batch in WINDOWS.split(2):
        outputs.clear()
        logits = model(input_ids=batch).logits.float()
        (entropy_rows(logits.reshape(-1, logits.shape[-1])).sum() / batch.shape[1]).backward()
        norms.append(outputs[0].grad.norm(dim=-1).reshape(-1))
    hook.remove()
    torch.testing.assert_close(w.float(), torch.cat(norms), rtol=1e-3, atol=1e-9)
    # power 2 squares the same per-token norms
    squared = weighted_grams(model, WINDOWS, EntropyCriterion(), power=2.0, batch_size=2, progress=False,
                             keep_weights=True)
    torch.testing.assert_close(squared.weights[1], w.float().pow(2), rtol=1e-4, atol=1e-12)
    # the same backward gives the entropy criterion's own Taylor scores
    plain = get_criterion("entropy")(model, WINDOWS, ScoreOptions(batch_size=2, progress=False))
    for got, want in zip(stats.taylor, plain):
        torch.testing.assert_close(got, want)


def test_unweighted_obs_is_forward_only_and_weighting_changes_the_order():
    model = make_tiny("llama", intermediate_size=24)
    options = ScoreOptions(batch_size=2, progress=False)
    plain = get_criterion("obs", weighting="none")
    assert plain.cost == "forward" and get_criterion("obs").cost == "forward+backward"
    unweighted = plain(model, WINDOWS, options)
    power0 = get_criterion("obs", power=0.0)(model, WINDOWS, options)
    weighted = get_criterion("obs")(model, WINDOWS, options)
    for u, p in zip(unweighted, power0):
        assert u.shape == (24,) and torch.equal(u.argsort(), p.argsort())
        assert float(u.min()) >= 0 and len(set(u.tolist())) == 24
    assert any(not torch.equal(u.argsort(), w.argsort()) for u, w in zip(unweighted, weighted))


def test_obs_options_are_one_sentence():
    with pytest.raises(HFPruneError, match=r"^obs damping must be > 0, got 0.0\.$"):
        get_criterion("obs", damping=0.0)
    with pytest.raises(HFPruneError, match=r"^obs weighting must be one of entropy, cross_entropy, none"):
        get_criterion("obs", weighting="kl")
    result = run_cli("score", "--model", "smollm2-135m", "--criterion", "entropy", "--obs-block", "8",
                     "--out", "/tmp/never.safetensors")
    assert result.returncode != 0 and "--obs-block does not apply to the 'entropy' criterion" in result.stderr
