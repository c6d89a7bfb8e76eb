"""GGUF export: uniform files reload through transformers' GGUF loader with the pruned model's logits
(F32 exact, F16 / Q8_0 within the format's rounding; Q5_0 / Q4_0 close in KL), the tokenizer survives,
per-layer widths become llama.cpp's ``deci`` per-layer arrays (or zero padding), a block type refuses
rows that do not fill its blocks (never a silent F16), and ``prune --export gguf`` writes one file whose
widths are rounded to the type's block."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny, run_cli

from core import metrics
from core.errors import PruneConfigError
from core.export.gguf import GGUF_BLOCK, GGUFOptions, block_of, gguf_round_to, permute_qk, save_gguf
from core.models import gguf_read
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


def tensor_types(path) -> dict[str, str]:
    """GGUF tensor name → its stored type name (F32, F16, Q8_0 …)."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_block_sizes_and_the_rounding_a_gguf_type_needs():
    assert [block_of(k) for k in ("f32", "f16", "q8_0", "q5_0", "q4_0")] == [1, 1, 32, 32, 32]
    assert set(GGUF_BLOCK) == set(GGUFOptions.knobs()[0][1].choices)  # one table for every GGUF type
    assert gguf_round_to("q8_0") == 32 and gguf_round_to("f16") == 1  # not typed: the block
    assert gguf_round_to("q4_0", 64) == 64 and gguf_round_to("f16", 8) == 8  # typed: kept
    with pytest.raises(PruneConfigError, match=r"^--round-to 8 is not a multiple of Q8_0's block of 32[^\n]*\.$"):
        gguf_round_to("q8_0", 8)
    with pytest.raises(PruneConfigError, match="Unknown GGUF type"):
        block_of("q4_k")


@pytest.mark.parametrize("kind", ["q8_0", "q5_0", "q4_0"])
def test_unaligned_width_is_refused_not_widened(tokenizer, tmp_path, kind):
    pruned = prune_mlp_neurons(tiny("llama", tokenizer), [torch.arange(40)] * 2)  # 40 is not a multiple of 32
    with pytest.raises(PruneConfigError) as err:
        save_gguf(pruned, tokenizer, tmp_path / "m.gguf", GGUFOptions(type=kind))
    message = str(err.value)
    assert "model.layers.0.mlp.down_proj.weight" in message and "rows of 40" in message
    assert "blocks of 32" in message and "--round-to 32" in message and "f16" in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    assert list(tmp_path.iterdir()) == []  # nothing written, no .partial left
    f16 = save_gguf(pruned, tokenizer, tmp_path / "m16.gguf", GGUFOptions(type="f16"))  # f16 takes any width
    assert tensor_types(f16)["blk.0.ffn_down.weight"] == "F16"


def test_hidden_size_off_the_block_is_refused(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.vocab_size, config.hidden_size, config.head_dim = len(tokenizer), 48, 12  # hidden 48 = 1.5 blocks
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(PruneConfigError, match="'model.embed_tokens.weight' has rows of 48.*choose f16 or f32"):
        save_gguf(model, tokenizer, tmp_path / "m.gguf", GGUFOptions(type="q8_0"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["q5_0", "q4_0"])
def test_q5_q4_round_trip(uniform, tokenizer, tmp_path, kind):
    path = save_gguf(uniform, tokenizer, tmp_path / f"m-{kind}.gguf", GGUFOptions(type=kind))
    types = tensor_types(path)
    assert {types[f"blk.{i}.{t}.weight"] for i in range(2) for t in ("ffn_down", "ffn_up", "attn_q")} == {kind.upper()}
    assert types["token_embd.weight"] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert gguf_read.read_metadata(path)["general.file_type"] == {"q4_0": 2, "q5_0": 8}[kind]  # MOSTLY_Q4_0 / MOSTLY_Q5_0
    back_model = load_gguf_model(path)
    key = "model.layers.0.mlp.down_proj.weight"  # the pruned matrix: rows of 32 = one block
    dense, stored = uniform.state_dict()[key], back_model.state_dict()[key]
    rel = float((stored - dense).norm() / dense.norm())  # 4-bit blocks ~0.09, 5-bit ~0.04 on N(0, 0.2) weights
    assert 0.01 < rel < {"q5_0": 0.06, "q4_0": 0.12}[kind], (kind, rel)
    ref, got = logits(uniform), logits(back_model)
    kl = float(metrics.per_token_kl(ref, got).mean())
    corr = float(torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1])
    # the random tiny model's next-token distributions are nearly flat, so compare logits, not argmaxes
    assert kl < 0.05 and corr > {"q5_0": 0.95, "q4_0": 0.8}[kind], (kind, kl, corr)
    back = logits(reload_transformers(path))  # transformers' GGUF loader de-quantizes the same blocks
    torch.testing.assert_close(back, got, rtol=1e-3, atol=1e-3)


def test_cli_prune_gguf_rounds_to_the_block(tmp_path, real_tokenizer):
    folder = tmp_path / "tiny"
    make_tiny("llama", intermediate_size=96).save_pretrained(folder)  # 30 % of 96 keeps 67: not a multiple of 32
    real_tokenizer.save_pretrained(folder)
    common = ("prune", "--model", str(folder), "--ratio", "0.3", "--samples", "2", "--seq-len", "32",
              "--export", "gguf", "--gguf-type", "q8_0")
    bad = run_cli(*common, "--round-to", "8", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert bad.stderr.strip() == ("error: --round-to 8 is not a multiple of Q8_0's block of 32, so the pruned rows "
                                  "would not fit its blocks: use --round-to 32 (or a multiple) or --gguf-type f16.")
    out = tmp_path / "out"
    run = run_cli(*common, "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["round_to"] == 32 and result["gguf_type"] == "q8_0" and result["intermediate_sizes"] == [64, 64]
    assert result["achieved_ratio"] == pytest.approx(1 / 3, abs=1e-4)
    meta = json.loads((out / "pruning_meta.json").read_text())
    assert meta["round_to"] == 32 and meta["intermediate_sizes"] == [64, 64]
    types = tensor_types(out / "model-Q8_0.gguf")
    downs = [v for k, v in types.items() if "ffn_down" in k]
    assert len(downs) == 2 and set(downs) == {"Q8_0"}  # no silent F16
    assert {v for k, v in types.items() if k.endswith(".weight") and "norm" not in k} == {"Q8_0"}
