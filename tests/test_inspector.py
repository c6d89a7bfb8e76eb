"""Neuron inspector and rank stability (issue 16) on tiny models: the single-neuron ablation is
exactly pruning that neuron, the contexts are the true top-k, identical draws agree perfectly, and
bad input is one sentence."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny
from conftest import run_cli as cli

from core.errors import HFPruneError, SelectionError
from core.models.adapters import mlp_handles
from core.models.slicing import prune_mlp_neurons
from core.studies.neuron import InspectOptions, ablate_neuron, inspect_neuron, neuron_at_rank
from core.studies.stability import StabilityOptions, agreement, compare_over_draws, score_draws


def windows(n: int = 3, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n, t), generator=torch.Generator().manual_seed(seed))


def without(model, layer: int, index: int):
    kept = [torch.arange(h.width) for h in mlp_handles(model)]
    kept[layer] = kept[layer][kept[layer] != index]
    return prune_mlp_neurons(model, kept)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_single_neuron_ablation_equals_pruning_that_neuron(arch):
    model, ids = make_tiny(arch), windows()
    pruned = without(model, 1, 5)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with ablate_neuron(model, 1, 5):
            ablated = model(input_ids=ids).logits
        reference = pruned(input_ids=ids).logits
    assert torch.allclose(ablated, reference, atol=1e-5, rtol=0)
    assert (ablated - dense).abs().max() > 1e-3  # the neuron mattered, so the check has teeth
    with torch.no_grad():  # the hook is gone after the block
        assert torch.equal(model(input_ids=ids).logits, dense)


def test_inspector_menus_and_kl_match_the_pruned_model(tiny_loaded):
    loaded, ids = tiny_loaded("llama"), windows()
    report = inspect_neuron(loaded, ids, 0, 7, options=InspectOptions(top_k=4, menu_k=3, batch_size=2))
    pruned = without(loaded.model, 0, 7)
    with torch.no_grad():
        dense = loaded.model(input_ids=ids).logits.log_softmax(-1)
        removed = pruned(input_ids=ids).logits.log_softmax(-1)
    assert len(report.contexts) == 4
    for ctx in report.contexts:
        p, q = dense[ctx.window, ctx.position], removed[ctx.window, ctx.position]
        assert ctx.kl == pytest.approx(float((p.exp() * (p - q)).sum()), abs=1e-5)
        for row in ctx.menu:
            assert row["p_before"] == pytest.approx(float(p[row["token_id"]].exp()), abs=1e-5)
            assert row["p_after"] == pytest.approx(float(q[row["token_id"]].exp()), abs=1e-5)
        assert {r["token_id"] for r in ctx.menu} >= set(p.topk(3).indices.tolist())
    assert report.kl_mean > 0


def test_top_contexts_are_the_true_top_k(tiny_loaded):
    loaded, ids = tiny_loaded("qwen2"), windows(4, 20, seed=1)
    layer, index, k = 1, 11, 6
    mlp = mlp_handles(loaded.model)[layer].mlp
    brute = []
    for w in range(ids.shape[0]):  # by hand: a = act(gate x) * up x on the MLP's input, token by token
        seen: list[torch.Tensor] = []
        handle = mlp.register_forward_hook(lambda _m, args, _out, seen=seen: seen.append(args[0][0]))
        with torch.no_grad():
            loaded.model(input_ids=ids[w:w + 1])
        handle.remove()
        x = seen[0]  # (T, H)
        with torch.no_grad():
            a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # (T, d_ff)
        brute += [(float(a[t, index]), w, t) for t in range(ids.shape[1])]
    expected = sorted(brute, key=lambda r: (-abs(r[0]), r[1], r[2]))[:k]
    report = inspect_neuron(loaded, ids, layer, index, options=InspectOptions(top_k=k, context=3))
    assert [(c.window, c.position) for c in report.contexts] == [(w, t) for _v, w, t in expected]
    for ctx, (value, _w, t) in zip(report.contexts, expected):
        assert ctx.activation == pytest.approx(value, abs=1e-5)
        assert ctx.activations[ctx.center] == pytest.approx(value, abs=1e-5)
        assert len(ctx.tokens) == len(ctx.activations) == min(t + 3, 19) - max(0, t - 3) + 1
    signed = inspect_neuron(loaded, ids, layer, index, options=InspectOptions(top_k=k, by="max"))
    assert [c.activation for c in signed.contexts] == sorted((v for v, _w, _t in brute), reverse=True)[:k]


def test_ranks_under_each_criterion(tiny_loaded):
    loaded = tiny_loaded("llama")
    scores = {"a": [torch.arange(64.0), torch.arange(64.0)], "b": [torch.arange(64.0).flip(0), torch.ones(64)]}
    report = inspect_neuron(loaded, windows(2, 16), 0, 63, scores=scores, options=InspectOptions(top_k=1))
    a, b = report.criteria
    assert (a.rank, a.percentile, a.score) == (1, 1.0, 63.0)
    assert (b.rank, b.percentile) == (64, 0.0)
    assert neuron_at_rank(scores["a"][0], 0.0) == 63 and neuron_at_rank(scores["a"][0], 1.0) == 0


@pytest.mark.parametrize("layer,index,message", [
    (2, 0, "Layer 2 does not exist: the model has 2 layers (0–1)."),
    (-1, 0, "Layer -1 does not exist"),
    (0, 64, "Neuron 64 does not exist in layer 0, whose MLP has 64 neurons (0–63)."),
])
def test_bad_neuron_is_one_sentence(tiny_loaded, layer, index, message):
    with pytest.raises(SelectionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inspect_neuron(tiny_loaded("llama"), windows(), layer, index)


def test_stability_on_identical_draws_is_perfect(tiny_loaded):
    loaded, ids = tiny_loaded("llama"), windows(2, 16)
    scores = score_draws(loaded, ["entropy", "wanda"], [ids, ids, ids])
    result = agreement(scores, [0.2, 0.5])
    for agree in result.within.values():
        assert agree.pairs == 3 and agree.rho == pytest.approx([1.0, 1.0]) and agree.mean_rho == pytest.approx(1.0)
        assert all(v == pytest.approx([1.0, 1.0]) for v in agree.overlap.values())
    across = result.across["entropy|wanda"]
    assert across.pairs == 3 and across.mean_rho < 0.999  # two criteria differ; identical draws do not
    assert {row["comparison"] for row in result.summary()} == {"entropy: draw vs draw", "wanda: draw vs draw",
                                                                "entropy vs wanda: same draw"}
    different = agreement(score_draws(loaded, ["entropy"], [ids, windows(2, 16, seed=5)]), [0.2])
    assert different.within["entropy"].mean_rho < 0.999


def test_stability_bad_input_is_one_sentence():
    with pytest.raises(SelectionError, match=r"draws \(--draws\) must be in \[2, 64\], got 1"):
        StabilityOptions(draws=1)
    one = [[torch.rand(8)]]
    with pytest.raises(SelectionError, match="at least 2 calibration draws, got 1"):
        agreement({"entropy": one})
    with pytest.raises(SelectionError, match="different MLP widths"):
        agreement({"entropy": [[torch.rand(8)], [torch.rand(9)]]})
    with pytest.raises(HFPruneError, match="Ratio"):
        agreement({"entropy": [[torch.rand(8)], [torch.rand(8)]]}, [1.5])


def test_compare_over_draws_spread():
    rows = [{"criterion": "a", "ratio": 0.2, "kl_mean": 1.0, "kl_std": 0.01, "kl_min": 0.99, "kl_max": 1.01,
             "kl_draws": [0.99, 1.0, 1.01]},
            {"criterion": "b", "ratio": 0.2, "kl_mean": 1.1, "kl_std": 0.01, "kl_min": 1.09, "kl_max": 1.11,
             "kl_draws": [1.09, 1.11, 1.10]}]
    [row] = compare_over_draws(rows, "a", "b")
    assert row["outside_spread"] and row["same_sign"] and row["difference"] == pytest.approx(-0.1)
    rows[1].update(kl_min=1.0, kl_draws=[1.0, 1.2, 1.1])
    assert not compare_over_draws(rows, "a", "b")[0]["outside_spread"]


def test_disjoint_draws(real_tokenizer):
    from core.data.text import calibration_windows, disjoint_calibration_windows
    from core.errors import DataError

    draws = disjoint_calibration_windows(real_tokenizer, "wiki", draws=3, samples=4, seq_len=32, seed=2)
    assert torch.equal(draws[0], calibration_windows(real_tokenizer, "wiki", 4, 32, seed=2))
    rows = {tuple(r) for d in draws for r in d.tolist()}
    assert len(rows) == 12  # no window in two draws
    with pytest.raises(DataError, match="disjoint draws"):
        disjoint_calibration_windows(real_tokenizer, "news", draws=64, samples=64, seq_len=128)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, real_tokenizer):
    path = tmp_path_factory.mktemp("inspect") / "tiny-llama"
    make_tiny("llama", intermediate_size=32).save_pretrained(path)
    real_tokenizer.save_pretrained(path)
    return path


def test_neuron_and_stability_cli(folder, tmp_path):
    from core.methods.oneshot import ScoreResult

    scores = ScoreResult([torch.arange(32.0), torch.arange(32.0).flip(0)], {"criterion": "made_up"}, 0.0)
    path = scores.save(tmp_path / "s.safetensors")
    run = cli("neuron", "--model", str(folder), "--layer", "1", "--index", "3", "--samples", "2", "--seq-len", "32",
              "--criteria", "magnitude", "--scores", str(path), "--top-k", "3", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["layer"], report["index"], len(report["contexts"])) == (1, 3, 3)
    assert [c["criterion"] for c in report["criteria"]] == ["magnitude", "made_up"]
    assert report["criteria"][1]["rank"] == 4  # layer 1 scores 31, 30, …: neuron 3 (28) has 3 above it
    run = cli("stability", "--model", str(folder), "--criteria", "wanda,magnitude", "--draws", "2", "--samples", "2",
              "--seq-len", "32", "--ratios", "0.25,0.5", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["within"]["magnitude"]["mean_rho"] == pytest.approx(1.0)  # weights only: draws cannot differ
    assert set(result["within"]["wanda"]["overlap"]) == {"0.25", "0.5"}


def test_cli_bad_input_is_one_sentence(folder, tmp_path):
    run = cli("neuron", "--model", str(folder), "--layer", "5", "--index", "0", "--samples", "2", "--seq-len", "32")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1] == "error: Layer 5 does not exist: the model has 2 layers (0–1)."


def test_kl_error_bars_over_draws(tiny_loaded):
    from core.studies.stability import fidelity_over_draws

    loaded = tiny_loaded("llama")
    scores = score_draws(loaded, ["wanda", "magnitude"], [windows(2, 16, seed=1), windows(2, 16, seed=2)])
    rows = fidelity_over_draws(loaded, scores, [0.25, 0.5], windows(2, 16, seed=3))
    assert [(r["criterion"], r["ratio"], len(r["kl_draws"])) for r in rows] == [
        ("wanda", 0.25, 2), ("wanda", 0.5, 2), ("magnitude", 0.25, 2), ("magnitude", 0.5, 2)]
    magnitude = [r for r in rows if r["criterion"] == "magnitude"]
    assert all(r["kl_std"] == 0 and r["kl_mean"] > 0 for r in magnitude)  # weights only: every draw prunes alike
    assert all(r["kl_min"] <= r["kl_mean"] <= r["kl_max"] for r in rows)
    assert len(compare_over_draws(rows, "wanda", "magnitude")) == 2
