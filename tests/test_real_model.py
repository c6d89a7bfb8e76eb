"""On the embedded SmolLM2-135M: scores differ between criteria yet agree broadly, both Taylor
criteria beat random pruning on fidelity, and a pruned checkpoint reloads with the same logits."""
import pytest
import torch
from scipy.stats import spearmanr

from core.data.text import evaluation_windows
from core.export.hf import save_pruned
from core.measure.evaluate import evaluate
from core.methods.oneshot import CompensationOptions, prune_with_scores, score_model
from core.models.adapters import mlp_widths

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def scored(real):
    return {name: score_model(real, name, samples=8, seq_len=64, progress=False)
            for name in ("entropy", "cross_entropy", "random")}


def test_real_model_shape(real):
    assert real.model.config.model_type == "llama"
    assert mlp_widths(real.model) == [1536] * 30
    assert sum(p.numel() for p in real.model.parameters()) == 134_515_008


def test_entropy_and_cross_entropy_rank_differently_but_correlate(scored):
    rhos = [spearmanr(a.numpy(), b.numpy()).statistic
            for a, b in zip(scored["entropy"].scores, scored["cross_entropy"].scores)]
    assert len(rhos) == 30
    assert all(r < 0.995 for r in rhos), "entropy and cross-entropy scores should not rank identically"
    assert sorted(rhos)[15] > 0.6, f"median per-layer Spearman too low: {sorted(rhos)[15]:.3f}"
    assert all(torch.isfinite(s).all() and s.sum() > 0 for s in scored["entropy"].scores)


def test_taylor_criteria_beat_random_at_30_percent(real, scored):
    windows = evaluation_windows(real.tokenizer, "wiki", 4, 64)
    kl = {}
    for name, result in scored.items():
        pruned = prune_with_scores(real, result, 0.3, compensation=CompensationOptions("none"))  # the criteria alone
        kl[name] = evaluate(pruned.model, windows, real.model, progress=False).kl_to_reference
    assert kl["entropy"] < 0.5 * kl["random"] and kl["cross_entropy"] < 0.5 * kl["random"], kl


def test_real_pruned_checkpoint_reloads_exactly(real, scored, tmp_path):
    from transformers import AutoModelForCausalLM

    # the default least-squares refit (on fewer windows here, for time) reloads exactly too
    pruned = prune_with_scores(real, scored["entropy"], 0.2, compensation=CompensationOptions(samples=8))
    out = save_pruned(pruned.model, real.tokenizer, tmp_path / "smol-pruned", pruned.meta)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.intermediate_size == 1229
    ids = evaluation_windows(real.tokenizer, "wiki", 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_qwen2_view_of_real_weights_has_identical_logits(real):
    from core.models.loading import load_model

    qwen = load_model("smollm2-135m-qwen2")
    assert qwen.model.config.model_type == "qwen2"
    ids = evaluation_windows(real.tokenizer, "wiki", 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(qwen.model(input_ids=ids).logits, real.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_gguf_file_path_loads_same_weights(real):
    from core.models.loading import EMBEDDED, load_model

    gguf = EMBEDDED["smollm2-135m"].locate()
    direct = load_model(str(gguf))
    assert direct.model.hf_quantizer is None and not hasattr(direct.model.config, "quantization_config")
    ids = evaluation_windows(real.tokenizer, "wiki", 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(direct.model(input_ids=ids).logits, real.model(input_ids=ids).logits)
