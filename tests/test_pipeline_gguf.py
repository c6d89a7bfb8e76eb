"""P→Q→D in llama.cpp's CPU formats (issue 22 §4): the GGUF fake quantisers reproduce what the GGUF file
stores (weights read back with gguf's reader equal the fake-quantised ones), the pipeline with a GGUF format
writes a .gguf that llama.cpp loads and whose logits the returned (fake-quantised) model predicts, and bad
input — a width that does not fill the blocks, llama.cpp missing — is one sentence with nothing written.
Tiny random Llamas with a 400-token vocabulary (tests/test_llamacpp.py) keep it fast."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from test_llamacpp import llama_logits, needs_llama, small_tokenizer, tiny, torch_logits, windows

from conftest import run_cli

from core import metrics


def _file_tensors(path) -> dict:
    """name → (GGML type name, dequantised fp32 tensor in torch's (rows, K) shape) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, torch.from_numpy(values.copy()).reshape(tuple(reversed(t.shape.tolist()))))
    return out


@pytest.mark.parametrize("name, ggml", [("gguf-q8_0", "Q8_0"), ("gguf-q4_0", "Q4_0"), ("gguf-q5_0", "Q5_0")])
def test_fake_quantised_weights_equal_the_files_dequantised_weights(tmp_path, name, ggml):
    from core.export.gguf import permute_qk
    from core.quantize.fake import FORMATS, GGUFBlockFakeQuantizer, convert_gguf, fake_quantize

    model = tiny(intermediate_size=96)
    fq = fake_quantize(copy.deepcopy(model), FORMATS[name])
    path = convert_gguf(copy.deepcopy(fq), small_tokenizer(), FORMATS[name], tmp_path / "m.gguf")
    stored = _file_tensors(path)
    layer = fq.model.layers[1]
    checks = {"blk.1.ffn_down.weight": layer.mlp.down_proj, "blk.1.ffn_gate.weight": layer.mlp.gate_proj,
              "blk.1.attn_output.weight": layer.self_attn.o_proj, "token_embd.weight": fq.lm_head}
    for key, linear in checks.items():
        kind, values = stored[key]
        assert kind == ggml, key  # no silent F16 fallback
        assert isinstance(linear.weight_fake_quantizer, GGUFBlockFakeQuantizer)
        fake = linear.weight_fake_quantizer(linear.weight).detach()
        assert fake.shape == values.shape
        torch.testing.assert_close(fake, values, rtol=0, atol=1e-7)
        assert not torch.equal(fake, linear.weight.detach())  # the fake quantisation did round
    heads = fq.config.num_attention_heads
    q = layer.self_attn.q_proj
    torch.testing.assert_close(permute_qk(q.weight_fake_quantizer(q.weight).detach(), heads),
                               stored["blk.1.attn_q.weight"][1], rtol=0, atol=1e-7)
    ids = torch.tensor([[3, 17, 250]])  # the embedding lookup reads the file's rows too
    looked_up = fq.model.embed_tokens(ids)[0].detach()
    torch.testing.assert_close(looked_up, stored["token_embd.weight"][1][ids[0]], rtol=0, atol=1e-7)
    assert stored["blk.1.attn_norm.weight"][0] == "F32"
    assert fq.lm_head.weight is fq.model.embed_tokens.weight  # tied embeddings stay tied


def test_gguf_quantiser_is_straight_through_and_refuses_unaligned_rows():
    from core.quantize.fake import FORMATS, GGUFBlockError, GGUFBlockFakeQuantizer, fake_quantize, unfake

    w = torch.randn(4, 64, requires_grad=True)
    GGUFBlockFakeQuantizer("q4_0")(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    model = tiny(intermediate_size=80)  # down_proj rows of 80 do not fill blocks of 32
    with pytest.raises(GGUFBlockError, match=r"'model.layers.0.mlp.down_proj' has 80 inputs .*round-to 32"):
        fake_quantize(model, FORMATS["gguf-q4_0"])
    model = tiny(intermediate_size=64)
    plain = torch_logits(model, windows(len(small_tokenizer())))
    fake_quantize(model, FORMATS["gguf-q4_0"])
    assert not torch.allclose(torch_logits(model, windows(len(small_tokenizer()))), plain)
    unfake(model)
    torch.testing.assert_close(torch_logits(model, windows(len(small_tokenizer()))), plain)  # hooks and fake linears gone


def _groups():
    from core.data.text import CalibrationOptions
    from core.methods.pipeline import MeasureOptions
    from core.train.loop import TrainOptions

    return {"calibration": CalibrationOptions(samples=4, seq_len=32, batch_size=2),
            "train_options": TrainOptions(steps=2, lr=1e-3, warmup_steps=0, batch_size=2, eval_every=0),
            "measure": MeasureOptions(eval_windows=2, eval_seq_len=32, prefill_tokens=32, decode_tokens=4,
                                      speed_repeats=1, zeroshot_limit=0)}


@needs_llama
def test_pipeline_in_q4_0_writes_a_gguf_llama_cpp_runs(tmp_path):
    from core.measure.llamacpp import gguf_counts
    from core.methods.pipeline import PipelineOptions, run_pipeline
    from core.models.loading import LoadedModel
    from core.quantize.fake import unfake

    dense = LoadedModel(tiny(intermediate_size=128), small_tokenizer(), "tiny-llama", "")
    result = run_pipeline(dense, PipelineOptions(order="pqd", ratio=0.25, quant="gguf-q4_0", round_to=32,
                                                 heldout_windows=2), out=tmp_path / "run", **_groups())
    files = list(result.out.glob("*.gguf"))
    assert [f.name for f in files] == ["model-Q4_0.gguf"]
    counts = gguf_counts(files[0])
    assert counts.widths == [96, 96] and counts.tensor_types == {"Q4_0": 15}  # 7 matrices × 2 layers + embedding
    row = result.row
    assert row["engine"] == "llama.cpp" and row["gguf_type"] == "q4_0" and row["format"] == "gguf-q4_0"
    assert 0 < row["kl_to_dense"] < 5 and row["prefill_speedup"] > 0 and row["prefill_speedup_same_format"] > 0
    assert row["ideal_speedup"] > 1  # 25 % of the MLP gone, FLOPs counted from the files
    assert result.record["stages"][2]["qat"] is True  # distilled in the format
    # the returned model is the fake-quantised one: it predicts llama.cpp's logits of the file
    ids = windows(len(small_tokenizer()))
    served = metrics.log_probs(llama_logits(files[0], ids))
    fake = metrics.log_probs(torch_logits(result.model, ids))
    plain = metrics.log_probs(torch_logits(unfake(copy.deepcopy(result.model)), ids))
    kl_fake, kl_plain = float(metrics.kl(served, fake).mean()), float(metrics.kl(served, plain).mean())
    # what is left (~0.001-0.002 nats on this sharp random model) is llama.cpp's own rounding (F16 KV cache, its
    # kernels' summation order); the float weights are ~0.5 nats away from the file
    assert kl_fake < 5e-3 and kl_fake < kl_plain / 50, (kl_fake, kl_plain)


def test_pipeline_gguf_bad_input_is_one_sentence_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from core.cli import main
    from core.errors import HFPruneError
    from core.methods.pipeline import PipelineError, PipelineOptions, run_pipeline
    from core.models.loading import LoadedModel

    with pytest.raises(PipelineError, match="blocks of 32, so pruned widths must be multiples of 32, and "
                                            "--round-to 16 is not"):
        PipelineOptions(quant="gguf-q4_0", round_to=16)
    out = tmp_path / "out"
    rc = main(["pipeline", "--quant", "gguf-q4_0", "--round-to", "48", "--steps", "2", "--out", str(out), "--quiet"])
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert rc != 0 and len(lines) == 1 and "--round-to 48 is not" in lines[0] and not out.exists()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # llama.cpp not installed: import fails
    rc = main(["pipeline", "--quant", "gguf-q8_0", "--steps", "2", "--out", str(out), "--quiet"])
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert rc != 0 and len(lines) == 1 and "llama-cpp-python" in lines[0] and not out.exists()
    dense = LoadedModel(tiny(intermediate_size=128), small_tokenizer(), "tiny-llama", "")
    with pytest.raises(HFPruneError, match="llama-cpp-python"):
        run_pipeline(dense, PipelineOptions(quant="gguf-q4_0"), out=out, **_groups())
    assert not out.exists()


def test_cli_pipeline_gguf_in_a_fresh_process(tmp_path):
    out = tmp_path / "out"
    result = run_cli("pipeline", "--quant", "gguf-q4_0", "--round-to", "16", "--out", str(out), fresh=True)
    assert result.returncode != 0 and "error: The gguf-q4_0 format stores rows in blocks of 32" in result.stderr
    assert not out.exists()


@needs_llama
def test_ablation_in_q8_0_measures_every_row_in_llama_cpp(tmp_path):
    from core.methods.pipeline import PipelineOptions, run_ablation
    from core.models.loading import LoadedModel
    from core.runs import RunStore

    dense = LoadedModel(tiny(intermediate_size=128), small_tokenizer(), "tiny-llama", "")
    kw = dict(out_root=tmp_path / "abl", orders=("qpd",), baselines=("p",), store=RunStore(tmp_path / "runs"),
              **_groups())
    result = run_ablation(dense, PipelineOptions(quant="gguf-q8_0", ratio=0.25), **kw)
    by = {r["order"]: r for r in result.rows}
    assert list(by) == ["", "p", "qpd"] and all(r["engine"] == "llama.cpp" for r in result.rows)
    assert by[""]["gguf_type"] == "f16" and by[""]["kl_to_dense"] == 0 and by[""].get("prefill_speedup") is None
    assert by["p"]["gguf_type"] == "f16" and by["qpd"]["gguf_type"] == "q8_0"  # no q stage: the float file
    assert by["qpd"]["widths"] == [96, 96] and by["qpd"]["kl_to_dense"] > 0
    assert "dense F16 (llama.cpp)" in result.table and "| gguf-q8_0 |" in result.table
    assert sorted(p.name for p in (tmp_path / "abl" / "dense-gguf").iterdir()) == ["dense-F16.gguf", "dense-Q8_0.gguf"]
    again = run_ablation(dense, PipelineOptions(quant="gguf-q8_0", ratio=0.25), **kw)
    assert all(r["resumed"] for r in again.rows)
