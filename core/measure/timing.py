"""Rough wall-time estimates for the long jobs, shown before they start.

Everything is scaled from the forward time per token of the model on this machine
(:func:`seconds_per_token`) and, for decoding, the time of one KV-cached one-token step
(:func:`seconds_per_decode_step`), both timed on the spot — short probes, re-run when the estimate is
asked for again (``Services`` keeps each a few seconds), so a machine busy with other work shows a
longer estimate; the job-specific factors (how many forwards a job runs, how
much of the model each runs through) come from the algorithms and were checked against measured
runs on SmolLM2-135M (``benchmarks/dashboard.py``). Estimates are "about" figures, typically within
a factor of 1.5; the running job's progress line then shows the real time left.

    per_token = seconds_per_token(loaded.model)
    adaptive_seconds(per_token, layers=30, halvings=4, heldout_tokens=128)
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from core.prune.adaptive import expected_probes

# forward + backward of a Taylor criterion costs about 3 forwards; a forward-only criterion 1
PASS_COST = {"weights only": 0.0, "forward": 1.0, "forward+backward": 3.0, "forward+backward+teacher": 4.0}
PARTIAL_FORWARD = 0.6  # an adaptive probe restarts at its layer: on average about this share of a full forward


@torch.no_grad()
def seconds_per_token(model: nn.Module, seq_len: int = 64, batch: int = 2, repeats: int = 3,
                      warmup: int = 1, min_seconds: float = 0.0, max_repeats: int = 20) -> float:
    """Forward time per token (no grad): the mean of at least ``repeats`` timed forwards of ``batch`` ×
    ``seq_len`` random token ids — more, up to ``max_repeats``, until ``min_seconds`` have been timed —
    after ``warmup`` untimed ones. Measured now, so it includes the machine's load; the mean rather than
    the median because a job on a machine whose load comes in bursts runs at its average pace."""
    model.eval()
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(warmup):
        model(input_ids=ids, use_cache=False)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.mean(times) / (batch * seq_len)


@torch.no_grad()
def seconds_per_decode_step(model: nn.Module, prompt_tokens: int = 32, steps: int = 3, warmup: int = 1,
                            min_seconds: float = 0.0, max_steps: int = 64) -> float:
    """Time of one greedy KV-cached decode step of one token (no grad) after a ``prompt_tokens`` prompt:
    the mean of at least ``steps`` timed steps — more, up to ``max_steps``, until ``min_seconds`` have been
    timed — after ``warmup`` untimed ones. A step reads every weight for one token, so on a CPU it costs
    many tokens' worth of a batched forward (:func:`seconds_per_token`), and that ratio moves with the
    machine's load; measured now, like it."""
    model.eval()
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    times: list[float] = []
    done = 0
    while done < warmup + steps or (sum(times) < min_seconds and len(times) < max_steps):
        start = time.perf_counter()
        step = model(input_ids=token, past_key_values=cache, use_cache=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if done >= warmup:
            times.append(time.perf_counter() - start)
        cache, token = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)
        done += 1
    return statistics.mean(times)


def scoring_seconds(per_token: float, tokens: int, cost: str) -> float:
    """One criterion on ``tokens`` calibration tokens (``cost``: the criterion's cost label)."""
    return per_token * tokens * PASS_COST.get(cost, 3.0)


def adaptive_seconds(per_token: float, layers: int, halvings: int, heldout_tokens: int,
                     sequential: bool = False) -> float:
    """The adaptive width search: a dense pass plus its masked probes (:func:`core.adaptive.expected_probes`)
    on the held-out slice."""
    probes = expected_probes(layers, halvings, "sequential" if sequential else "independent")
    return per_token * heldout_tokens * (1.0 + probes * PARTIAL_FORWARD)


def refit_seconds(per_token: float, compensation_tokens: int) -> float:
    """The least-squares refit of every down_proj: the dense model over its calibration tokens while the
    statistics are gathered (about two forwards' worth), then a small solve per layer."""
    return per_token * 2 * compensation_tokens


def evaluation_seconds(per_token: float, eval_tokens: int, models: int = 1) -> float:
    """``models`` models (a variant and its dense reference: 2) over ``eval_tokens`` held-out tokens."""
    return per_token * models * eval_tokens


def sweep_seconds(per_token: float, rows: int, eval_tokens: int, compensation_tokens: int = 0) -> float:
    """A fidelity sweep: per row the pruned model and the dense reference on the evaluation tokens,
    plus, with compensation, one pass over its calibration tokens for the statistics."""
    return per_token * (rows * 2 * eval_tokens + compensation_tokens)


def speed_seconds(per_token: float, models: int, prefill_tokens: int, decode_tokens: int, repeats: int,
                  prompt_tokens: int = 128, per_step: float | None = None) -> float:
    """Timing ``models`` models: (warm-up + repeats) × (one prefill + a prompt + ``decode_tokens`` single-token
    steps of ``per_step`` seconds each (:func:`seconds_per_decode_step`; unknown: 8 batched tokens' worth))."""
    step = per_step if per_step is not None else 8 * per_token
    per_round = per_token * (prefill_tokens + prompt_tokens) + step * decode_tokens
    return models * (1 + repeats) * per_round


def budgeted_speed_seconds(per_token: float, prefill_tokens: int, decode_tokens: int, budget_s: float,
                           min_repeats: int = 3, prompt_tokens: int = 128, per_step: float | None = None) -> float:
    """One model's budgeted speed measurement (``core.measure.speed``): its ``budget_s``, or longer when
    the warm-up and the ``min_repeats`` repeats every timing runs take more; with no budget (0) that
    least time (the repeats may go on past it until the spread is known)."""
    floor = speed_seconds(per_token, 1, prefill_tokens, decode_tokens, min_repeats, prompt_tokens, per_step)
    return max(float(budget_s), floor)


def zeroshot_seconds(per_token: float, models: int, items: int, choices: int = 4, tokens_per_choice: int = 64) -> float:
    """lm-eval log-likelihoods: every choice of every item is one forward of its context + continuation."""
    return per_token * models * items * choices * tokens_per_choice


RECOVERY_OVERHEAD_TOKENS = 8 * 128 * 4  # a recovery's held-out checks before and after, teacher and student


def heal_parts(per_token: float, compensation_tokens: int, minutes: float, eval_tokens: int) -> list[float]:
    """The Tour's healing step in its four parts, seconds each: measuring the cut, the least-squares refit
    and its measurement, the recovery with its held-out checks, measuring the recovered model (what a
    progress bar weighs its steps by)."""
    measuring = evaluation_seconds(per_token, eval_tokens)
    return [measuring, refit_seconds(per_token, compensation_tokens) + measuring,
            60 * minutes + per_token * RECOVERY_OVERHEAD_TOKENS, measuring]


def heal_seconds(per_token: float, compensation_tokens: int, minutes: float, eval_tokens: int, models: int) -> float:
    """The Tour's healing step: a least-squares refit (the dense model over its calibration tokens,
    about twice a forward with the statistics), a recovery of ``minutes`` plus its held-out checks, and
    ``models`` models measured on ``eval_tokens`` held-out tokens."""
    return (refit_seconds(per_token, compensation_tokens) + per_token * RECOVERY_OVERHEAD_TOKENS
            + evaluation_seconds(per_token, eval_tokens, models) + 60 * minutes)
