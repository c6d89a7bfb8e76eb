"""Data parallelism through ``torch.distributed``: the one home for the process group, ranks,
sharding and reductions, used by scoring (and by training through DistributedDataParallel).

Launch with torchrun; every process reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
from its environment:

    torchrun --nproc_per_node 2 -m core score --model smollm2-135m --out scores.safetensors

:func:`init` starts the group (NCCL when CUDA is present, gloo otherwise). Scoring is a sum over
calibration windows, so each rank scores the windows :func:`shard` gives it, accumulates fp32 sums,
and one :func:`all_reduce_sum` ends it; every rank then holds the same totals, and only the main
rank (:func:`is_main`) writes files or prints. Without torchrun everything here is a no-op
(world 1, rank 0), so the same code runs in one process.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from core.errors import HFPruneError


def launched() -> bool:
    """True when this process was started by torchrun (or anything that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def backend() -> str:
    """``nccl`` when CUDA is present (and NCCL built in), else ``gloo``."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init(timeout_minutes: float = 30.0) -> bool:
    """Start the process group from torchrun's environment once; returns :func:`active`.

    On CUDA each rank is pinned to ``cuda:LOCAL_RANK``. A no-op outside torchrun."""
    if not launched() or not dist.is_available():
        return False
    if not dist.is_initialized():
        chosen = backend()
        if chosen == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
    return active()


def shutdown() -> None:
    """Destroy the process group if this module (or anyone) started one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group() -> Iterator[bool]:
    """``with process_group() as parallel:`` — init on entry (when launched), shutdown on exit."""
    started = launched() and not (dist.is_available() and dist.is_initialized())
    finished = False
    try:
        yield init()
        finished = True
    finally:
        if started:
            if finished and active():
                # every rank done before any tears the group down: a rank that destroys gloo while another is
                # still writing its result can abort that one's exit ("terminate called without an active
                # exception", seen once in CI); after an error, no barrier that could wait for a dead rank
                dist.barrier()
            shutdown()


def active() -> bool:
    """True inside an initialised group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes outputs and prints."""
    return rank() == 0


def device() -> torch.device:
    """This rank's accelerator (``cuda:LOCAL_RANK``) when CUDA is present, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def shard(n: int) -> torch.Tensor:
    """Indices of the n items this rank handles: ``rank, rank + world, …`` (deterministic, disjoint,
    together all of 0..n-1). (k,) long; ``arange(n)`` in a single process."""
    return torch.arange(rank(), n, world(), dtype=torch.long)


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over all ranks, in place, with one collective per dtype (the tensors are
    flattened into one buffer: a model's 30-80 per-layer score vectors cost one all_reduce, not 80).
    Returns the same list. NCCL needs the buffer on this rank's GPU; gloo takes CPU tensors."""
    if not active() or not tensors:
        return tensors
    where = device() if backend() == "nccl" else torch.device("cpu")
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(where) for t in group])  # (Σ numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.device))
            offset += t.numel()
    return tensors


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(value: object) -> object:
    """The main rank's ``value`` on every rank (e.g. an error message or a path chosen on rank 0)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------- training


def local_slice(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch (examples along dim 0; every rank draws the same
    global batch from the same seeded order): (B, …) → (B / world, …)."""
    return torch.tensor_split(batch, world())[rank()] if active() else batch


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank number (e.g. the loss of each rank's shard of the batch)."""
    if not active():
        return value
    box = torch.tensor([float(value)], dtype=torch.float64)
    all_reduce_sum([box])
    return float(box) / world()


class _Holder(torch.nn.Module):
    """The trainable parameters (shared, not copied) as one module whose output is 0 but depends on each."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(params)

    def forward(self) -> torch.Tensor:
        return torch.stack([(p.reshape(-1)[:1].float() * 0).sum() for p in self.params]).sum()


class GradientSync:
    """torch's DistributedDataParallel as the gradient all-reduce of a training loop whose objective
    runs its own backward passes (the chunked vocabulary loss calls backward once per chunk, then once
    through the decoder stack, which DDP's one-forward-one-backward wrapper cannot follow).

    The local backward passes accumulate ``.grad`` as usual — exactly what happens under DDP's
    ``no_sync()`` during gradient accumulation — and :meth:`__call__` then runs one forward/backward
    through a DDP wrapper of a zero-valued function of the trainable parameters: its backward adds 0 to
    each gradient and lets DDP's reducer average the accumulated gradients over the ranks (bucketed
    all-reduce, the same path DDP takes on the first backward after ``no_sync``). Constructing it also
    broadcasts rank 0's trainable parameters, so every rank starts from the same values."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.holder = _Holder(params)
        placement = {"device_ids": [local_rank()]} if backend() == "nccl" else {}
        self.ddp = DistributedDataParallel(self.holder, **placement)  # the holder has no buffers to sync

    def __call__(self) -> None:
        """Average every trainable parameter's accumulated gradient over the ranks, in place."""
        self.ddp().backward()


class TrainingSync:
    """What a training loop calls so the same code runs in one process or under torchrun; every method
    is a no-op (or the identity) outside a process group:

        sync = TrainingSync(batch_size, accumulate)       # checks batch_size % (world · accumulate) == 0
        micro = sync.micro_batch(batch_size, accumulate)  # per-rank micro-batch
        sync.attach(trainable_params)                     # after requires_grad is set: DDP gradient sync
        ended_by, used = sync.agree(budget_used(...))     # rank 0's budget decision, so all ranks stop together
        batch = sync.local(global_batch)                  # this rank's contiguous share
        loss, tokens = sync.reduce(loss, tokens)          # average the gradients (DDP), mean loss, global tokens

    With the same global batch, the gradient each step equals the single-process one: each rank's
    objective averages over its rows, DDP averages over ranks, and the shares are equal in size."""

    def __init__(self, batch_size: int, accumulate: int) -> None:
        self.active = active()
        if self.active and batch_size % (world() * accumulate):
            raise HFPruneError(f"Under torchrun the batch ({batch_size} windows) is split over {world()} processes "
                               f"and {accumulate} micro-batches; make batch_size a multiple of {world() * accumulate}.")
        self.grads: GradientSync | None = None

    def micro_batch(self, batch_size: int, accumulate: int) -> int:
        return batch_size // accumulate // (world() if self.active else 1)

    def attach(self, params: list[torch.nn.Parameter]) -> None:
        if self.active:
            self.grads = GradientSync(params)

    def agree(self, value):
        return broadcast_object(value) if self.active else value

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        return local_slice(batch)

    def reduce(self, loss: float, tokens: int) -> tuple[float, int]:
        if self.grads is None:
            return loss, tokens
        self.grads()
        return mean_over_ranks(loss), tokens * world()


def to_rank_device(*models: torch.nn.Module) -> None:
    """Under torchrun on GPUs, move each model to this rank's GPU (``cuda:LOCAL_RANK``); else leave it."""
    if active() and device().type == "cuda":
        for model in models:
            model.to(device())
