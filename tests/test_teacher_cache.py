"""The teacher cached once (core.train.teacher_cache): the sparse target (top-k + importance-sampled
tail) is an unbiased estimate of the teacher's distribution, so the sparse KD loss and gradient match
the dense ones in expectation (exactly when the top-k covers the vocabulary), unlike a top-k
truncation; the cache round-trips through its file and is reused; recovery trains on it with the
student alone, from Python and the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny, run_cli

from core.train.loop import SparseLogitDistillation, TrainConfigError, distill_loss
from core.train.teacher_cache import (
    SparseTargets,
    TeacherCacheError,
    TeacherOptions,
    build_sparse_targets,
    cached_sparse_targets,
    sparse_distill_loss,
    sparse_rows,
)


def _dense_target(ids: torch.Tensor, weights: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], vocab, dtype=weights.dtype).scatter_add_(1, ids.long(), weights)


def test_sparse_rows_shapes_and_weights_sum_to_one():
    torch.manual_seed(0)
    logits = torch.randn(5, 40) * 3
    ids, weights, entropy = sparse_rows(logits, 1.0, 4, 6, torch.Generator().manual_seed(0))
    assert ids.shape == weights.shape == (5, 10) and entropy.shape == (5,)
    p = torch.softmax(logits, -1)
    assert torch.allclose(weights.sum(-1), torch.ones(5), atol=1e-5)
    assert torch.equal(ids[:, :4], p.topk(4, -1).indices) and torch.allclose(weights[:, :4], p.topk(4, -1).values)
    assert not (ids[:, 4:, None] == ids[:, None, :4]).any()  # tail draws never repeat a top-k id
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-5)
    # all the mass in the top-k: zero-weight tail slots, still a valid draw
    ids, weights, _ = sparse_rows(torch.tensor([[50.0, 0.0, -50.0]]), 1.0, 3, 2)
    assert weights[0, 3:].abs().max() == 0 and ids.max() < 3


def test_sparse_target_is_unbiased_and_top_k_truncation_is_not():
    torch.manual_seed(1)
    vocab, rows, draws = 30, 3, 4000
    teacher = torch.randn(rows, vocab, dtype=torch.float64) * 1.5
    student = torch.randn(rows, vocab, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([2, -100, 7])
    p = torch.softmax(teacher / 2.0, -1)
    # every draw at once: each row repeated `draws` times, one independent tail sample per copy
    ids, weights, entropy = sparse_rows(teacher.repeat(draws, 1), 2.0, 3, 4, torch.Generator().manual_seed(0))
    weights = weights.double()
    mean_q = _dense_target(ids, weights, vocab).view(draws, rows, vocab).mean(0)
    loss = sparse_distill_loss(student.repeat(draws, 1), ids, weights, entropy.double(), targets.repeat(draws), 2.0,
                               0.7)
    mean_loss = loss.detach().view(draws, rows).mean(0)
    mean_grad, = torch.autograd.grad(loss.sum() / draws, student)
    dense = distill_loss(student, teacher, targets, 2.0, 0.7)
    dense_grad, = torch.autograd.grad(dense.sum(), student)
    assert (mean_q - p).abs().max() < 0.01  # E[q] = p, to sampling error (std ≤ 0.5/sqrt(4·4000))
    assert torch.allclose(mean_loss, dense.detach(), atol=0.02)
    assert (mean_grad - dense_grad).abs().max() < 0.01
    # the biased alternative: top-k only (tail_samples = 0) misses the tail's share of the gradient
    ids, weights, entropy = sparse_rows(teacher, 2.0, 3, 0)
    truncated = sparse_distill_loss(student, ids, weights.double(), entropy.double(), targets, 2.0, 0.7)
    trunc_grad, = torch.autograd.grad(truncated.sum(), student)
    assert (trunc_grad - dense_grad).abs().max() > 5 * (mean_grad - dense_grad).abs().max()


def test_full_top_k_is_exactly_the_dense_objective_on_a_tiny_model():
    model = make_tiny("llama", seed=0)
    windows = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(0))
    vocab = model.config.vocab_size
    for tau, alpha in ((1.0, 1.0), (2.0, 0.5)):
        cache = build_sparse_targets(model, windows, TeacherOptions("cached", top_k=vocab, tail_samples=0), tau=tau,
                                     batch_size=2)
        assert cache.ids.shape == (3, 16, vocab) and cache.entropy.shape == (3, 16) and cache.tokens == 48
        with torch.no_grad():
            teacher_logits = model(input_ids=windows).logits.float().flatten(0, 1)
        student = (teacher_logits + torch.randn_like(teacher_logits)).requires_grad_(True)
        targets = torch.randint(0, vocab, (48,))
        sparse = sparse_distill_loss(student, cache.ids.flatten(0, 1), cache.weights.flatten(0, 1),
                                     cache.entropy.flatten(), targets, tau, alpha)
        dense = distill_loss(student, teacher_logits, targets, tau, alpha)
        assert torch.allclose(sparse, dense, atol=1e-4)
        g_sparse, = torch.autograd.grad(sparse.sum(), student)
        g_dense, = torch.autograd.grad(dense.sum(), student)
        assert torch.allclose(g_sparse, g_dense, atol=1e-6)


def test_cache_round_trip_and_reuse(tmp_path, monkeypatch):
    model = make_tiny("llama", seed=0)
    windows = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    options = TeacherOptions("cached", top_k=8, tail_samples=8, seed=3)
    built = cached_sparse_targets(model, "tiny", windows, options, tmp_path, batch_size=3)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and built.loaded_from is None and built.ids.shape == (4, 16, 16)
    again = SparseTargets.load(files[0])
    for name in ("windows", "ids", "weights", "entropy"):
        assert torch.equal(getattr(again, name), getattr(built, name))
    assert (again.tau, again.top_k, again.tail_samples) == (1.0, 8, 8)

    def refuse(*_a, **_k):
        raise AssertionError("the teacher ran again")
    monkeypatch.setattr("core.train.teacher_cache.build_sparse_targets", refuse)
    reused = cached_sparse_targets(model, "tiny", windows, options, tmp_path)
    assert reused.loaded_from == str(files[0]) and torch.equal(reused.weights, built.weights)
    monkeypatch.undo()
    other = cached_sparse_targets(model, "tiny", windows, options.replace(seed=4), tmp_path)  # other draws
    assert other.loaded_from is None and not torch.equal(other.ids, built.ids)
    assert torch.equal(other.ids[..., :8], built.ids[..., :8])  # the top-k part is exact, not drawn
    (tmp_path / "bad.safetensors").write_bytes(b"not a cache")
    with pytest.raises(TeacherCacheError, match="Could not read the teacher cache"):
        SparseTargets.load(tmp_path / "bad.safetensors")
    with pytest.raises(TrainConfigError, match="temperature 1"):
        from core.train.loop import DistillOptions
        SparseLogitDistillation(built, DistillOptions(tau=2.0))


def test_recover_with_the_cached_teacher_runs_only_the_student(real_tokenizer, tmp_path, monkeypatch):
    from core.methods.recover import RecoverOptions, recover
    from core.models.loading import LoadedModel
    from core.models.slicing import prune_mlp_neurons
    from core.train.loop import TrainOptions

    monkeypatch.setenv("HFPRUNE_CACHE", str(tmp_path / "cache"))
    teacher = LoadedModel(make_tiny("llama", seed=0), real_tokenizer, "tiny-teacher", "")
    kept = [torch.arange(0, 64, 2)] * 2
    source = make_tiny("llama", seed=0)  # the students are cut from a copy: the hook below counts the teacher only
    calls = {"n": 0}
    hook = teacher.model.model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def run():
        student = LoadedModel(prune_mlp_neurons(source, kept), real_tokenizer, "tiny-pruned", "")
        options = RecoverOptions(params="mlp", seq_len=32, heldout_windows=2, heldout_seq_len=32)
        train = TrainOptions(steps=4, lr=3e-3, warmup_steps=0, batch_size=2, eval_every=2)
        return recover(student, teacher, options, train,
                       teacher_options=TeacherOptions("cached", top_k=16, tail_samples=16, windows=6))
    first = run()
    record = first.meta["recovery"]["teacher_logits"]
    assert record["logits"] == "cached" and record["cache_windows"] == 6 and not record["cache_reused"]
    assert first.meta["recovery"]["training_windows"] == 6 and first.train.tokens == 4 * 2 * 32
    assert first.train.final_heldout < first.train.initial_heldout
    teacher_passes = calls["n"]
    second = run()
    assert second.meta["recovery"]["teacher_logits"]["cache_reused"]
    # the second run's teacher ran only for the held-out reference (one pass per held-out batch), never per step
    assert calls["n"] - teacher_passes == 1
    assert second.train.final_heldout == pytest.approx(first.train.final_heldout, rel=1e-5)
    hook.remove()


def test_cli_recover_with_cached_teacher_logits(tmp_path, real_tokenizer):
    teacher = make_tiny("llama", seed=0)
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    out = tmp_path / "rec"
    run = run_cli("recover", "--model", str(folder), "--teacher", str(folder), "--teacher-logits", "cached",
                  "--teacher-windows", "4", "--teacher-top-k", "8", "--teacher-tail-samples", "8", "--steps", "2",
                  "--batch-size", "2", "--seq-len", "32", "--heldout-windows", "2", "--heldout-seq-len", "32",
                  "--out", str(out), "--quiet")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["teacher_logits"]["logits"] == "cached" and info["teacher_logits"]["cache_windows"] == 4
    assert info["steps"] == 2 and (out / "config.json").exists()
    run = run_cli("recover", "--model", str(folder), "--teacher-logits", "sometimes", "--steps", "1",
                  "--out", str(tmp_path / "bad"))
    assert run.returncode != 0 and "invalid choice" in run.stderr and not (tmp_path / "bad").exists()


def test_the_recover_tab_offers_the_cached_teacher(tiny_services, monkeypatch):
    """The Recover tab's choice reaches the engine through Services.recover and is stored with the run."""
    import inspect

    from hfprune_ui.tabs import recover as tab

    services, session, _folder = tiny_services
    monkeypatch.setenv("HFPRUNE_CACHE", str(_folder.parent / "cache"))
    assert [value for _label, value in tab.TEACHER_CHOICES] == list(TeacherOptions.ui("logits")["choices"])
    assert inspect.signature(tab.make_start(services)).parameters["teacher_logits"].default == "live"
    services.prune(session, "entropy", 0.5, "uniform", 1, "cut")
    variant, _ = services.recover(session, "cut", steps=2, batch_size=2, seq_len=32, eval_every=1,
                                  teacher_logits="cached")
    record = variant.meta["recovery"]
    assert record["teacher_logits"]["logits"] == "cached" and record["steps"] == 2
    assert services.runs.load(variant.run_id).config["teacher"]["logits"] == "cached"
    assert tab.teacher_words(record).startswith("cached teacher, built in")
    assert tab.teacher_words({}) == "live teacher"
