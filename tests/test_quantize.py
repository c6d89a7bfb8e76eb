"""Quantization: every method on tiny models of each family and on the embedded model, the saved
folder (weights + recipe, no pickles) reloading through load_any and the CLI, and bad input."""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny

from core.errors import HFPruneError, ModelLoadError
from core.models.counts import count_params, param_counts, weight_bytes
from core.quantize.backends import METHODS, QuantizationError, check_method, quantization_of, quantize_model
from core.quantize.store import RECIPE_FILE, load_any, read_recipe, save_quantized

IDS = torch.tensor([[1, 530, 2048, 77, 9000, 12, 5, 4000, 300, 41, 18, 1999, 7, 64, 128, 256]])


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    p = F.log_softmax(ref.float(), -1)
    return float((p.exp() * (p - F.log_softmax(out.float(), -1))).sum(-1).mean())


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny Llama with the real SmolLM2 tokenizer (only the tokenizer is read from the cache)."""
    from transformers import AutoTokenizer

    from core.models.loading import ensure_embedded

    folder = tmp_path_factory.mktemp("tinyq") / "tiny"
    model = make_tiny("llama")
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(ensure_embedded("smollm2-135m"))).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_a_forward_on_tiny_models(arch, method):
    model = make_tiny(arch)
    with torch.no_grad():
        ref = model(IDS).logits
    params_before = count_params(model)
    q = quantize_model(copy.deepcopy(model), method)
    assert quantization_of(q) == method
    with torch.no_grad():
        out = q(IDS).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # the weights really changed format
    assert _kl(ref, out) < (0.5 if method == "bnb-nf4" else 0.1)
    assert param_counts(q) == params_before  # logical parameters survive packing
    assert weight_bytes(q) < weight_bytes(model)
    # the LM head (tied to the embeddings) stays a plain fp32 Linear
    assert type(q.lm_head) is torch.nn.Linear and q.lm_head.weight.dtype == torch.float32


def test_quantize_handles_pruned_widths_not_multiple_of_block():
    """NF4's CPU repacking needs K % 64 == 0; a pruned width of 50 must still work."""
    model = make_tiny("llama", intermediate_size=50)
    q = quantize_model(copy.deepcopy(model), "bnb-nf4")
    with torch.no_grad():
        assert torch.isfinite(q(IDS).logits).all()


def test_nf4_on_cuda_refuses_widths_its_kernels_cannot_run():
    """Checked without a GPU: the shape rule runs before any conversion (a 1229-wide layer crashed the
    NF4 CUDA kernel on an H100; 1216 and 1232 ran)."""
    from core.quantize.backends import check_bnb_shapes

    odd = make_tiny("llama", intermediate_size=50)
    with pytest.raises(QuantizationError, match=r"multiples of 16.*mlp.gate_proj is 32 → 50.*--round-to 64"):
        check_bnb_shapes(odd, "bnb-nf4", "cuda")
    check_bnb_shapes(make_tiny("llama", intermediate_size=64), "bnb-nf4", "cuda")
    check_bnb_shapes(odd, "bnb-nf4", "cpu")  # the CPU kernels take any width (see the test above)
    check_bnb_shapes(odd, "bnb-8bit", "cuda")


@pytest.mark.real
def test_every_method_on_the_embedded_model(real):
    dense = real.model
    with torch.no_grad():
        ref = dense(IDS).logits
    kls = {}
    for method in METHODS:
        q = quantize_model(copy.deepcopy(dense), method)
        with torch.no_grad():
            out = q(IDS).logits
        assert torch.isfinite(out).all()
        kls[method] = _kl(ref, out)
        del q
    # 8-bit weight-only is close to lossless; NF4 loses more; the legacy per-tensor torch.ao path loses most
    assert kls["torchao-int8"] < 0.05 and kls["bnb-8bit"] < 0.05
    assert kls["bnb-nf4"] > kls["torchao-int8"]
    assert kls["torch-dynamic-int8"] > kls["torchao-int8"]
    assert quantization_of(dense) is None  # the source was never touched


def test_saved_folder_is_weights_plus_recipe_and_reloads_quantized(tiny_folder, tmp_path):
    source = load_any(str(tiny_folder))
    assert source.recipe is None and quantization_of(source.model) is None
    out = save_quantized(source.model, source.tokenizer, "torchao-int8", tmp_path / "q", source=str(tiny_folder))
    files = {p.name for p in out.iterdir()}
    assert RECIPE_FILE in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    assert read_recipe(out)["method"] == "torchao-int8"
    reloaded = load_any(str(out))
    assert quantization_of(reloaded.model) == "torchao-int8" and reloaded.recipe["method"] == "torchao-int8"
    expected = quantize_model(copy.deepcopy(source.model), "torchao-int8")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(IDS).logits, expected(IDS).logits)


def test_cli_quantize_then_bench_and_zeroshot_reload_the_folder(tiny_folder, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "nf4"
    assert main(["quantize", "--model", str(tiny_folder), "--method", "bnb-nf4", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "bnb-nf4" and report["quantized_bytes"] < report["source_weight_bytes"]
    assert main(["bench", "--model", str(out), "--device", "cpu", "--prefill", "32", "--decode", "2", "--prompt", "8",
                 "--repeats", "1", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["quantization"] == "bnb-nf4" and bench["device"].startswith("cpu")
    assert main(["zeroshot", "--model", str(out), "--tasks", "wiki_nextsent", "--limit", "2", "--quiet",
                 "--json"]) == 0
    zs = json.loads(capsys.readouterr().out)
    assert zs["quantization"] == "bnb-nf4" and zs["tasks"]["wiki_nextsent"]["n"] == 2
    # eval applies the recipe too: NF4 numbers differ from the fp32 source's, and KL to it is > 0
    eval_args = ["--windows", "2", "--seq-len", "32", "--quiet", "--json"]
    assert main(["eval", "--model", str(out), "--reference", str(tiny_folder), *eval_args]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(tiny_folder), "--reference", str(tiny_folder), *eval_args]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert quantized["quantization"] == "bnb-nf4" and plain["quantization"] is None
    assert plain["kl_to_reference"] < 1e-6 < quantized["kl_to_reference"]
    assert quantized["perplexity"] != plain["perplexity"]


def test_bad_method_missing_backend_and_requantize_write_nothing(tiny_folder, tmp_path, capsys, monkeypatch):
    from core.cli import main

    out = tmp_path / "never"
    with pytest.raises(SystemExit):  # argparse rejects an unknown method name
        main(["quantize", "--model", str(tiny_folder), "--method", "int3", "--out", str(out)])
    with pytest.raises(QuantizationError, match="Unknown quantization method"):
        check_method("int3")
    with pytest.raises(QuantizationError, match="CPU only"):
        check_method("torch-dynamic-int8", "cuda")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    capsys.readouterr()
    assert main(["quantize", "--model", str(tiny_folder), "--method", "bnb-8bit", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs the 'bitsandbytes' package" in err and "pip install bitsandbytes" in err
    assert not out.exists()
    monkeypatch.undo()

    done = tmp_path / "done"
    assert main(["quantize", "--model", str(tiny_folder), "--method", "torchao-int8", "--out", str(done)]) == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in done.iterdir())
    capsys.readouterr()
    assert main(["quantize", "--model", str(done), "--method", "bnb-8bit", "--out", str(out)]) == 2
    assert "already a quantized folder" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_folder), "--method", "bnb-8bit", "--out", str(done)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in done.iterdir()) == before  # stored run untouched
    assert not out.exists()


def test_quantizing_twice_and_corrupt_recipe_are_clear_errors(tiny_folder, tmp_path):
    q = quantize_model(make_tiny("llama"), "torchao-int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(q, "bnb-8bit")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / RECIPE_FILE).write_text('{"method": "int3"}')
    with pytest.raises(ModelLoadError, match="no known quantization method"):
        load_any(str(bad))


def test_model_too_large_for_memory_is_refused(tiny_folder, monkeypatch):
    import psutil

    from core.quantize import store as quantize

    class Tiny:
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(HFPruneError, match="needs about .* GiB of memory"):
        quantize.load_any(str(tiny_folder))
