"""Run under torchrun by tests/test_scale.py (or in one process): a few steps of logit distillation
of a tiny Llama with core.train, saving the trainable parameters and the loss curve to argv[1]."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from core import distributed
from core.methods.recover import param_set
from core.train.loop import DistillOptions, LogitDistillation, TrainOptions, train

VOCAB = 512
DATA = torch.randint(0, VOCAB, (16, 16), generator=torch.Generator().manual_seed(3))


def tiny(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.2)
    return model


def run(which: str, accumulate: int) -> dict:
    student, teacher = tiny(0), tiny(1)
    params = param_set(student, which)
    options = TrainOptions(steps=3, batch_size=4, accumulate=accumulate, lr=1e-3, warmup_steps=0, eval_every=2,
                           keep_best=True, grad_clip=1.0, seed=0)
    result = train(student, teacher, LogitDistillation(DistillOptions(alpha=0.5, tau=2.0)), DATA, params, options,
                   heldout=DATA[:2])
    return {"losses": [c["loss"] for c in result.curve[1:]], "tokens": result.tokens,
            "heldout": [c["heldout"] for c in result.curve if c["heldout"] is not None],
            "params": {n: p.detach().clone() for n, p in params.named}}


def run_all() -> dict:
    return {f"{which}-acc{acc}": run(which, acc) for which, acc in (("mlp", 2), ("full", 1))}


def main() -> None:
    with distributed.process_group() as parallel:
        assert parallel and distributed.world() == 2, "run me with torchrun --nproc_per_node 2"
        out = run_all()
        if distributed.is_main():
            torch.save(out, sys.argv[1])


if __name__ == "__main__":
    main()
