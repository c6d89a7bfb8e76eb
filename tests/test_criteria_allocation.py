"""The extra criteria (self_distill, fisher, entropy+ce, fluctuation) and the adaptive allocation."""
import json

import pytest
import torch

from conftest import make_tiny, run_cli

from core.errors import HFPruneError, PruneConfigError
from core.importance.criteria import REGISTRY, ScoreOptions, describe, get_criterion
from core.models.adapters import mlp_widths
from core.prune.adaptive import adaptive_search

WINDOWS = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", intermediate_size=64)


def score(model, name, **params):
    return get_criterion(name, **params)(model, WINDOWS, ScoreOptions(batch_size=2, progress=False, seed=0))


def test_self_distill_has_a_gradient_only_with_a_sharpened_teacher(model):
    sharp = score(model, "self_distill", temperature=0.5, alpha=1.0)  # pure KL to a sharpened teacher
    assert all(s.shape == (64,) for s in sharp) and all(float(s.sum()) > 0 for s in sharp)
    flat = score(model, "self_distill", temperature=1.0, alpha=1.0)  # KL to itself: zero gradient
    assert max(float(s.max()) for s in flat) < 1e-4 * max(float(s.max()) for s in sharp)
    assert get_criterion("self_distill").cost == "forward+backward+teacher"
    with pytest.raises(HFPruneError, match="temperature must be > 0"):
        get_criterion("self_distill", temperature=0)


def test_entropy_ce_mix_interpolates(model):
    ent, ce = score(model, "entropy"), score(model, "cross_entropy")
    mix0, mix1 = score(model, "entropy+ce", weight=0.0), score(model, "entropy+ce", weight=1.0)
    # weight 1 = entropy, weight 0 = cross-entropy: the same scores up to the per-position normalisation
    for got, want in [(mix0, ce), (mix1, ent)]:
        for g, w in zip(got, want):
            torch.testing.assert_close(g / g.sum(), w / w.sum(), rtol=1e-3, atol=1e-7)
    half = score(model, "entropy+ce")
    assert not torch.allclose(half[0] / half[0].sum(), ent[0] / ent[0].sum(), rtol=1e-3)


def test_fisher_is_seeded_and_positive(model):
    a, b = score(model, "fisher"), score(model, "fisher")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
        assert float(x.min()) >= 0 and float(x.sum()) > 0


def test_fluctuation_scores_every_neuron_per_layer(model):
    got = score(model, "fluctuation")
    assert all(s.shape == (64,) and float(s.min()) >= 0 for s in got)
    assert not torch.allclose(got[0], got[1])


def test_every_criterion_states_its_cost():
    rows = {r["name"]: r for r in describe()}
    assert set(rows) == set(REGISTRY)
    assert rows["entropy"]["cost"] == "forward+backward" and rows["wanda"]["cost"] == "forward"


@pytest.mark.parametrize("mode", ["independent", "sequential"])
@pytest.mark.parametrize("ratio", [0.2, 0.45])
def test_adaptive_hits_the_target_ratio(model, ratio, mode):
    scores = score(model, "entropy")
    held = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(9))
    result = adaptive_search(model, scores, ratio, held, progress=False, mode=mode)
    total = sum(mlp_widths(model))
    assert abs(result.achieved_ratio - ratio) <= 0.005
    # the bisection on the tolerance itself lands near the target (the exact fix-up only trims a few neurons)
    assert abs(result.search_ratio - ratio) <= 0.02 and len(result.outer) >= 2 and result.mode == mode
    assert sum(result.widths) == round((1 - ratio) * total)
    assert all(w >= 0.05 * 64 for w in result.widths)
    assert len(result.traces) == 2 and all(t.tried for t in result.traces)


def test_adaptive_refuses_a_ratio_below_the_floors(model):
    scores = score(model, "entropy")
    with pytest.raises(PruneConfigError, match="fewer than the adaptive minimum"):
        adaptive_search(model, scores, 0.99, WINDOWS[:1], min_keep=0.5, progress=False)


def test_cli_prune_global_remote_code_then_eval(tmp_path, real_tokenizer):
    folder = tmp_path / "tiny"
    make_tiny("qwen3", intermediate_size=64).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    cli = run_cli
    out = tmp_path / "g"
    done = cli("prune", "--model", str(folder), "--criterion", "cross_entropy", "--ratio", "0.5", "--allocation",
               "global", "--round-to", "8", "--samples", "2", "--seq-len", "16", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["export"] == "hf-remote-code" and all(w % 8 == 0 for w in report["intermediate_sizes"])
    ev = cli("eval", "--model", str(out), "--reference", str(folder), "--windows", "2", "--seq-len", "16", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["kl_to_reference"] >= 0
    bad = cli("prune", "--model", str(folder), "--ratio", "0.5", "--allocation", "global", "--export", "hf-native",
              "--samples", "2", "--seq-len", "16", "--out", str(tmp_path / "n"))
    assert bad.returncode != 0 and "hf-native needs uniform widths" in bad.stderr
    assert not (tmp_path / "n").exists()

    # criterion parameters reach the engine and are recorded; AMP's sequential search hits the ratio
    out = tmp_path / "sd"
    done = cli("prune", "--model", str(folder), "--criterion", "self_distill", "--temperature", "0.3", "--alpha", "0.7",
               "--ratio", "0.4", "--allocation", "adaptive", "--adaptive-mode", "sequential", "--halvings", "4",
               "--heldout-samples", "2", "--heldout-seq-len", "16", "--samples", "2", "--seq-len", "16",
               "--export", "hf-padded", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["criterion_params"] == {"temperature": 0.3, "alpha": 0.7}
    assert abs(report["achieved_ratio"] - 0.4) <= 0.005
    meta = json.loads((out / "pruning_meta.json").read_text())
    assert meta["adaptive"]["mode"] == "sequential" and meta["criterion_params"]["temperature"] == 0.3
    assert meta["adaptive"]["refit_probes"] is False  # opt-in: the search probed the plain cut
    probed = cli("prune", "--model", str(folder), "--ratio", "0.4", "--allocation", "adaptive", "--halvings", "2",
                 "--heldout-samples", "2", "--heldout-seq-len", "16", "--samples", "2", "--seq-len", "16",
                 "--compensate-samples", "4", "--refit-probes", "--out", str(tmp_path / "probed"))
    assert probed.returncode == 0, probed.stderr
    assert json.loads((tmp_path / "probed" / "pruning_meta.json").read_text())["adaptive"]["refit_probes"] is True
    # eval of the padded folder: the padding is counted in mlp_params, the real widths in effective_*
    ev = cli("eval", "--model", str(out), "--windows", "1", "--seq-len", "16", "--json")
    assert ev.returncode == 0, ev.stderr
    counts = json.loads(ev.stdout)
    assert counts["mlp_params"] == 3 * 32 * max(meta["intermediate_sizes"]) * 2
    assert counts["effective_mlp_params"] == 3 * 32 * sum(meta["intermediate_sizes"])
    assert counts["params"] - counts["effective_params"] == counts["mlp_params"] - counts["effective_mlp_params"]
    wrong = cli("score", "--model", str(folder), "--criterion", "entropy", "--alpha", "0.5", "--samples", "2",
                "--seq-len", "16", "--out", str(tmp_path / "w.safetensors"))
    assert wrong.returncode != 0 and "--alpha does not apply to the 'entropy' criterion" in wrong.stderr
    assert not (tmp_path / "w.safetensors").exists()
