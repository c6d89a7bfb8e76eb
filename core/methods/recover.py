"""Recovery: distil a pruned model back toward the model it was cut from (on top of core.train).

    student = load_model("pruned30")                      # a folder written by `python -m core prune`
    teacher = load_model(default_teacher("pruned30"))     # the model named in its pruning_meta.json
    result = recover(student, teacher, RecoverOptions(params="mlp"), TrainOptions(minutes=10, lr=3e-4))
    save_recovered(result, student.tokenizer, "recovered30")

Parameter sets: ``full`` (every parameter), ``mlp`` (the gate/up/down projections of every decoder
layer; attention, norms and embeddings stay frozen) and ``lora`` (peft LoRA adapters on the named
linear layers, **merged into the weights at the end**, so the result is an ordinary model that exports
in every mode). Training text: the calibration split of ``source`` (or a .txt/.jsonl file), with a
held-out slice of it for the KL curve; the evaluation split is never read.

The student is trained in place. When the run is stopped or fails, its weights are put back to their
values from before the run (LoRA adapters are removed unmerged), so a cancelled run changes nothing.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from core import __version__
from core.data.text import TrainingText
from core.errors import ModelLoadError
from core.export.hf import read_meta, save_pruned
from core.models.adapters import mlp_handles, mlp_widths
from core.options import Options, knob
from core.paths import cache_dir
from core.quantize.backends import quantization_of
from core.train.loop import (
    DistillOptions,
    LogitDistillation,
    ParamSet,
    SparseLogitDistillation,
    StepRecord,
    TrainConfigError,
    TrainOptions,
    TrainResult,
    train,
)
from core.train.teacher_cache import TeacherOptions, cached_sparse_targets

if TYPE_CHECKING:
    from core.models.loading import LoadedModel

PARAM_SETS = ("full", "mlp", "lora")
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# Recovery's own training defaults, the measured best recipe (benchmarks/recovery.py: lr 3e-4 beat 1e-4 at
# equal 2-minute budgets); the CLI's flags, the dashboard's form and Services.recover all read them.
TRAIN_DEFAULTS = {"lr": 3e-4, "eval_every": 10}


@dataclass
class LoraOptions(Options):
    """peft LoRA adapters (``params="lora"``): ``W + (alpha / rank)·B·A`` on every linear layer whose
    name ends with one of ``targets``."""

    error = TrainConfigError
    cli_prefix = "lora-"

    rank: int = knob(16, "LoRA rank r", low=1, ui_high=128)
    alpha: float = knob(32.0, "LoRA alpha (the update is scaled by alpha / rank)", low=0, low_open=True, ui_high=256,
                        step=1)
    dropout: float = knob(0.0, "dropout on the LoRA input", low=0, high=1, high_open=True)
    targets: str = knob(LORA_TARGETS, "comma-separated linear-layer names that get adapters")

    @classmethod
    def for_rank(cls, rank: int) -> LoraOptions:
        """Adapters of ``rank`` with alpha = 2·rank (the update scale alpha / rank stays 2 whatever the rank)."""
        return cls(rank=int(rank), alpha=2.0 * int(rank))

    def target_list(self) -> list[str]:
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not names:
            raise self.error("Give at least one LoRA target module name (--lora-targets).")
        return names


@dataclass
class RecoverOptions(TrainingText):
    """What trains (``params``) and on which text (:class:`core.data.text.TrainingText`: windows of the
    calibration split of ``source`` and the held-out slice the KL curve is measured on)."""

    error = TrainConfigError

    params: str = knob("mlp", "parameter set: full, mlp (MLP projections only) or lora (merged at the end)",
                       choices=PARAM_SETS)


@dataclass
class RecoverResult:
    """The recovered model (the student object, trained in place; for LoRA the merged base model),
    the metadata to store with it, and the training run's record."""

    model: nn.Module
    meta: dict
    train: TrainResult
    lora_state: dict[str, torch.Tensor] = field(default_factory=dict)  # unmerged adapters (lora only)


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def check_trainable(model: nn.Module) -> None:
    """A quantized student cannot be trained here: its weights are integers behind a backend's kernels."""
    method = quantization_of(model) or (getattr(model, "hf_quantizer", None) and "a transformers quantizer")
    if method:
        raise TrainConfigError(f"This student is quantized ({method}); its integer weights cannot be trained. "
                               "Recover the unquantized model and quantize the result.")


def check_teacher(student: LoadedModel, teacher: LoadedModel) -> None:
    """Teacher and student must share the vocabulary token for token (KL compares distributions over it)."""
    s_vocab, t_vocab = int(student.model.config.vocab_size), int(teacher.model.config.vocab_size)
    if s_vocab != t_vocab:
        raise TrainConfigError(f"The teacher's vocabulary has {t_vocab} entries but the student's has {s_vocab}; "
                               "distillation needs the same tokenizer and vocabulary.")
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise TrainConfigError("The teacher's tokenizer maps tokens to other ids than the student's; distillation "
                               "needs the same tokenizer.")
    if teacher.model is student.model:
        raise TrainConfigError("The teacher and the student are the same model object; load the teacher separately.")


def default_teacher(student_spec: str) -> str:
    """The model a pruned folder was cut from (``model`` in its pruning_meta.json)."""
    folder = Path(student_spec).expanduser()
    meta = read_meta(folder) if folder.is_dir() else None
    teacher = (meta or {}).get("model")
    if not teacher:
        raise ModelLoadError(f"{student_spec} has no pruning_meta.json naming the model it was pruned from; "
                             "pass the teacher explicitly (--teacher).")
    return str(teacher)


# ----------------------------------------------------------------------------------------------
# parameter sets
# ----------------------------------------------------------------------------------------------


def param_set(model: nn.Module, name: str) -> ParamSet:
    """``full`` or ``mlp`` parameters of a causal LM (``lora`` is built by :func:`attach_lora`)."""
    if name == "full":
        return ParamSet("full", list(model.named_parameters()))
    if name == "mlp":
        mlp_ids = {id(p) for h in mlp_handles(model) for p in h.mlp.parameters()}
        return ParamSet("mlp", [(n, p) for n, p in model.named_parameters() if id(p) in mlp_ids])
    raise TrainConfigError(f"Unknown parameter set '{name}'; choose one of: {', '.join(PARAM_SETS)}.")


def check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target must name at least one linear layer (peft silently skips names that match nothing)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in linear):
            available = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise TrainConfigError(f"LoRA target '{target}' matches no linear layer of this model; "
                                   f"its linear layers are named {', '.join(available)}.")


def attach_lora(model: nn.Module, options: LoraOptions, seed: int = 0):
    """Wrap ``model`` with peft LoRA adapters (in place). Returns (peft model, ParamSet of the adapters).
    The adapters' random init is seeded, so two runs with the same seed start identical."""
    from peft import LoraConfig, get_peft_model

    targets = options.target_list()
    check_lora_targets(model, targets)
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=targets, bias="none")
    torch.manual_seed(seed)
    wrapped = get_peft_model(model, config)
    named = [(n, p) for n, p in wrapped.get_base_model().named_parameters() if "lora_" in n]
    return wrapped, ParamSet("lora", named)


def lora_state(params: ParamSet) -> dict[str, torch.Tensor]:
    """The adapters' tensors (cloned, CPU) by parameter name."""
    return {n: p.detach().cpu().clone().contiguous() for n, p in params.named}


def apply_lora_state(model: nn.Module, options: LoraOptions, state: dict[str, torch.Tensor]) -> nn.Module:
    """Attach adapters with ``options``, load their stored tensors and merge them into ``model``'s
    weights (what a stored LoRA recovery run does on reload). Returns the merged model."""
    wrapped, params = attach_lora(model, options)
    names = {n for n, _p in params.named}
    if names != set(state):
        wrapped.unload()
        raise TrainConfigError("The stored LoRA adapters do not fit this model (different layers or targets).")
    with torch.no_grad():
        for n, p in params.named:
            p.copy_(state[n].to(p.device, p.dtype))
    return wrapped.merge_and_unload()


# ----------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------


def recover(student: LoadedModel, teacher: LoadedModel, options: RecoverOptions | None = None,
            train_options: TrainOptions | None = None, distill: DistillOptions | None = None,
            lora: LoraOptions | None = None, *, meta: dict | None = None, stop: Callable[[], bool] | None = None,
            on_step: Callable[[StepRecord], None] | None = None, progress: bool = False,
            teacher_options: TeacherOptions | None = None) -> RecoverResult:
    """Distil ``teacher`` into ``student`` (trained in place) and return the recovered model with
    its metadata (``meta``: the student's own pruning_meta.json, extended with a ``recovery`` entry).

    Raises one-sentence errors (nothing trained) for a quantized student, a teacher with another
    vocabulary, a LoRA target that matches nothing, or too little text for one batch; on Stop
    (:class:`core.train.Stopped`) the student is back at its state from before the call.
    ``teacher_options``: ``TeacherOptions(logits="cached")`` runs the teacher once over a seeded subset
    of the training windows (or reads that pass from the disk cache) and trains on its sparse targets,
    so each step runs only the student (:mod:`core.train.teacher_cache`)."""
    options = options or RecoverOptions()
    teacher_options = teacher_options or TeacherOptions()
    train_options = train_options or TrainOptions(minutes=10)
    distill = distill or DistillOptions()
    lora = lora or LoraOptions()
    check_trainable(student.model)
    check_teacher(student, teacher)
    if options.params == "lora":
        check_lora_targets(student.model, lora.target_list())
    windows, heldout = options.windows(student.tokenizer, train_options.seed, max_length=student.max_length,
                                       min_windows=train_options.batch_size)
    model = student.model
    flags = [(p, p.requires_grad) for p in model.parameters()]
    wrapped = None
    if options.params == "lora":
        wrapped, params = attach_lora(model, lora, train_options.seed)
        target = wrapped.get_base_model()
    else:
        params = param_set(model, options.params)
        target = model
    objective, data, cache_record = LogitDistillation(distill), windows, None
    try:
        if teacher_options.cached:
            objective, cache_record = cached_objective(teacher, windows, teacher_options, distill, train_options,
                                                       progress=progress, stop=stop)
            data = objective.examples()
        result = train(target, teacher.model if distill.alpha > 0 or options.heldout_windows else None, objective,
                       data, params, train_options, heldout=heldout if options.heldout_windows else None,
                       stop=stop, on_step=on_step, progress=progress)
    except BaseException:
        if wrapped is not None:
            wrapped.unload()  # back to the plain model, adapters dropped unmerged
        _restore_flags(flags)
        raise
    adapters: dict[str, torch.Tensor] = {}
    if wrapped is not None:
        adapters = lora_state(params)
        model = wrapped.merge_and_unload()
    _restore_flags(flags)
    model.eval()
    student.model = model
    recovery = {
        "teacher": teacher.spec, "params": options.params, "trainable_params": result.trainable_params,
        "options": options.to_dict(), "train": train_options.to_dict(), "distill": distill.to_dict(),
        **({"lora": lora.to_dict()} if options.params == "lora" else {}),
        "teacher_logits": {**teacher_options.to_dict(), **(cache_record or {})},
        "training_windows": int(data.shape[0]), "heldout_tokens": int(heldout.numel()),
        "tokens_seen": result.tokens, "steps": result.steps, "seconds": round(result.seconds, 2),
        "ended_by": result.ended_by, "tokens_per_second": round(result.tokens_per_second, 2),
        "cpu_seconds": round(result.cpu_seconds, 2),
        "heldout_kl_before": result.initial_heldout, "heldout_kl_after": result.final_heldout,
        "best_step": result.best_step, "timing": result.timing,
        "curve": [{k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in point.items()}
                  for point in result.curve],
        "tool_version": __version__,
    }
    base_meta = copy.deepcopy(meta or {})
    if "recovery" in base_meta:
        base_meta.setdefault("previous_recoveries", []).append(base_meta.pop("recovery"))
    base_meta.setdefault("model", teacher.spec)
    base_meta["intermediate_sizes"] = mlp_widths(model)
    base_meta["recovery"] = recovery
    return RecoverResult(model, base_meta, result, adapters)


def cached_objective(teacher: LoadedModel, windows: torch.Tensor, options: TeacherOptions, distill: DistillOptions,
                     train_options: TrainOptions, *, progress: bool = False,
                     stop: Callable[[], bool] | None = None) -> tuple[SparseLogitDistillation, dict]:
    """The sparse-target objective on ``options.windows`` of the training ``windows`` (a subset drawn by
    the training seed, kept in their text order), the teacher pass read from the disk cache when this
    teacher already ran on exactly those windows with these settings. Returns it with a record of what
    the cache cost (seconds, CPU seconds, reused or built, bytes, mean tail mass)."""
    count = min(options.windows, windows.shape[0])
    pick = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(train_options.seed))[:count]
    subset = windows[pick.sort().values]
    spec = f"{teacher.spec}|{teacher_fingerprint(teacher.model)}"
    targets = cached_sparse_targets(teacher.model, spec, subset, options, cache_dir() / "teacher-cache",
                                    tau=distill.tau, batch_size=train_options.batch_size, progress=progress, stop=stop)
    record = {"cache_windows": count, "cache_tokens": targets.tokens, "cache_bytes": targets.nbytes(),
              "cache_reused": targets.loaded_from is not None, "cache_seconds": round(targets.seconds, 2),
              "cache_cpu_seconds": round(targets.cpu_seconds, 2), "tail_mass": round(targets.tail_mass(), 4)}
    return SparseLogitDistillation(targets, distill), record


def teacher_fingerprint(model: nn.Module) -> str:
    """A short digest of a model's weights (sums per tensor): a cache built for other weights is not reused."""
    with torch.no_grad():
        sums = [float(p.detach().double().sum()) for p in model.parameters()]
    return f"{len(sums)}:{sum(sums):.10e}:{sum(abs(v) for v in sums):.10e}"


def _restore_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def default_export(model: nn.Module, meta: dict | None = None) -> str:
    """The student's own export mode when it had one, else hf-native for uniform widths and
    hf-remote-code otherwise."""
    widths = mlp_widths(model)
    recorded = (meta or {}).get("export")
    if recorded in ("hf-remote-code", "hf-padded") or (recorded == "hf-native" and len(set(widths)) == 1):
        return recorded
    return "hf-native" if len(set(widths)) == 1 else "hf-remote-code"


def save_recovered(result: RecoverResult, tokenizer, out_dir: str, mode: str | None = None) -> Path:
    """Export the recovered model like any pruned model (atomic folder, pruning_meta.json with the
    recovery recipe, curve and tokens seen)."""
    meta = {k: v for k, v in result.meta.items() if k not in ("export", "intermediate_sizes")}
    return save_pruned(result.model, tokenizer, out_dir, meta, mode=mode or default_export(result.model, result.meta))
