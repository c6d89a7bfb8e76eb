"""Measured speed and memory: real timings and sizes on tiny models, FLOP-ratio ideal speed-up for
pruned models, the CLI, and bad settings."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny

from core.measure.speed import SpeedError, SpeedResult, ideal_speedup, measure_speed, pick_device
from core.models.counts import forward_flops_per_token, weight_bytes
from core.quantize.backends import quantize_model

SMALL = dict(prefill_tokens=64, decode_tokens=4, decode_prompt_tokens=8, repeats=3, warmup=1)


def test_measure_speed_reports_measured_numbers_on_cpu():
    model = make_tiny("llama")
    result = measure_speed(model, None, **SMALL)
    assert isinstance(result, SpeedResult)
    assert result.device.startswith("cpu") and result.timer == "time.perf_counter" and result.method == "fp32"
    assert len(result.prefill_ms_all) == 3 and all(t > 0 for t in result.prefill_ms_all)
    assert sorted(result.prefill_ms_all)[1] == pytest.approx(result.prefill_ms, abs=1e-3)  # the median
    assert result.decode_tokens_per_s > 0 and result.decode_ms_per_token == pytest.approx(
        1000 / result.decode_tokens_per_s, rel=1e-2)
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}  # tied weights once
    assert result.weight_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert result.peak_memory_bytes >= result.weight_bytes
    assert result.flops_per_token == forward_flops_per_token(model, 64)
    assert json.loads(json.dumps(result.to_dict()))["params"] == result.params


def test_quantized_model_is_measured_with_its_real_size():
    model = make_tiny("llama", intermediate_size=256)
    dense = measure_speed(model, None, **SMALL)
    q = quantize_model(copy.deepcopy(model), "bnb-nf4")
    result = measure_speed(q, None, **SMALL)
    assert result.method == "bnb-nf4" and result.params == dense.params
    assert result.weight_bytes == weight_bytes(q) < dense.weight_bytes


def test_ideal_speedup_is_the_flop_ratio_of_a_pruned_model():
    from core.models.slicing import prune_mlp_neurons

    model = make_tiny("llama", intermediate_size=64)
    kept = [torch.arange(32) for _ in range(2)]
    pruned = prune_mlp_neurons(model, kept)
    ideal = ideal_speedup(pruned, [64, 64], 512)
    assert ideal == pytest.approx(forward_flops_per_token(model, 512) / forward_flops_per_token(pruned, 512))
    assert ideal > 1.0
    assert ideal_speedup(pruned, None) is None


def test_bad_settings_are_clear_errors():
    model = make_tiny("llama")  # max_position_embeddings 256
    with pytest.raises(SpeedError, match="exceed the model's 256-token context"):
        measure_speed(model, None, prefill_tokens=512, decode_tokens=2, decode_prompt_tokens=8, repeats=1)
    with pytest.raises(SpeedError, match="at least 1"):
        measure_speed(model, None, prefill_tokens=8, decode_tokens=0, repeats=1)
    with pytest.raises(SpeedError, match="Unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SpeedError, match="no CUDA GPU is available"):
            pick_device("cuda")
        assert pick_device("auto").type == "cpu"


def test_cli_bench_reports_device_and_ideal_vs_measured_speedup(tmp_path, capsys, real_tokenizer):
    """A pruned folder: ideal (FLOP) speed-up and the measured one against its dense source."""
    from core.cli import main
    from core.export.hf import save_pruned
    from core.models.slicing import prune_mlp_neurons

    tokenizer = real_tokenizer
    dense = make_tiny("llama", intermediate_size=64)
    dense_dir = tmp_path / "dense"
    dense.save_pretrained(str(dense_dir))
    tokenizer.save_pretrained(str(dense_dir))
    pruned = prune_mlp_neurons(dense, [torch.arange(32) for _ in range(2)])
    save_pruned(pruned, tokenizer, tmp_path / "pruned", {"model": str(dense_dir), "original_intermediate_sizes": [64, 64]})
    assert main(["bench", "--model", str(tmp_path / "pruned"), "--device", "cpu", "--prefill", "64", "--decode", "2",
                 "--prompt", "8", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"].startswith("cpu") and out["ideal_speedup"] > 1.0
    assert out["baseline"]["model"] == str(dense_dir) and out["measured_prefill_speedup"] > 0
    assert out["disk_bytes"] > 0 and out["params"] < out["baseline"]["params"]
    assert main(["bench", "--model", str(tmp_path / "pruned"), "--prefill", "0"]) == 2
    assert "at least 1 token" in capsys.readouterr().err


def test_pareto_front_and_measured_speedups():
    from core.measure.speed import add_measured_speedups
    from core.models.counts import pareto_front

    # sizes (MB) and perplexities: "c" is bigger and worse than "b", so it is off the front
    sizes, ppl = [538, 220, 300, 170], [35.7, 35.9, 40.0, 43.9]
    assert pareto_front(sizes, ppl) == [3, 1, 0]
    assert pareto_front(sizes, [0.5, 0.6, 0.7, 0.4], lower_is_better=False) == [3, 1, 2]
    rows = add_measured_speedups([{"prefill_ms": 100.0}, {"prefill_ms": 80.0}, {"prefill_ms": 0.0}])
    assert [r["measured_speedup"] for r in rows] == [1.0, 1.25, None]
