"""The ``region`` compensation: each pruned MLP fitted layer by layer to the dense MLP's output on the
pruned model's own inputs (core.prune.region)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny, run_cli

from core.data.text import calibration_windows
from core.errors import PruneConfigError, Stopped
from core.measure.evaluate import evaluate
from core.methods.oneshot import CompensationOptions, apply_compensation, prune_with_scores, score_model
from core.models.adapters import decoder_layers, mlp_handles
from core.models.forward import base_forward
from core.models.slicing import prune_mlp_neurons
from core.prune.region import _layer_inputs, _run_layer, reconstruct_regions

WINDOWS = torch.randint(0, 1000, (6, 16), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_layer_by_layer_propagation_is_the_models_own_forward(arch):
    """Running the captured layer calls one after another gives the stack's output (Gemma's sliding and
    global layers each get their own mask), so each MLP sees exactly what the pruned model feeds it."""
    model = make_tiny(arch, intermediate_size=24, layers=3)
    hidden, kwargs = _layer_inputs(model, WINDOWS, batch_size=4, stop=None)
    assert [h.shape for h in hidden] == [(4, 16, 32), (2, 16, 32)]
    for index, (layer, handle) in enumerate(zip(decoder_layers(model), mlp_handles(model))):
        hidden, x, _made = _run_layer(layer, handle.mlp, hidden, [kw[index] for kw in kwargs])
        assert x.shape == (6 * 16, 32)
    with torch.no_grad():
        want = base_forward(model, WINDOWS)
        got = torch.cat([model.model.norm(h) for h in hidden])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _pruned(arch: str = "llama"):
    dense = make_tiny(arch, intermediate_size=32, layers=2)
    kept = [torch.arange(0, 32, 2), torch.arange(1, 32, 2)]
    return dense, prune_mlp_neurons(dense, kept)


def test_reconstruction_lowers_the_error_it_optimises_and_the_kl():
    dense, pruned = _pruned()
    before = evaluate(pruned, WINDOWS, dense, progress=False).kl_to_reference
    closed = reconstruct_regions(pruned, dense, WINDOWS, steps=0, damping=1e-3, holdout=0, progress=False)
    assert len(closed.start) == len(closed.end) == 2 and closed.tokens == 96
    assert all(r < 0.9 * s for s, r in zip(closed.start, closed.refit))  # the closed-form down refit
    assert closed.end == closed.refit
    trained = reconstruct_regions(pruned, dense, WINDOWS, steps=40, lr=3e-3, batch_tokens=64, refit=False,
                                  holdout=0, progress=False)
    assert all(e < s for s, e in zip(trained.start, trained.end))  # Adam on gate/up/down lowers it further
    after = evaluate(pruned, WINDOWS, dense, progress=False).kl_to_reference
    assert after < 0.8 * before, (before, after)
    # a step that would raise the error is not kept: an absurd learning rate leaves the weights as they were
    saved = [h.down.weight.clone() for h in mlp_handles(pruned)]
    wild = reconstruct_regions(pruned, dense, WINDOWS, steps=3, lr=10.0, refit=False, holdout=0, progress=False)
    assert wild.end == wild.start and all(torch.equal(s, h.down.weight) for s, h in zip(saved, mlp_handles(pruned)))


def test_reconstruction_obeys_stop():
    dense, pruned = _pruned()
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 5  # after a few checks: inside the first layer's Adam steps

    with pytest.raises(Stopped, match="Region reconstruction was stopped"):
        reconstruct_regions(pruned, dense, WINDOWS, steps=50, progress=False, stop=stop)
    assert len(calls) == 6


def test_region_compensation_through_prune_records_and_rebuilds(tiny_loaded):
    loaded = tiny_loaded("qwen3", intermediate_size=64)
    result = score_model(loaded, "entropy", samples=2, seq_len=16, progress=False)
    lsq = CompensationOptions("lsq", samples=6, seq_len=32)
    region = CompensationOptions("region", samples=6, seq_len=32, region_samples=16, region_steps=5, region_batch=64)
    assert "region_steps" not in lsq.to_dict() and region.to_dict()["region_steps"] == 5
    a = prune_with_scores(loaded, result, 0.5, progress=False, compensation=lsq)
    b = prune_with_scores(loaded, result, 0.5, progress=False, compensation=region)
    assert b.meta["compensation"] == region.to_dict() and b.meta["region"]["tokens"] == 16 * 32
    assert b.meta["region"]["mean_error_end"] <= b.meta["region"]["mean_error_start"]
    assert "region" not in a.meta
    windows = calibration_windows(loaded.tokenizer, "wiki", 16, 32, 0)  # the tokens it was fitted on
    kl = {name: evaluate(p.model, windows, loaded.model, progress=False).kl_to_reference for name, p in
          (("lsq", a), ("region", b))}
    assert kl["region"] < kl["lsq"], kl
    rebuilt = apply_compensation(loaded, prune_mlp_neurons(loaded.model, b.kept), b.kept, dict(b.meta), progress=False)
    for x, y in zip(mlp_handles(rebuilt), mlp_handles(b.model)):  # seeded: the same weights again
        torch.testing.assert_close(x.gate.weight, y.gate.weight)
        torch.testing.assert_close(x.down.weight, y.down.weight)


def test_bad_region_options_are_one_sentence(tmp_path, real_tokenizer):
    with pytest.raises(PruneConfigError, match=r"^region_lr \(--compensate-region-lr\) must be > 0, got 0.0\.$"):
        CompensationOptions("region", region_lr=0.0)
    with pytest.raises(PruneConfigError, match=r"^region_steps \(--compensate-region-steps\) must be ≥ 0"):
        CompensationOptions("region", region_steps=-1)
    folder = tmp_path / "tiny"
    make_tiny("llama", intermediate_size=32).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    base = ["prune", "--model", str(folder), "--ratio", "0.25", "--samples", "2", "--seq-len", "16",
            "--compensate", "region", "--compensate-samples", "2", "--compensate-seq-len", "16"]
    bad = run_cli(*base, "--compensate-region-batch", "0", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "region_batch (--compensate-region-batch) must be ≥ 1, got 0." in bad.stderr
    short = run_cli(*base, "--compensate-region-samples", "100000", "--out", str(tmp_path / "short"))
    assert short.returncode != 0 and "were asked for" in short.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "short").exists()
    done = run_cli(*base, "--compensate-region-samples", "2", "--compensate-region-steps", "2",
                   "--out", str(tmp_path / "ok"))
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "ok" / "pruning_meta.json").read_text())
    assert meta["compensation"]["method"] == "region" and meta["region"]["tokens"] == 32


def test_stream_target_corrects_the_residual_stream_and_stages_are_judged_on_held_out_windows():
    dense, pruned = _pruned()
    before = evaluate(pruned, WINDOWS, dense, progress=False).kl_to_reference
    # the errors are measured on the held-out windows: layer 0 sees the dense model's own inputs there
    x = []
    hook = dense.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: x.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        dense(input_ids=WINDOWS[3:])
        hook.remove()
        y = dense.model.layers[0].mlp(x[0])
        want = float((pruned.model.layers[0].mlp(x[0]) - y).pow(2).sum() / y.pow(2).sum())
    judged = reconstruct_regions(copy.deepcopy(pruned), dense, WINDOWS, steps=0, target="stream", holdout=0.5,
                                 progress=False)
    assert judged.start[0] == pytest.approx(want, rel=1e-4)  # at layer 0 both targets are the dense MLP
    stream = reconstruct_regions(pruned, dense, WINDOWS, steps=0, damping=1e-3, target="stream", holdout=0,
                                 progress=False)
    assert all(e < 0.9 * s for s, e in zip(stream.start, stream.end))
    assert evaluate(pruned, WINDOWS, dense, progress=False).kl_to_reference < 0.8 * before
    # Gemma normalises the MLP output before adding it: the fit goes through that norm (Adam steps only)
    gemma_dense, gemma = _pruned("gemma3_text")
    before = evaluate(gemma, WINDOWS, gemma_dense, progress=False).kl_to_reference
    through = reconstruct_regions(gemma, gemma_dense, WINDOWS, steps=30, lr=3e-3, batch_tokens=64, target="stream",
                                  holdout=0, progress=False)
    assert through.refit == through.start and all(e < s for s, e in zip(through.start, through.end))
    assert evaluate(gemma, WINDOWS, gemma_dense, progress=False).kl_to_reference < before


def test_the_dashboard_reaches_region_through_services(tiny_services):
    from hfprune_ui.services import prune_name

    services, session, folder = tiny_services
    knobs = {"samples": 4, "steps": 2, "target": "local"}
    seconds = services.prune_seconds(session, str(folder), session.data, "entropy", "uniform", compensate_windows=2)
    more = services.prune_seconds(session, str(folder), session.data, "entropy", "uniform", compensate_windows=2,
                                  region=knobs)
    assert more["refit"] > seconds["refit"] > 0
    variant, _ = services.prune(session, "entropy", 0.25, "uniform", 1, "", compensate_windows=2, region=knobs)
    assert variant.name == prune_name("entropy", 0.25, "uniform", "region") == "entropy-25%+region"
    assert variant.meta["compensation"]["method"] == "region" and variant.meta["compensation"]["region_steps"] == 2
    assert variant.meta["region"]["tokens"] == 4 * 16
    with pytest.raises(PruneConfigError, match="starts from the least-squares refit: turn the refit on too"):
        services.prune(session, "entropy", 0.25, "uniform", 1, "x", compensate_windows=0, region=knobs)
