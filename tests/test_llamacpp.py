"""llama.cpp in the loop: the GGUF files this project writes (uniform ``llama``, per-layer ``deci``) load in
llama.cpp and give the torch model's logits (F32 within float rounding, Q8_0 within a small KL); K-quants go
through llama.cpp's quantizer, a pruned row that does not fill their super-blocks is refused (never a silent
other type) and the types the file holds are reported; ``bench --engine llama.cpp`` measures speed and
quality, and its bad input is one sentence. Tiny random models and a 400-token vocabulary keep it fast."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from functools import lru_cache

import pytest
import torch

from conftest import make_tiny, run_cli, tiny_config

from core import metrics
from core.errors import PruneConfigError
from core.export.gguf import GGUFOptions, save_gguf
from core.export.hf import read_meta, save_pruned
from core.export.kquant import BUILD_MINUTES, INSTALL, LlamaCppMissing, llama_cpp_binding, llama_cpp_missing
from core.measure.speed import SpeedError
from core.models.gguf_read import read_gguf_widths, tensor_types
from core.models.slicing import prune_mlp_neurons

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install -r "
                                 "requirements.txt builds it from source)")
TEXT = ("Structured pruning removes whole neurons from the MLP of every layer. The pruned model is smaller and "
        "faster, and it still has to say the same things: 1234 tokens, 56 layers, 7 heads! ")


@lru_cache(maxsize=1)
def small_tokenizer():
    """A 400-token byte-level BPE trained here (GPT-2 / SmolLM style), so GGUF files stay small."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|endoftext|>")


def tiny(intermediate_size: int = 64, hidden: int = 32) -> torch.nn.Module:
    """A 2-layer random Llama with the small vocabulary (hidden ``hidden``, 4 heads / 2 KV heads)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", intermediate_size=intermediate_size)
    config.vocab_size = len(small_tokenizer())
    config.hidden_size, config.head_dim = hidden, hidden // 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    with torch.no_grad():  # scaled so activations stay O(1) and the next-token distributions are far from flat
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, (4.0 if "embed" in name else 1.1) / hidden ** 0.5)
    return model


def windows(vocab: int, n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(7))


def torch_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def llama_logits(path, ids: torch.Tensor) -> torch.Tensor:
    from core.measure.llamacpp import llamacpp_logits

    return llamacpp_logits(path, ids, threads=1)


@needs_llama
@pytest.mark.parametrize("layout", ["uniform", "deci"])
def test_exports_load_in_llama_cpp_with_the_torch_logits(tmp_path, layout):
    kept = [torch.arange(0, 64, 2)] * 2 if layout == "uniform" else [torch.arange(0, 64, 2), torch.arange(64)]
    model = prune_mlp_neurons(tiny(64), kept)  # widths 32 / 32, or 32 / 64 (a per-layer file)
    ids = windows(model.config.vocab_size)
    ref = torch_logits(model, ids)
    f32 = save_gguf(model, small_tokenizer(), tmp_path / "m-f32.gguf", GGUFOptions(type="f32"))
    assert read_gguf_widths(f32) == (("llama", 32) if layout == "uniform" else ("deci", [32, 64]))
    got = llama_logits(f32, ids)
    assert got.shape == ref.shape
    err = float((got - ref).abs().max()) / float(ref.abs().max())
    assert err < 5e-3, err  # fp32 weights; llama.cpp keeps its KV cache in f16 by default (~1e-3 here)
    q8 = save_gguf(model, small_tokenizer(), tmp_path / "m-q8.gguf", GGUFOptions(type="q8_0"))
    kl = float(metrics.per_token_kl(ref, llama_logits(q8, ids)).mean())
    other = float(metrics.per_token_kl(ref, llama_logits(f32, ids.flip(-1))).mean())  # other tokens, other logits
    assert 0 < kl < 0.01 and other > 0.5, (kl, other)  # 8-bit blocks: close, and really quantized


@needs_llama
def test_kquant_rounds_to_256_reports_its_types_and_matches(tmp_path):
    model = prune_mlp_neurons(tiny(512, hidden=256), [torch.arange(256), torch.arange(512)])  # deci 256 / 512
    ids = windows(model.config.vocab_size)
    folder = save_pruned(model, small_tokenizer(), tmp_path / "k", {"model": "tiny"}, mode="gguf",
                         gguf=GGUFOptions(type="q4_k_m"))
    path = folder / "model-Q4_K_M.gguf"
    types = tensor_types(path, matrices=True)
    downs = {name: kind for name, kind in types.items() if "ffn_down" in name}
    assert len(downs) == 2 and set(downs.values()) <= {"Q4_K", "Q6_K"}  # Q4_K_M gives some ffn_down 6 bits
    assert not {"F16", "F32"} & set(types.values())
    meta = read_meta(folder)
    assert sum(meta["gguf_tensor_types"].values()) == len(types)  # every 2-D tensor counted once, by its type
    assert meta["gguf_tensor_types"] == {k: list(types.values()).count(k) for k in meta["gguf_tensor_types"]}
    ref = torch_logits(model, ids)
    kl = float(metrics.per_token_kl(ref, llama_logits(path, ids)).mean())
    other = float(metrics.per_token_kl(ref, torch_logits(model, ids.flip(-1))).mean())
    assert 0 < kl < 0.5 and other > 5, (kl, other)  # ~4.5-bit blocks of random Gaussian weights: ~0.25 nats
    assert sorted(p.name for p in folder.iterdir()) == ["model-Q4_K_M.gguf", "pruning_meta.json"]  # no temp files


@pytest.mark.parametrize("width", [288, 40])
def test_kquant_refuses_a_pruned_row_off_its_super_block(tmp_path, width):
    model = prune_mlp_neurons(tiny(512, hidden=256), [torch.arange(width)] * 2)  # 288 = 9 × 32, 40: neither
    with pytest.raises(PruneConfigError) as err:
        save_gguf(model, small_tokenizer(), tmp_path / "m.gguf", GGUFOptions(type="q4_k_m"))
    message = str(err.value)
    assert "'model.layers.0.mlp.down_proj.weight'" in message and f"rows of {width}" in message
    assert "super-blocks of 256" in message and "--round-to 256" in message
    assert message.count(". ") == 0 and message.endswith(".")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_missing_binding_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    assert llama_cpp_missing() == INSTALL.format(minutes=BUILD_MINUTES)  # what the dashboard's panel shows
    with pytest.raises(LlamaCppMissing, match=r"^llama\.cpp is reached through llama-cpp-python[^\n]*pip install "
                                              r"llama-cpp-python==0\.3\.36[^\n]*\.$"):
        llama_cpp_binding()
    model = prune_mlp_neurons(tiny(512, hidden=256), [torch.arange(256)] * 2)
    with pytest.raises(LlamaCppMissing):
        save_gguf(model, small_tokenizer(), tmp_path / "m.gguf", GGUFOptions(type="q6_k"))
    assert list(tmp_path.iterdir()) == []


@needs_llama
def test_measure_llamacpp_rows(tmp_path):
    from core.measure.llamacpp import LlamaCppOptions, measure_llamacpp

    dense = tiny(64)
    pruned = prune_mlp_neurons(dense, [torch.arange(32)] * 2)
    paths = {"dense": save_gguf(dense, small_tokenizer(), tmp_path / "d.gguf", GGUFOptions(type="q8_0")),
             "pruned": save_gguf(pruned, small_tokenizer(), tmp_path / "p.gguf", GGUFOptions(type="q8_0"))}
    options = LlamaCppOptions(prompt_tokens=32, gen_tokens=4, repeats=2, threads=1, windows=2, seq_len=32,
                              text="news")
    rows = measure_llamacpp(paths, options, reference="dense", tokenizer=small_tokenizer())
    assert [r["model"] for r in rows] == ["dense", "pruned"]
    base, row = rows
    assert base["kl_to_reference"] == 0 and base["top1_agreement"] == 1 and "prompt_speedup" not in base
    assert row["kl_to_reference"] > 0 and row["perplexity"] > 1 and row["tokens"] == 2 * 31
    assert row["widths"] == [32, 32] and row["tensor_types"] == {"Q8_0": 15} and row["same_format"]
    assert len(row["prompt_s_all"]) == len(row["gen_s_all"]) == 2
    assert row["file_bytes"] < base["file_bytes"] and row["param_ratio"] < 1
    flops = [2 * matmul_params(m) + 4 * 2 * 4 * 8 * 16 for m in (dense, pruned)]  # context 32 / 2, 2 × 4 heads × 8
    assert row["prompt_ideal"] == pytest.approx(flops[0] / flops[1]) and row["prompt_ideal"] > 1
    assert row["prompt_speedup"]["ideal"] == row["prompt_ideal"]
    assert row["prompt_tokens_per_s"] == pytest.approx(32 / statistics.median(row["prompt_s_all"]))
    assert row["prompt_tokens_per_s_q1_q3"][0] <= row["prompt_tokens_per_s"] <= row["prompt_tokens_per_s_q1_q3"][1]


def matmul_params(model: torch.nn.Module) -> int:
    """Weights a token is multiplied by: every matrix, the tied embedding once (as the LM head)."""
    return sum(p.numel() for p in model.parameters() if p.dim() == 2)


def test_gguf_counts_read_params_and_flops(tmp_path):
    from core.measure.llamacpp import gguf_counts

    model = prune_mlp_neurons(tiny(64), [torch.arange(32), torch.arange(64)])
    counts = gguf_counts(save_gguf(model, small_tokenizer(), tmp_path / "m.gguf", GGUFOptions(type="f16")))
    assert counts.params == model.num_parameters() and counts.matmul_params == matmul_params(model)
    assert counts.architecture == "deci" and counts.widths == [32, 64] and counts.attention_width == 2 * 4 * 8
    assert counts.tensor_types == {"F16": 15}  # 7 matrices per layer and the embedding
    assert counts.flops_per_token(100) == 2 * counts.matmul_params + 4 * 64 * 100
    assert counts.file_bytes == (tmp_path / "m.gguf").stat().st_size
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # norms, stored F32
    assert counts.tensor_bytes == 2 * matmul_params(model) + 4 * vectors  # F16 matrices: 2 bytes a value
    assert 0 < counts.file_bytes - counts.tensor_bytes  # header and tokenizer: what pruning cannot shrink


def test_bench_bad_input_is_one_sentence(tmp_path):
    for args, expected in (
            (("--engine", "onnx"), "error: Unknown engine 'onnx'; choose one of: torch, llama.cpp."),
            (("--engine", "llama.cpp", "--model", str(tmp_path / "none.gguf")),
             f"error: No GGUF file at {tmp_path / 'none.gguf'}; give the path of a .gguf file (prune --export gguf "
             "writes one)."),
            (("--engine", "llama.cpp", "--model", str(tmp_path)),
             f"error: {tmp_path} holds no GGUF export; llama.cpp measures .gguf files (prune --export gguf writes "
             "one)."),
            (("--engine", "llama.cpp", "--model", __file__),
             f"error: {__file__} is not a GGUF file (its first bytes are not 'GGUF')."),
            (("--engine", "llama.cpp", "--prefill", "4", "--model", __file__),
             "error: prompt_tokens (--prefill) must be ≥ 8, got 4.")):
        run = run_cli("bench", *args)
        assert run.returncode == 2 and run.stdout == "", (args, run.stdout)
        assert run.stderr.strip() == expected


@needs_llama
def test_cli_kquant_export_and_llamacpp_bench(tmp_path, real_tokenizer, monkeypatch):
    folder = tmp_path / "tiny"
    make_tiny("llama", intermediate_size=512).save_pretrained(folder)  # hidden 32: not a K super-block
    real_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    run = run_cli("prune", "--model", str(folder), "--ratio", "0.3", "--samples", "2", "--seq-len", "32",
                  "--export", "gguf", "--gguf-type", "q4_k_m", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["round_to"] == 256 and result["intermediate_sizes"] == [256, 256]  # 358 kept → 256
    types = tensor_types(out / "model-Q4_K_M.gguf", matrices=True)
    assert result["gguf_tensor_types"] == json.loads((out / "pruning_meta.json").read_text())["gguf_tensor_types"]
    # the pruned rows are K super-blocks; the model's own hidden size 32 is not, and llama.cpp's fallback to
    # a 32-block type is reported, not hidden
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(2)} <= {"Q4_K", "Q6_K"}
    assert types["blk.0.ffn_up.weight"] == "Q5_0" and "Q5_0" in result["gguf_tensor_types"]
    quick = ("--prefill", "16", "--decode", "2", "--repeats", "1", "--threads", "1", "--eval-windows", "1",
             "--eval-seq-len", "16", "--json")
    bench = run_cli("bench", "--engine", "llama.cpp", "--model", str(out / "model-Q4_K_M.gguf"), *quick)
    assert bench.returncode == 0, bench.stderr[-2000:]
    measured = json.loads(bench.stdout)
    assert measured["engine"] == "llama.cpp" and measured["baseline"] is None and len(measured["rows"]) == 1
    assert measured["rows"][0]["widths"] == [256, 256] and measured["rows"][0]["perplexity"] > 1
    monkeypatch.setenv("HFPRUNE_CACHE", str(tmp_path / "cache"))  # where the dense baseline is written once
    bench = run_cli("bench", "--engine", "llama.cpp", "--model", str(out), "--baseline", "auto", *quick)
    assert bench.returncode == 0, bench.stderr[-2000:]
    base, row = json.loads(bench.stdout)["rows"]
    dense = list((tmp_path / "cache" / "gguf").glob("*-Q4_K_M.gguf"))
    assert len(dense) == 1 and base["file"] == str(dense[0]) and base["widths"] == [512, 512]  # the same type
    assert row["widths"] == [256, 256] and row["param_ratio"] < 1 and row["kl_to_reference"] > 0
    assert row["prompt_ideal"] > 1 and row["same_format"]


def test_bench_refuses_method_with_llamacpp(tmp_path):
    path = tmp_path / "m.gguf"
    save_gguf(tiny(64), small_tokenizer(), path, GGUFOptions(type="f32"))
    run = run_cli("bench", "--engine", "llama.cpp", "--method", "torchao-int8", "--model", str(path))
    assert run.returncode == 2 and "choose the type when exporting" in run.stderr


def test_check_files_refuses_empty():
    from core.measure.llamacpp import check_files

    with pytest.raises(SpeedError, match="at least one GGUF file"):
        check_files({})
