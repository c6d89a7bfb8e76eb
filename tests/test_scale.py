"""Scale: data-parallel scoring under torchrun (gloo, 2 processes), gradient checkpointing in the
scorer, the memory estimate and its refusal, and accelerate's device_map on the load path."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_tiny

from core.importance.criteria import ScoreOptions, get_criterion

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 <args>`` on the CPU (gloo), offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout, check=False)


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = 1e-5) -> None:
    """Equal within ``rtol`` relative to each layer's largest score."""
    for g, w in zip(got, want, strict=True):
        scale = float(w.abs().max())
        assert scale > 0
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)


def test_two_gloo_processes_give_the_single_process_scores(tmp_path):
    """Every criterion's aggregation survives sharding + one all_reduce(SUM): sums (entropy, CE),
    per-window squares (fisher sq_sum), the AMP mean (abs_sum divides by the global N), sampled labels
    (fisher: keyed by window, not by batch or rank), forward statistics under a sqrt or a variance
    (wanda, fluctuation) and weights-only criteria (not reduced)."""
    sys.path.insert(0, HERE)
    from scale_dp_worker import CASES, score_all

    out = tmp_path / "dp.pt"
    run = torchrun(os.path.join(HERE, "scale_dp_worker.py"), str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    parallel = torch.load(out)
    assert parallel["world"] == 2
    single = score_all(data_parallel=False)
    for name in CASES:
        assert_same(parallel["scores"][name], single[name])


def test_two_gloo_processes_train_like_one_process(tmp_path):
    """core.train under torchrun (DistributedDataParallel gradient averaging, each rank half of the same
    global batch): the first steps' losses and parameters equal the single-process run, for MLP-only and
    full (tied embeddings) parameter sets, with and without gradient accumulation."""
    sys.path.insert(0, HERE)
    from scale_train_worker import run_all

    out = tmp_path / "train.pt"
    run = torchrun(os.path.join(HERE, "scale_train_worker.py"), str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    parallel, single = torch.load(out), run_all()
    for key, want in single.items():
        got = parallel[key]
        assert got["tokens"] == want["tokens"]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(got["heldout"]), torch.tensor(want["heldout"]), rtol=1e-5, atol=0)
        for name, value in want["params"].items():
            torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-6)


def test_fisher_labels_do_not_depend_on_the_batch_size():
    model = make_tiny("qwen2", intermediate_size=32)
    windows = torch.randint(0, 49152, (5, 12), generator=torch.Generator().manual_seed(4))
    fisher = get_criterion("fisher")
    one = fisher(model, windows, ScoreOptions(batch_size=1, progress=False, seed=3))
    five = fisher(model, windows, ScoreOptions(batch_size=5, progress=False, seed=3))
    assert_same(five, one)
    other_seed = fisher(model, windows, ScoreOptions(batch_size=5, progress=False, seed=4))
    assert not torch.allclose(other_seed[0], one[0])


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_gradient_checkpointing_keeps_the_scores(arch):
    """The score tap saves ``a`` through autograd, so checkpointing recomputes it and the scores stay."""
    model = make_tiny(arch, intermediate_size=32, layers=3)
    windows = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(6))
    for name in ("entropy", "self_distill"):
        plain = get_criterion(name)(model, windows, ScoreOptions(batch_size=2, progress=False))
        ckpt = get_criterion(name)(model, windows, ScoreOptions(batch_size=2, progress=False, grad_checkpointing=True))
        assert_same(ckpt, plain)
    assert not model.training and all(not m.training for m in model.modules())
    assert not getattr(model.model, "gradient_checkpointing", False)


def _saved_stack_bytes(model, windows, checkpointing: bool) -> int:
    """Bytes autograd keeps from the decoder stack's forward for the scorer's backward (unique storages)."""
    from core.importance import taylor as scoring

    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    original = scoring.base_forward

    def counted(model_, ids):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return original(model_, ids)

    scoring.base_forward = counted
    try:
        get_criterion("entropy")(model, windows, ScoreOptions(batch_size=windows.shape[0], progress=False,
                                                              grad_checkpointing=checkpointing))
    finally:
        scoring.base_forward = original
    return sum(seen.values())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_memory_estimate_bounds_what_autograd_keeps(arch):
    from core.models.placement import estimate_scoring_memory, weight_bytes

    model = make_tiny(arch, intermediate_size=256, layers=4)
    windows = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(1))
    measured = _saved_stack_bytes(model, windows, checkpointing=False)
    estimate = estimate_scoring_memory(model, batch_size=2, seq_len=64)
    assert measured <= estimate.stack <= 2 * measured, (measured, estimate.stack)
    assert estimate.weights == weight_bytes(model) == (sum(p.numel() * 4 for p in model.parameters())  # tied once
                                                       + sum(b.numel() * b.element_size() for b in model.buffers()))
    kept = _saved_stack_bytes(model, windows, checkpointing=True)
    ckpt = estimate_scoring_memory(model, batch_size=2, seq_len=64, grad_checkpointing=True)
    assert kept <= ckpt.stack < estimate.stack and kept < measured / 10
    assert "GiB for weights + activations" in estimate.text() and "batch 2 x 64 tokens" in estimate.text()


def test_llama7b_shaped_estimate_is_plausible():
    """LLaMA-2-7B in bf16 at 1 × 1024: 12.6 GiB of weights; activations well under the weights with
    checkpointing and of the same order without."""
    from transformers import LlamaConfig

    from core.models.placement import estimate_scoring_memory

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    kwargs = {"config": config, "weights": 6_738_415_616 * 2, "dtype": torch.bfloat16, "batch_size": 1, "seq_len": 1024}
    plain = estimate_scoring_memory(None, **kwargs)
    ckpt = estimate_scoring_memory(None, grad_checkpointing=True, **kwargs)
    assert 12.5 < plain.weights / 2**30 < 12.6
    assert ckpt.activations < 0.1 * ckpt.weights < plain.activations < 1.5 * plain.weights


def test_too_little_memory_is_one_sentence_and_writes_nothing(tmp_path, monkeypatch, capsys, real_tokenizer):
    from core.cli import main
    from core.models import placement

    folder = tmp_path / "tiny"
    make_tiny("llama", intermediate_size=32).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    monkeypatch.setattr(placement, "free_bytes", lambda device: 2**20)  # 1 MiB free
    out = tmp_path / "scores.safetensors"
    code = main(["score", "--model", str(folder), "--samples", "2", "--seq-len", "32", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "GiB for weights + activations" in line[0] and "--grad-checkpointing" in line[0]
    assert "[hfprune] memory estimate: ~" in err
    # --no-memory-check runs anyway
    assert main(["score", "--model", str(folder), "--samples", "2", "--seq-len", "32", "--out", str(out), "--quiet",
                 "--no-memory-check"]) == 0 and out.exists()


def test_torchrun_cli_score_matches_single_process(tmp_path, real_tokenizer):
    """``torchrun --nproc_per_node 2 -m core score``: rank 0 alone writes and prints; same scores as
    one process scoring the same calibration windows."""
    from core.methods.oneshot import ScoreResult, score_model
    from core.models.loading import load_model

    folder = tmp_path / "tiny"
    make_tiny("llama", intermediate_size=32).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    run = torchrun("-m", "core", "score", "--model", str(folder), "--samples", "5", "--seq-len", "32",
                   "--batch-size", "2", "--quiet", "--out", str(tmp_path / "two.safetensors"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count('"out"') == 1  # one JSON report, from rank 0
    assert run.stderr.count("[hfprune] memory estimate") == 1
    two = ScoreResult.load(tmp_path / "two.safetensors")
    assert two.config["processes"] == 2
    one = score_model(load_model(str(folder)), "entropy", samples=5, seq_len=32, batch_size=2, progress=False)
    assert one.config["processes"] == 1
    assert_same(two.scores, one.scores)


def test_device_map_auto_loads_and_scores_on_a_cpu_only_machine(tmp_path, real_tokenizer):
    """accelerate's dispatch path runs (everything lands on the CPU here); scores equal a plain load."""
    from core.models.loading import load_model

    folder = tmp_path / "tiny"
    make_tiny("llama", intermediate_size=32).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    windows = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(2))
    plain = load_model(str(folder))
    mapped = load_model(str(folder), device_map="auto")
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    options = ScoreOptions(batch_size=2, progress=False)
    assert_same(get_criterion("entropy")(mapped.model, windows, options),
                get_criterion("entropy")(plain.model, windows, options))


def test_placement_options_refuse_impossible_choices(monkeypatch):
    from core.models.placement import PlacementError, PlacementOptions

    with pytest.raises(PlacementError, match="cannot be combined"):
        PlacementOptions(device="cpu", device_map="auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(PlacementError, match="torchrun"):
        PlacementOptions(device_map="auto")
    if not torch.cuda.is_available():
        monkeypatch.delenv("WORLD_SIZE")
        with pytest.raises(PlacementError, match="CUDA is not available"):
            PlacementOptions(device="cuda")
        assert PlacementOptions().resolve_dtype() == torch.float32
