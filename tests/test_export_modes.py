"""Non-uniform widths: global / adaptive allocations and the hf-remote-code / hf-padded exports."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS

from core.errors import PruneConfigError
from core.export.hf import save_pruned
from core.methods.oneshot import AllocationOptions, ScoreResult, prune_with_scores
from core.models.adapters import mlp_widths
from core.models.loading import load_model

IDS = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


def skewed_scores(widths: list[int]) -> list[torch.Tensor]:
    """Layer 0 matters ten times more than layer 1, so a global ranking gives them different widths."""
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(w, generator=gen) * (10.0 if i == 0 else 1.0) for i, w in enumerate(widths)]


def nonuniform(loaded):
    result = ScoreResult(skewed_scores(mlp_widths(loaded.model)),
                         {"criterion": "random", "source": "wiki", "samples": 1, "seq_len": 8, "seed": 0}, 0.0)
    pruned = prune_with_scores(loaded, result, 0.4, allocation="global",
                               options=AllocationOptions(normalize="none", min_keep=0.1))
    assert len(set(pruned.widths)) == 2, pruned.widths
    return pruned


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["hf-remote-code", "hf-padded"])
def test_nonuniform_export_round_trip(arch, mode, tmp_path, tiny_loaded):
    loaded = tiny_loaded(arch)
    pruned = nonuniform(loaded)
    with torch.no_grad():
        expected = pruned.model(input_ids=IDS).logits
    out = save_pruned(pruned.model, loaded.tokenizer, tmp_path / mode, pruned.meta, mode=mode)
    config = json.loads((out / "config.json").read_text())
    if mode == "hf-remote-code":
        assert config["intermediate_sizes"] == pruned.widths and "AutoModelForCausalLM" in config["auto_map"]
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert mlp_widths(reloaded) == pruned.widths
    else:
        assert "auto_map" not in config and config["intermediate_size"] == max(pruned.widths)
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no remote code
        assert mlp_widths(reloaded) == [max(pruned.widths)] * 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    meta = json.loads((out / "pruning_meta.json").read_text())
    assert meta["export"] == mode and meta["intermediate_sizes"] == pruned.widths
    assert [len(k) for k in meta["kept_indices"]] == pruned.widths
    # The engine's own loader (used by eval / bench / zeroshot) reloads it too, remote code included.
    again = load_model(str(out))
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_remote_code_export_of_a_reloaded_export(tmp_path, tiny_loaded):
    loaded = tiny_loaded("llama")
    pruned = nonuniform(loaded)
    first = save_pruned(pruned.model, loaded.tokenizer, tmp_path / "a", pruned.meta, mode="hf-remote-code")
    reloaded = load_model(str(first))
    second = save_pruned(reloaded.model, loaded.tokenizer, tmp_path / "b", pruned.meta, mode="hf-remote-code")
    assert "transformers.models.llama" in (second / "modeling_hfprune.py").read_text()
    again = load_model(str(second))
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=IDS).logits, reloaded.model(input_ids=IDS).logits)


def test_native_export_refuses_nonuniform_and_writes_nothing(tmp_path, tiny_loaded):
    loaded = tiny_loaded("qwen2")
    pruned = nonuniform(loaded)
    with pytest.raises(PruneConfigError, match="same width"):
        save_pruned(pruned.model, loaded.tokenizer, tmp_path / "x", pruned.meta, mode="hf-native")
    assert list(tmp_path.iterdir()) == []


def test_global_allocation_keeps_min_fraction_and_ratio(tiny_loaded):
    loaded = tiny_loaded("llama", intermediate_size=128)
    scores = [torch.rand(128) * 100, torch.rand(128) * 0.001]
    result = ScoreResult(scores, {"criterion": "random", "source": "wiki", "samples": 1, "seq_len": 8, "seed": 0}, 0.0)
    pruned = prune_with_scores(loaded, result, 0.5, allocation="global",
                               options=AllocationOptions(normalize="none", min_keep=0.1))
    assert pruned.widths[1] == 13 and sum(pruned.widths) == 128  # floor(10 %) rounded up, total exact
    z = prune_with_scores(loaded, result, 0.5, allocation="global", options=AllocationOptions(normalize="zscore"))
    assert sum(z.widths) == 128 and abs(z.widths[0] - z.widths[1]) < 40  # normalised: no layer starved


def test_foreign_remote_code_is_not_run_without_consent(tmp_path, tiny_loaded):
    """Only the code our exporter wrote is trusted by itself; anything else needs an explicit yes."""
    from core.errors import ModelLoadError

    loaded = tiny_loaded("qwen3")
    out = save_pruned(nonuniform(loaded).model, loaded.tokenizer, tmp_path / "rc", {}, mode="hf-remote-code")
    modeling = out / "modeling_hfprune.py"
    modeling.write_text(modeling.read_text() + "\nprint('a line someone added')\n")
    with pytest.raises(ModelLoadError, match="ships Python code of its own.*--trust-remote-code"):
        load_model(str(out))
    assert mlp_widths(load_model(str(out), trust_remote_code=True).model) == nonuniform(loaded).widths
    extra = tmp_path / "rc2"
    save_pruned(nonuniform(loaded).model, loaded.tokenizer, extra, {}, mode="hf-remote-code")
    (extra / "helper.py").write_text("x = 1\n")  # an extra Python file is not ours either
    with pytest.raises(ModelLoadError, match="ships Python code of its own"):
        load_model(str(extra))
