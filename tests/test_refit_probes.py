"""The adaptive search that probes with the least-squares refit applied (opt-in): a probe measures exactly the
cut-and-refitted layer, leaves the dense weights as they were, and prune_with_scores computes the refit's
statistics once (the search's are reused by the refit) and records whether it probed this way."""
from __future__ import annotations

import torch

from conftest import make_tiny

from core.measure.evaluate import Reference, evaluate
from core.methods import oneshot
from core.methods.oneshot import CompensationOptions, ScoreResult, preview_widths, prune_with_scores
from core.models.adapters import mlp_handles
from core.models.slicing import prune_mlp_neurons
from core.prune.adaptive import MaskedEvaluator, RefitMaskedEvaluator
from core.prune.allocate import AllocationOptions
from core.prune.compensate import activation_grams, compensate_pruned
from core.studies.sweep import FidelitySweep

WINDOWS = torch.randint(0, 1000, (6, 24), generator=torch.Generator().manual_seed(3))


def test_a_refit_probe_measures_the_cut_and_refitted_layer_and_restores_the_weights():
    model = make_tiny("llama", intermediate_size=48, layers=3)
    dense_downs = [h.down.weight.detach().clone() for h in mlp_handles(model)]
    scores = [torch.rand(48, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    grams, _ = activation_grams(model, WINDOWS, progress=False)
    refit = RefitMaskedEvaluator(model, WINDOWS, scores, grams, 0.05)
    plain = MaskedEvaluator(model, WINDOWS, scores)
    layer, keep = 1, 20
    for ev in (refit, plain):
        ev.masks[layer] = ev.width_mask(layer, keep)
    probed, masked = refit.value(start=layer), plain.value(start=layer)

    # the same cut as a real model: layer 1 keeps its top 20, the others all 48, then the lsq refit
    kept = [torch.arange(48), torch.argsort(scores[1], descending=True)[:keep].sort().values, torch.arange(48)]
    cut = compensate_pruned(prune_mlp_neurons(model, kept), model, kept, grams, 0.05)
    expected = evaluate(cut, WINDOWS, Reference(model, WINDOWS), progress=False).kl_to_reference
    assert abs(probed - expected) < 1e-4 * max(1.0, expected)
    assert probed < masked  # the refit wins back part of what the mask loses, on its own windows
    for h, w in zip(mlp_handles(model), dense_downs):  # every probe gives the dense weights back
        assert torch.equal(h.down.weight, w)


def test_prune_computes_the_refit_statistics_once_and_records_refit_probes(tiny_loaded, monkeypatch):
    loaded = tiny_loaded("llama", intermediate_size=48, layers=3)
    scores = ScoreResult([torch.rand(48, generator=torch.Generator().manual_seed(i)) for i in range(3)],
                         {"criterion": "random", "source": "wiki", "samples": 4, "seq_len": 32, "seed": 0}, 0.0)
    calls: list[int] = []
    real = oneshot.activation_grams

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(oneshot, "activation_grams", counting)
    options = AllocationOptions(halvings=2, heldout_samples=2, heldout_seq_len=16, refit_probes=True)
    lsq = CompensationOptions("lsq", samples=4, seq_len=32)
    result = prune_with_scores(loaded, scores, 0.3, allocation="adaptive", options=options, compensation=lsq,
                               progress=False)
    assert len(calls) == 1  # the search's statistics are the refit's
    assert result.meta["adaptive"]["refit_probes"] is True
    assert abs(result.meta["achieved_ratio"] - 0.3) < 0.02

    calls.clear()  # off (the default), or with no refit to come: a plain masked search, no statistics before it
    off = prune_with_scores(loaded, scores, 0.3, allocation="adaptive", compensation=lsq, progress=False,
                            options=AllocationOptions(halvings=2, heldout_samples=2, heldout_seq_len=16))
    assert off.meta["adaptive"]["refit_probes"] is False and len(calls) == 1
    calls.clear()
    plan = preview_widths(loaded, 0.3, "adaptive", scores=scores, options=options, progress=False,
                          compensation=CompensationOptions("none"))
    assert plan.refit_grams is None and not calls


def test_the_sweeps_adaptive_lsq_rows_search_with_refit_probes_unless_switched_off(tiny_loaded):
    loaded = tiny_loaded("llama", intermediate_size=48, layers=3)
    scores = ScoreResult([torch.rand(48, generator=torch.Generator().manual_seed(i)) for i in range(3)],
                         {"criterion": "random", "source": "wiki", "samples": 4, "seq_len": 32, "seed": 0}, 0.0)
    knobs = dict(halvings=2, heldout_samples=2, heldout_seq_len=16)
    lsq = CompensationOptions("lsq", samples=4, seq_len=32)
    for probes in (True, False):
        sweep = FidelitySweep(loaded, WINDOWS[:2], options=AllocationOptions(**knobs, refit_probes=probes),
                              compensation=lsq, progress=False)
        plain, refit = list(sweep.rows({"random": scores}, ["adaptive", "adaptive+lsq"], [0.3]))
        assert sorted(sweep._evaluators) == ([False, True] if probes else [False])
        assert isinstance(sweep._evaluators.get(True, (None, None))[1], RefitMaskedEvaluator) == probes
        assert "compensate_s" in refit and refit["kl_to_dense"] < plain["kl_to_dense"]
