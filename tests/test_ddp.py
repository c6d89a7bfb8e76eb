"""DDP (core.ddp) and the training-loop hooks it uses (core.train), on tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn


class _Toy(nn.Module):
    """w descends (w − 3)²; lam has d loss / d lam = 1 and is trained by ascent."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.lam = nn.Parameter(torch.zeros(()))


class _ToyObjective:
    name, heldout_name = "toy", "loss"

    def __init__(self):
        self.progress: list[float] = []

    def needs_teacher(self) -> bool:
        return False

    def forward_backward(self, student, teacher, batch, state):
        from core.train import LossReport

        self.progress.append(state.progress)
        loss = (student.w - 3).pow(2).sum() + student.lam
        (loss * state.scale).backward()
        return LossReport(float(loss.detach()), int(batch.numel()))

    def heldout(self, student, teacher, windows, batch_size, stop):
        return float((student.w - 3).pow(2).sum())


def test_train_loop_ascent_constant_lr_and_clip_exclusion(monkeypatch):
    from core.train import ParamSet, TrainOptions, train

    toy = _Toy()
    clipped: list[list[int]] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        clipped.append([id(p) for p in params])
        return real_clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    objective = _ToyObjective()
    params = ParamSet("toy", [("w", toy.w), ("lam", toy.lam)], lr_scale={"lam": 2.0},
                      options={"lam": {"maximize": True, "clip": False, "schedule": False}})
    options = TrainOptions(steps=4, lr=0.01, warmup_steps=4, min_lr_ratio=0.0, batch_size=1, eval_every=0,
                           keep_best=False)
    train(toy, None, objective, torch.zeros(4, 3, dtype=torch.long), params, options)
    assert objective.progress == [0.0, 0.25, 0.5, 0.75]  # the annealing schedules read this
    # ascent with a constant lr of 2 × 0.01: Adam's first steps on a constant gradient are ≈ lr each
    assert toy.lam.item() == pytest.approx(4 * 0.02, rel=1e-3)
    # w follows warm-up × cosine: much less than 4 full steps of 0.01
    assert 0 < toy.w[0].item() < 0.02
    assert clipped and all(ids == [id(toy.w)] for ids in clipped)
