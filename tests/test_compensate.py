"""Least-squares compensation: the refit is the least-squares solution, it lowers the MLP output
error and the KL to the dense model, reloads from its export, is rebuilt identically from a
stored run, and bad settings are clear errors that write nothing."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny, run_cli

from core.data.text import calibration_windows, evaluation_windows
from core.errors import PruneConfigError
from core.export.hf import save_pruned
from core.measure.evaluate import evaluate
from core.methods.oneshot import CompensationOptions, apply_compensation, prune_with_scores, score_model
from core.models.adapters import mlp_handles
from core.models.slicing import prune_mlp_neurons
from core.prune.compensate import activation_grams, compensate_pruned, compensated_down


def down_inputs(model, windows) -> list[torch.Tensor]:
    """(n_tokens, d_ff) activations at every down_proj input."""
    seen: list[list[torch.Tensor]] = [[] for _ in mlp_handles(model)]
    hooks = [h.down.register_forward_pre_hook(lambda _m, args, i=h.index: seen[i].append(args[0].reshape(-1, args[0].shape[-1])))
             for h in mlp_handles(model)]
    with torch.no_grad():
        model(input_ids=windows)
    for hook in hooks:
        hook.remove()
    return [torch.cat(s).double() for s in seen]


def test_refit_is_the_least_squares_solution_and_beats_plain_slicing():
    model = make_tiny("llama", intermediate_size=32)
    windows = torch.randint(0, 1000, (8, 32))  # 256 tokens ≫ 32 neurons: G has full rank
    grams, tokens = activation_grams(model, windows, batch_size=3, progress=False)
    acts = down_inputs(model, windows)
    assert tokens == 256
    assert torch.allclose(grams[0], acts[0].T @ acts[0], rtol=1e-4, atol=1e-6)
    kept = torch.arange(0, 32, 2)
    weight = mlp_handles(model)[0].down.weight.detach()
    target = acts[0] @ weight.double().T  # (n, H) dense MLP output
    refit = compensated_down(weight, grams[0], kept, damping=1e-9)
    expected = torch.linalg.lstsq(acts[0][:, kept], target).solution.T  # (H, k)
    assert refit.shape == (weight.shape[0], 16) and refit.dtype == weight.dtype
    assert torch.allclose(refit.double(), expected, rtol=1e-3, atol=1e-5)
    plain_err = (target - acts[0][:, kept] @ weight[:, kept].double().T).pow(2).sum()
    refit_err = (target - acts[0][:, kept] @ refit.double().T).pow(2).sum()
    assert refit_err < 0.9 * plain_err
    # more damping pulls the refit back toward the plain slice
    heavy = compensated_down(weight, grams[0], kept, damping=1e6)
    assert torch.allclose(heavy, weight[:, kept], atol=1e-4)
    # keeping every neuron changes nothing
    assert torch.equal(compensated_down(weight, grams[0], torch.arange(32), 0.1), weight)


def test_prune_with_compensation_reloads_and_rebuilds_identically(tiny_loaded, tmp_path):
    loaded = tiny_loaded("qwen3", intermediate_size=64)
    result = score_model(loaded, "entropy", samples=2, seq_len=16, progress=False)
    options = CompensationOptions("lsq", samples=6, seq_len=32, damping=0.1)
    plain = prune_with_scores(loaded, result, 0.5, progress=False, compensation=CompensationOptions("none"))
    refit = prune_with_scores(loaded, result, 0.5, progress=False, compensation=options)
    assert refit.widths == plain.widths == [32, 32]
    assert refit.meta["compensation"] == options.to_dict() and plain.meta["compensation"] == {"method": "none"}
    for p, r in zip(mlp_handles(plain.model), mlp_handles(refit.model)):
        assert torch.equal(p.gate.weight, r.gate.weight) and torch.equal(p.up.weight, r.up.weight)
        assert not torch.allclose(p.down.weight, r.down.weight)
    # a stored run keeps only kept indices + meta: the refit is rebuilt exactly
    rebuilt = apply_compensation(loaded, prune_mlp_neurons(loaded.model, refit.kept), refit.kept, refit.meta,
                                 progress=False)
    for a, b in zip(mlp_handles(rebuilt), mlp_handles(refit.model)):
        assert torch.equal(a.down.weight, b.down.weight)
    ids = torch.randint(0, 1000, (2, 16))
    folder = save_pruned(refit.model, loaded.tokenizer, tmp_path / "lsq", refit.meta, mode="hf-native")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, refit.model(ids).logits, atol=1e-5)
    assert json.loads((folder / "pruning_meta.json").read_text())["compensation"]["method"] == "lsq"


def test_bad_compensation_settings_are_clear_errors(tiny_loaded):
    loaded = tiny_loaded("llama", intermediate_size=32)
    result = score_model(loaded, "magnitude", samples=1, seq_len=16, progress=False)
    with pytest.raises(PruneConfigError, match="damping must be a positive number"):
        prune_with_scores(loaded, result, 0.5, compensation=CompensationOptions("lsq", damping=0.0))
    with pytest.raises(PruneConfigError, match="Unknown compensation 'obs'"):
        prune_with_scores(loaded, result, 0.5, compensation=CompensationOptions("obs"))
    pruned = prune_mlp_neurons(loaded.model, [torch.arange(16)] * 2)
    grams, _ = activation_grams(loaded.model, torch.randint(0, 1000, (1, 16)), progress=False)
    with pytest.raises(PruneConfigError, match="do not match"):
        compensate_pruned(pruned, loaded.model, [torch.arange(8)] * 2, grams)


def test_cli_prune_with_compensation(tmp_path, real_tokenizer):
    folder = tmp_path / "tiny"
    make_tiny("gemma3_text", intermediate_size=64).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    cli = run_cli
    base = ["prune", "--model", str(folder), "--ratio", "0.25", "--samples", "2", "--seq-len", "16"]
    done = cli(*base, "--compensate", "lsq", "--compensate-samples", "4", "--compensate-seq-len", "16",
               "--out", str(tmp_path / "ok"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["compensation"] == "lsq"
    meta = json.loads((tmp_path / "ok" / "pruning_meta.json").read_text())
    assert meta["compensation"] == {"method": "lsq", "samples": 4, "seq_len": 16, "damping": 0.1}
    bad = cli(*base, "--compensate", "lsq", "--compensate-damping", "0", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "damping must be a positive number" in bad.stderr
    short = cli(*base, "--compensate", "lsq", "--compensate-samples", "100000", "--out", str(tmp_path / "short"))
    assert short.returncode != 0 and "were asked for" in short.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "short").exists()


@pytest.mark.real
def test_compensation_lowers_kl_to_dense_on_the_real_model(real):
    """Uniform entropy pruning at 30% on SmolLM2-135M, with and without the refit."""
    result = score_model(real, "entropy", samples=8, seq_len=64, progress=False)
    options = CompensationOptions("lsq", samples=48, seq_len=96, damping=0.1)
    windows = evaluation_windows(real.tokenizer, "wiki", 4, 64)
    kl = {}
    for label, compensation in (("plain", CompensationOptions("none")), ("lsq", options)):
        pruned = prune_with_scores(real, result, 0.3, progress=False, compensation=compensation)
        kl[label] = evaluate(pruned.model, windows, real.model, progress=False).kl_to_reference
    assert kl["lsq"] < 0.92 * kl["plain"], kl
    assert calibration_windows(real.tokenizer, "wiki", 48, 96).shape == (48, 96)
