"""The dashboard's export format defaults to the one that works for the variant (issue 10 §8)."""
from __future__ import annotations

import pytest

from core.errors import PruneConfigError
from core.export.hf import EXPORT_MODES, default_export_mode, save_pruned


def test_uniform_widths_default_to_native():
    mode, why = default_export_mode([1075] * 30)
    assert mode == "hf-native" and why.startswith("hf-native: every layer has the same width")


def test_different_widths_default_to_remote_code_and_say_why():
    mode, why = default_export_mode([900, 1075, 1200])
    assert mode == "hf-remote-code" and mode in EXPORT_MODES
    assert "different widths" in why and "900–1200" in why and "trust_remote_code=True" in why
    assert "hf-padded" in why  # the alternative is named, with its cost
    assert "\n" not in why  # one line


def test_the_default_is_a_format_that_saves(tmp_path, tiny_loaded):
    """A non-uniform variant: hf-native refuses it, the default saves it."""
    from core.models.adapters import mlp_widths
    from core.models.slicing import prune_mlp_neurons

    loaded = tiny_loaded("llama")
    import torch

    kept = [torch.arange(40), torch.arange(24)]  # layer widths 40 and 24 of 64
    model = prune_mlp_neurons(loaded.model, kept)
    widths = mlp_widths(model)
    assert widths == [40, 24]
    with pytest.raises(PruneConfigError, match="same width"):
        save_pruned(model, loaded.tokenizer, tmp_path / "native", {}, mode="hf-native")
    mode, _ = default_export_mode(widths)
    assert (save_pruned(model, loaded.tokenizer, tmp_path / "default", {}, mode=mode) / "config.json").is_file()
