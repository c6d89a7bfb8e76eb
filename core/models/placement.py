"""Where a model runs and whether a job fits: device, dtype, accelerate's ``device_map="auto"`` for
models larger than one GPU, gradient checkpointing, and the memory estimate printed before a long job.

    placement = PlacementOptions(device="auto", device_map="none", grad_checkpointing=True)
    loaded = load_placed("smollm2-135m", placement)          # bf16 on cuda:LOCAL_RANK, fp32 on the CPU
    estimate = estimate_scoring_memory(loaded.model, batch_size=1, seq_len=1024,
                                       grad_checkpointing=True)
    print(estimate.text())                                    # "~14.2 GiB for weights + activations at ..."
    check_fits(estimate, device_of(loaded.model))             # MemoryBudgetError instead of an OOM crash

The activation part of the estimate is an empirical per-token, per-layer count of what the scorer keeps
for its backward (all weights frozen, so no weight gradients): ≈ 6·d_ff + 3·(q + 2·kv columns) values
in the model's dtype plus ≈ 12·hidden fp32 values (the RMSNorms upcast), fitted on Llama-family models
and deliberately on the high side (tests/test_scale.py checks it against the bytes autograd actually
saves, within 1–2×); with checkpointing only each layer's input is kept, plus one layer recomputed at a
time. The fixed workspace of the chunked vocabulary loss and a self-distillation teacher's logits are added.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from core import distributed
from core.errors import HFPruneError
from core.models.forward import LOGIT_CHUNK_BYTES
from core.models.loading import load_model
from core.options import Options, knob

GiB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MemoryBudgetError(HFPruneError):
    """A job whose estimated memory exceeds what the device has free (raised before it starts)."""


class PlacementError(HFPruneError):
    """A device / device-map / dtype choice that cannot work here."""


@dataclass
class PlacementOptions(Options):
    """Where the model is loaded and how scoring spends memory."""

    error = PlacementError

    device: str = knob("auto", "where the model runs: auto = this process's GPU when CUDA is present, else the CPU",
                       choices=("auto", "cpu", "cuda"))
    device_map: str = knob("none", "auto: spread the layers over every visible GPU (and the CPU when they are full) "
                           "with accelerate, for models larger than one device", choices=("none", "auto"))
    dtype: str = knob("auto", "weights dtype: auto = bfloat16 on CUDA, float32 on the CPU (scores and losses "
                      "are always accumulated in fp32)", choices=("auto", "float32", "bfloat16", "float16"))
    grad_checkpointing: bool = knob(False, "scoring: recompute each layer's activations in the backward "
                                    "(activation memory of one layer instead of all; ~30 % slower)")
    memory_check: bool = knob(True, "print the memory estimate before a long job and refuse one that cannot fit")

    def validate(self) -> None:
        super().validate()
        if self.device == "cuda" and not torch.cuda.is_available():
            raise self.error("--device cuda was asked for but CUDA is not available on this machine.")
        if self.device_map == "auto" and distributed.launched():
            raise self.error("--device-map auto spreads one model over all GPUs, but under torchrun each process "
                             "owns one GPU: use one or the other.")
        if self.device_map == "auto" and self.device == "cpu":
            raise self.error("--device-map auto places layers on GPUs; it cannot be combined with --device cpu.")

    def resolve_device(self) -> torch.device:
        """The torch device for a whole-model placement (``cuda:LOCAL_RANK`` under torchrun)."""
        if self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        return distributed.device() if distributed.launched() else torch.device("cuda", torch.cuda.current_device())

    def resolve_dtype(self, device: torch.device | None = None) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        on_gpu = (device or self.resolve_device()).type == "cuda" or self.device_map == "auto"
        return torch.bfloat16 if on_gpu and torch.cuda.is_available() else torch.float32


def device_of(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (the embedding, for a dispatched model)."""
    return next(model.parameters()).device


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers as stored (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@dataclass
class MemoryEstimate:
    """Bytes a scoring pass needs: ``weights`` + ``activations`` (= ``stack`` kept for the backward +
    ``workspace`` of the loss and gradients + ``teacher`` logits) at ``batch_size`` × ``seq_len``."""

    weights: int
    stack: int
    workspace: int
    teacher: int
    batch_size: int
    seq_len: int
    dtype: str
    grad_checkpointing: bool

    @property
    def activations(self) -> int:
        return self.stack + self.workspace + self.teacher

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def text(self) -> str:
        """One line: '~N GiB for weights + activations at this batch/sequence length'."""
        how = ", gradient checkpointing" if self.grad_checkpointing else ""
        return (f"~{self.total / GiB:.1f} GiB for weights + activations ({self.weights / GiB:.1f} + "
                f"{self.activations / GiB:.1f} GiB) at batch {self.batch_size} x {self.seq_len} tokens, "
                f"{self.dtype}{how}")

    def to_dict(self) -> dict:
        return {"weights_gib": round(self.weights / GiB, 3), "activations_gib": round(self.activations / GiB, 3),
                "stack_gib": round(self.stack / GiB, 3), "total_gib": round(self.total / GiB, 3),
                "batch_size": self.batch_size, "seq_len": self.seq_len, "dtype": self.dtype,
                "grad_checkpointing": self.grad_checkpointing}


def _layer_counts(config) -> tuple[int, int, int, int]:
    """(layers, hidden, d_ff, attention columns q + 2·kv) from a transformers config."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    d_ff = config.intermediate_size
    d_ff = max(d_ff) if isinstance(d_ff, (list, tuple)) else int(d_ff)
    return int(config.num_hidden_layers), hidden, d_ff, (heads + 2 * kv) * head_dim


def estimate_scoring_memory(model: nn.Module, *, batch_size: int, seq_len: int, grad_checkpointing: bool = False,
                            teacher: bool = False, config=None, weights: int | None = None,
                            dtype: torch.dtype | None = None) -> MemoryEstimate:
    """Estimate the memory of a Taylor scoring pass (a forward + activation-only backward) of one
    batch of ``batch_size`` × ``seq_len`` tokens. ``model`` may be None when ``config``, ``weights``
    (bytes) and ``dtype`` are given (an estimate before loading). ``teacher``: a self-distillation
    criterion keeps the teacher's fp32 logits of the whole batch."""
    config = config if config is not None else model.config
    dtype = dtype or next(model.parameters()).dtype
    weights = weight_bytes(model) if weights is None else int(weights)
    size = torch.empty((), dtype=dtype).element_size()
    layers, hidden, d_ff, attn = _layer_counts(config)
    tokens = batch_size * seq_len
    per_layer = tokens * ((6 * d_ff + 3 * attn) * size + 12 * hidden * 4)  # bytes kept by one full layer
    if grad_checkpointing:
        stack = int(1.25 * layers * tokens * hidden * size) + per_layer  # layer inputs + one layer recomputed
    else:
        stack = layers * per_layer
    vocab = int(config.vocab_size)
    workspace = (4 * LOGIT_CHUNK_BYTES  # fp32 logits, p and the gradient of one chunk, lm_head output
                 + 2 * tokens * hidden * 4  # final hidden states (fp32 detached copy + its gradient)
                 + 3 * tokens * d_ff * size)  # gradient temporaries of the layer being back-propagated
    teacher_bytes = tokens * vocab * 4 if teacher else 0
    return MemoryEstimate(weights, int(stack), int(workspace), int(teacher_bytes), batch_size, seq_len,
                          str(dtype).replace("torch.", ""), grad_checkpointing)


def free_bytes(device: torch.device) -> int:
    """Memory free for this job: ``torch.cuda.mem_get_info`` on a GPU, psutil's available memory on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def check_fits(estimate: MemoryEstimate, device: torch.device, *, weights_loaded: bool = True,
               devices: list[torch.device] | None = None) -> None:
    """Raise :class:`MemoryBudgetError` (one sentence) when the estimate exceeds the free memory of
    ``device`` (or the sum over ``devices`` for a model spread by a device map). ``weights_loaded``:
    the weights already sit there, so only the activations must still fit."""
    places = devices or [device]
    free = sum(free_bytes(d) for d in places)
    need = estimate.activations + (0 if weights_loaded else estimate.weights)
    if need > free:
        where = ", ".join(str(d) for d in places)
        raise MemoryBudgetError(
            f"This job needs {estimate.text()}, but only {free / GiB:.1f} GiB is free on {where}: lower --batch-size "
            f"or --seq-len, add --grad-checkpointing, or spread the model with --device-map auto.")


def model_devices(model: nn.Module) -> list[torch.device]:
    """Every device holding a parameter (more than one for a dispatched model)."""
    return sorted({p.device for p in model.parameters()}, key=str)


def load_placed(spec: str, options: PlacementOptions | None = None, *, say=None):
    """``core.models.load_model`` placed as ``options`` says: the working dtype, then moved to the
    device, or dispatched over the GPUs by accelerate (``device_map="auto"``). Before a model is
    moved to a GPU its weights are checked against the GPU's free memory. Returns a LoadedModel."""
    options = options or PlacementOptions()
    device = options.resolve_device()
    dtype = options.resolve_dtype(device)
    if options.device_map == "auto":
        return load_model(spec, dtype=dtype, device_map="auto")
    loaded = load_model(spec, dtype=dtype)
    if device.type != "cpu":
        need = weight_bytes(loaded.model)
        free = free_bytes(device)
        if options.memory_check and need > free:
            raise MemoryBudgetError(f"The weights need {need / GiB:.1f} GiB but only {free / GiB:.1f} GiB is free on "
                                    f"{device}: use --device-map auto to spread them over several GPUs and the CPU.")
        loaded.model.to(device)
    return loaded


def scoring_preflight(model: nn.Module, options: PlacementOptions, *, batch_size: int, seq_len: int,
                      criterion: str = "entropy", say=None) -> MemoryEstimate:
    """Before a scoring pass: estimate its memory, say it (main rank only, to stderr by default) and,
    when ``options.memory_check``, raise :class:`MemoryBudgetError` if the activations cannot fit in
    what the model's device(s) have free. Returns the estimate."""
    estimate = estimate_scoring_memory(model, batch_size=batch_size, seq_len=seq_len,
                                       grad_checkpointing=options.grad_checkpointing,
                                       teacher=criterion == "self_distill")
    if distributed.is_main():
        (say or (lambda m: print(m, file=sys.stderr, flush=True)))(f"[hfprune] memory estimate: {estimate.text()}")
    if options.memory_check:
        check_fits(estimate, device_of(model), devices=model_devices(model))
    return estimate
