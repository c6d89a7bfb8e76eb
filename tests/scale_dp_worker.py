"""Run under torchrun by tests/test_scale.py: score a tiny model data-parallel with several criteria
and let rank 0 save the scores (``torch.save`` of plain tensors) to argv[1]."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from core import distributed
from core.importance.criteria import ScoreOptions, get_criterion

CASES = {  # name → (criterion, params)
    "entropy": ("entropy", {}),
    "fisher_sq_sum": ("fisher", {}),
    "fisher_abs_sum": ("fisher", {"aggregate": "abs_sum"}),
    "self_distill": ("self_distill", {}),
    "wanda": ("wanda", {}),
    "fluctuation": ("fluctuation", {}),
    "magnitude": ("magnitude", {}),
}
VOCAB = 512  # a small vocabulary keeps the 2-process run quick; the scoring code does not care
WINDOWS = torch.randint(0, VOCAB, (7, 16), generator=torch.Generator().manual_seed(5))  # odd N: uneven shards


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.2)
    return model


def score_all(data_parallel: bool) -> dict[str, list[torch.Tensor]]:
    model = tiny_model()
    out = {}
    for name, (criterion, params) in CASES.items():
        options = ScoreOptions(batch_size=2, progress=False, seed=1, data_parallel=data_parallel)
        out[name] = get_criterion(criterion, **params)(model, WINDOWS, options)
    return out


def main() -> None:
    with distributed.process_group() as parallel:
        assert parallel and distributed.world() == 2, "run me with torchrun --nproc_per_node 2"
        scores = score_all(data_parallel=True)
        if distributed.is_main():
            torch.save({"world": distributed.world(), "scores": scores}, sys.argv[1])


if __name__ == "__main__":
    main()
