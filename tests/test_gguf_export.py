"""GGUF export: uniform files reload through transformers' GGUF loader with the pruned model's logits
(F32 exact, F16 / Q8_0 within the format's rounding), the tokenizer survives, per-layer widths become
llama.cpp's ``deci`` per-layer arrays (or zero padding), and ``prune --export gguf`` writes one file."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny, run_cli

from core.errors import PruneConfigError
from core.export.gguf import GGUFOptions, permute_qk, save_gguf
from core.models.gguf_read import load_gguf_model, read_gguf_widths, unpermute_qk
from core.models.slicing import prune_mlp_neurons

# max |Δlogit| / max |logit| allowed per tensor type (F16: 11-bit mantissa; Q8_0: 8-bit blocks of 32)
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "q8_0": 1e-1}
TEXT = ("Structured pruning removes whole neurons from the MLP of every layer. The pruned model is smaller and "
        "faster, and it still has to say the same things: 1234 tokens, 56 layers, 7 heads! ")


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE (GPT-2 / SmolLM style) trained here, so GGUF files stay small and fast to
    parse; the real 49k-token SmolLM2 vocabulary is exercised by the CLI test."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|endoftext|>")


def tiny(arch: str, tokenizer, intermediate_size: int = 64) -> torch.nn.Module:
    """make_tiny's model with the small tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config(arch, intermediate_size=intermediate_size)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.2)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def reload_transformers(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def uniform(tokenizer):
    return prune_mlp_neurons(tiny("llama", tokenizer), [torch.arange(0, 64, 2)] * 2)  # every layer keeps 32 of 64


def test_qk_permutation_round_trips():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_uniform_gguf_reloads_through_transformers(uniform, tokenizer, tmp_path, kind):
    path = save_gguf(uniform, tokenizer, tmp_path / f"m-{kind}.gguf", GGUFOptions(type=kind))
    assert read_gguf_widths(path) == ("llama", 32)
    ref = logits(uniform)
    got = logits(reload_transformers(path))
    err = float((got - ref).abs().max()) / float(ref.abs().max())
    assert err <= TOLERANCE[kind], (kind, err)
    if kind != "f32":
        assert err > 0  # really stored in the smaller type
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_tokenizer_and_metadata_survive(uniform, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from core.models.gguf_read import read_metadata

    path = save_gguf(uniform, tokenizer, tmp_path / "m.gguf", GGUFOptions(type="f32", pre="smollm"))
    meta = read_metadata(path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["llama.embedding_length"] == 32 and meta["llama.block_count"] == 2
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = TEXT + "<|im_start|>user\nhi<|im_end|>"
    assert back(text).input_ids == tokenizer(text).input_ids


def test_source_gguf_pre_tokenizer_is_copied():
    from core.export.gguf import source_pre_tokenizer

    assert source_pre_tokenizer("smollm2-135m") == "smollm"  # read from the embedded package's GGUF header
    assert source_pre_tokenizer("some/hub-id") is None


def test_per_layer_widths_write_a_deci_array_or_pad(tokenizer, tmp_path):
    model = tiny("llama", tokenizer)
    pruned = prune_mlp_neurons(model, [torch.arange(0, 64, 2), torch.arange(48)])  # widths 32, 48
    ref = logits(pruned)
    deci = save_gguf(pruned, tokenizer, tmp_path / "deci.gguf", GGUFOptions(type="f32"))
    assert read_gguf_widths(deci) == ("deci", [32, 48])
    torch.testing.assert_close(logits(load_gguf_model(deci)), ref, rtol=1e-4, atol=1e-5)
    from core.models.loading import load_model

    engine = load_model(str(deci))  # the engine's GGUF path reads the per-layer file too
    assert [layer.mlp.down_proj.in_features for layer in engine.model.model.layers] == [32, 48]
    torch.testing.assert_close(logits(engine.model), ref, rtol=1e-4, atol=1e-5)
    padded = save_gguf(pruned, tokenizer, tmp_path / "pad.gguf", GGUFOptions(type="f32", layout="padded"))
    assert read_gguf_widths(padded) == ("llama", 48)
    torch.testing.assert_close(logits(reload_transformers(padded)), ref, rtol=1e-4, atol=1e-5)


def test_qwen2_keeps_hf_order_and_refuses_per_layer_widths(tokenizer, tmp_path):
    model = tiny("qwen2", tokenizer)
    path = save_gguf(model, tokenizer, tmp_path / "q.gguf", GGUFOptions(type="f32"))
    assert read_gguf_widths(path) == ("qwen2", 64)
    torch.testing.assert_close(logits(reload_transformers(path)), logits(model), rtol=1e-4, atol=1e-5)
    uneven = prune_mlp_neurons(model, [torch.arange(32), torch.arange(48)])
    with pytest.raises(PruneConfigError, match="--gguf-layout padded"):
        save_gguf(uneven, tokenizer, tmp_path / "u.gguf")
    with pytest.raises(PruneConfigError, match="GGUF export supports"):
        save_gguf(tiny("gemma3_text", tokenizer), tokenizer, tmp_path / "g.gguf")
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "u.gguf").exists()


def test_cli_prune_export_gguf(tmp_path, real_tokenizer):
    from core.models.gguf_read import read_metadata

    folder = tmp_path / "tiny"
    make_tiny("llama", intermediate_size=64).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    run = run_cli("prune", "--model", str(folder), "--ratio", "0.5", "--samples", "2", "--seq-len", "32",
                  "--export", "gguf", "--gguf-type", "q8_0", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["model-Q8_0.gguf", "pruning_meta.json"]
    meta = json.loads((out / "pruning_meta.json").read_text())
    assert meta["export"] == "gguf" and meta["gguf"]["type"] == "q8_0" and meta["intermediate_sizes"] == [32, 32]
    assert read_gguf_widths(out / "model-Q8_0.gguf") == ("llama", 32)
    header = read_metadata(out / "model-Q8_0.gguf")
    assert header["tokenizer.ggml.model"] == "gpt2" and header["tokenizer.ggml.pre"] == "default"  # a folder source
    assert header["general.file_type"] == 7  # MOSTLY_Q8_0
    bad = run_cli("prune", "--model", str(folder), "--ratio", "0.5", "--samples", "2", "--seq-len", "32",
                  "--export", "gguf", "--gguf-type", "q4", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and not (tmp_path / "bad").exists()
