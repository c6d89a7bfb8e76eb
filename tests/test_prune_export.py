"""Physical slicing is exact, exports reload with plain transformers, bad input writes nothing."""
import json

import pytest
import torch

from conftest import ARCHS, make_tiny

from core.errors import PruneConfigError
from core.export.hf import save_pruned
from core.importance.stats import top_k_indices
from core.methods.oneshot import CompensationOptions, ScoreResult, prune_with_scores
from core.models.adapters import mlp_handles, mlp_widths
from core.models.slicing import prune_mlp_neurons
from core.prune.allocate import check_ratio, uniform_widths


def masked_logits(model, kept, ids):
    """Dense model with the removed neurons zeroed at the down_proj input: what pruning must equal."""
    hooks = []
    for h, index in zip(mlp_handles(model), kept):
        mask = torch.zeros(h.width)
        mask[index] = 1.0
        hooks.append(h.down.register_forward_pre_hook(lambda m, args, mask=mask: (args[0] * mask,)))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_slicing_equals_masking_and_reload(arch, tmp_path, tiny_loaded):
    loaded = tiny_loaded(arch)
    model = loaded.model
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    scores = [torch.rand(w, generator=torch.Generator().manual_seed(i)) for i, w in enumerate(mlp_widths(model))]
    result = ScoreResult(scores, {"criterion": "random", "source": "wiki", "samples": 1, "seq_len": 8, "seed": 0}, 0.0)
    pruned = prune_with_scores(loaded, result, 0.25, compensation=CompensationOptions("none"))  # plain slicing
    assert mlp_widths(pruned.model) == [48, 48] and pruned.model.config.intermediate_size == 48
    assert mlp_widths(model) == [64, 64]  # the original is untouched
    with torch.no_grad():
        got = pruned.model(input_ids=ids).logits
    torch.testing.assert_close(got, masked_logits(model, pruned.kept, ids), rtol=1e-5, atol=1e-5)

    out = save_pruned(pruned.model, loaded.tokenizer, tmp_path / "pruned", pruned.meta)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, got, rtol=1e-5, atol=1e-5)
    meta = json.loads((out / "pruning_meta.json").read_text())
    assert meta["intermediate_sizes"] == [48, 48] and meta["ratio"] == 0.25 and meta["export"] == "hf-native"
    assert [len(k) for k in meta["kept_indices"]] == [48, 48]
    assert any(p.suffix == ".safetensors" for p in out.iterdir()) and not any(p.suffix in (".bin", ".pt") for p in out.iterdir())


def test_kept_indices_are_the_top_scores():
    scores = [torch.tensor([0.1, 0.9, 0.5, 0.7]), torch.tensor([3.0, 1.0, 2.0, 0.0])]
    kept = top_k_indices(scores, [2, 3])
    assert kept[0].tolist() == [1, 3] and kept[1].tolist() == [0, 1, 2]


def test_uniform_widths_and_rounding():
    assert uniform_widths([1536] * 3, 0.2) == [1229] * 3
    assert uniform_widths([1536], 0.2, round_to=64) == [1216]
    assert uniform_widths([1536], 0.0) == [1536]
    with pytest.raises(PruneConfigError, match="leaves layer 0 with 0 of 4 neurons"):
        uniform_widths([4], 0.9)
    for bad in (1.0, -0.1, float("nan"), "x"):  # checked once where a ratio enters (check_ratio), not per allocation
        with pytest.raises(PruneConfigError, match="Ratio"):
            check_ratio(bad)


def test_prune_rejects_bad_indices():
    model = make_tiny("llama")
    with pytest.raises(PruneConfigError, match="unique"):
        prune_mlp_neurons(model, [torch.tensor([0, 0]), torch.tensor([1])])
    with pytest.raises(PruneConfigError, match="for 1 layers; the model has 2"):
        prune_mlp_neurons(model, [torch.tensor([0])])


def test_export_refuses_existing_folder_and_leaves_nothing(tmp_path, tiny_loaded):
    loaded = tiny_loaded("llama")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(PruneConfigError, match="already exists"):
        save_pruned(loaded.model, loaded.tokenizer, target, {})
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with pytest.raises(PruneConfigError, match="same width"):
        widths = [torch.arange(10), torch.arange(20)]
        save_pruned(prune_mlp_neurons(loaded.model, widths), loaded.tokenizer, tmp_path / "new", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left behind
