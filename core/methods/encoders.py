"""AMP (Adaptive MLP Pruning) for encoders: score, allocate, prune and distil ViT / DINOv2 / CLIP-vision
/ BERT MLPs with the engine's own machinery.

- **Criterion** ``amp_entropy`` (AMP's released ``step_entropy``): L2-normalised embeddings f of a
  batch (normed CLS for DINOv2/ViT, post-layernorm CLS for CLIP, mean-pooled tokens for BERT), logits
  ``t · f_i·f_j`` in fp32 (t = 20 DINOv2, 15 CLIP), ``p_i = softmax_j``, ``E = −mean_i Σ_j p_ij log p_ij``
  (the self-similarity diagonal kept by default, as released; ``self_similarity=False`` masks it).
  The fc2 input ``a`` is tapped and each neuron scores ``mean_images |Σ_tokens a·g|`` in fp32
  (``core.scoring.loss_taylor_scores``, aggregate ``abs_sum``). Baselines through the same
  interface: ``magnitude``, ``wanda``, ``fluctuation``, ``random`` (core.criteria's classes).
- **Allocation**: ``core.adaptive.adaptive_search`` with :class:`EmbeddingEntropyEvaluator` — from
  the last block to the first, a 6-step binary search per layer for the smallest width whose
  entropy increase stays under a threshold, and an outer search on the threshold for the ratio.
  ``uniform`` / ``global`` come from core.allocate.
- **Recovery**: :class:`FeatureDistillation`, an objective for ``core.train.train``: MSE on the CLS
  and on the patch tokens before the final norm against the dense encoder (AMP's recipe: AdamW β =
  (0.9, 0.95), warm-up + cosine), on augmented crops.

Calibration data: random crops of scikit-image's samples (``core.images``), or for text encoders
windows of the calibration split of ``core.data`` wrapped in [CLS] … [SEP]. Never the labelled
evaluation sets.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core import __version__
from core.data.images import calibration_images, heldout_images, random_crops, sample_images
from core.data.text import CalibrationOptions, calibration_windows
from core.errors import HFPruneError, SelectionError, VisionConfigError
from core.export.hf import save_pruned
from core.importance.criteria import AmpEntropyCriterion, ScoreOptions, encoder_criterion, similarity_entropy
from core.importance.stats import top_k_indices
from core.methods.oneshot import PruneResult, ScoreResult, WidthPlan
from core.models.adapters import mlp_handles, mlp_widths
from core.models.encoders import LoadedEncoder, embed, encoder_forward, prefinal_tokens
from core.models.forward import batches
from core.models.slicing import prune_mlp_neurons
from core.options import knob, knob_like
from core.progress import check_stop
from core.prune.adaptive import MaskedModel, adaptive_search, heldout_windows
from core.prune.allocate import check_ratio, global_widths, uniform_widths
from core.train.loop import LossReport, ParamSet, train

ALLOCATIONS = ("adaptive", "uniform", "global")


@dataclass
class EncoderOptions(CalibrationOptions):
    """Calibration and search knobs of the encoder path (images or texts). The calibration knobs are the
    scoring pass's (:class:`CalibrationOptions`) with AMP's defaults: ``samples`` counts image crops or
    text windows, ``seq_len`` and ``source`` apply to text encoders, and a batch holds at least 2
    examples (the similarity entropy is over a batch)."""

    error = VisionConfigError

    samples: int = knob_like(CalibrationOptions, "samples", 64, low=2)
    seq_len: int = knob_like(CalibrationOptions, "seq_len", 64)
    batch_size: int = knob_like(CalibrationOptions, "batch_size", 32, low=2)
    image_size: int = knob(224, "side of the square calibration crops, pixels", low=14, ui_high=518, step=14)
    heldout_samples: int = knob(32, "adaptive: held-out examples the entropy is measured on", low=2, ui_high=256)
    mode: str = knob("sequential", "adaptive: AMP's sequential (later layers pruned) or independent",
                     choices=("sequential", "independent"))
    halvings: int = knob(6, "adaptive: binary-search steps per layer", low=1, high=16)
    min_keep: float = knob(0.05, "adaptive / global: minimum kept fraction of every layer", low=0, high=1,
                           low_open=True)
    round_to: int = knob(1, "round kept widths to a multiple (AMP: H/64)", low=1, ui_high=128)


# ----------------------------------------------------------------------------------------------
# criterion
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

_HELDOUT_SEED = 1_000_003


def _text_windows(loaded: LoadedEncoder, options: EncoderOptions, samples: int, heldout: bool) -> torch.Tensor:
    """(N, seq_len) ids: [CLS] + a window of the calibration split + [SEP]."""
    tok = loaded.tokenizer
    body = options.seq_len - 2
    if heldout:
        windows = heldout_windows(tok, options.source, samples, body, seed=options.seed,
                                  score_samples=options.samples, score_seq_len=body, max_length=loaded.max_length)
    else:
        windows = calibration_windows(tok, options.source, samples, body, options.seed, max_length=loaded.max_length)
    cls = torch.full((windows.shape[0], 1), tok.cls_token_id, dtype=torch.long)
    sep = torch.full((windows.shape[0], 1), tok.sep_token_id, dtype=torch.long)
    return torch.cat([cls, windows, sep], dim=1)


def calibration_data(loaded: LoadedEncoder, options: EncoderOptions | None = None) -> torch.Tensor:
    """Scoring examples: normalised crops (N, 3, S, S) or token windows (N, T)."""
    options = options or EncoderOptions()
    if loaded.kind == "text":
        return _text_windows(loaded, options, options.samples, heldout=False)
    return loaded.preprocess.normalize(calibration_images(options.samples, options.image_size, options.seed))


def heldout_data(loaded: LoadedEncoder, options: EncoderOptions | None = None) -> torch.Tensor:
    """Examples for the adaptive search, disjoint from the scoring ones (other crops / windows)."""
    options = options or EncoderOptions()
    if loaded.kind == "text":
        return _text_windows(loaded, options, options.heldout_samples, heldout=True)
    return loaded.preprocess.normalize(heldout_images(options.heldout_samples, options.image_size, options.seed))


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------


def score_encoder(loaded: LoadedEncoder, criterion: str = "amp_entropy", options: EncoderOptions | None = None, *,
                  criterion_params: dict | None = None, progress: bool = True,
                  stop: Callable[[], bool] | None = None) -> ScoreResult:
    """Score every MLP neuron of an encoder; returns the engine's :class:`ScoreResult` (same file format)."""
    options = options or EncoderOptions()
    scorer = encoder_criterion(criterion, **(criterion_params or {}))
    data = calibration_data(loaded, options) if scorer.cost != "weights only" else torch.empty(0)
    start = time.perf_counter()
    scores = scorer(loaded.model, data, ScoreOptions(batch_size=options.batch_size, progress=progress,
                                                      seed=options.seed, stop=stop, forward=encoder_forward))
    seconds = time.perf_counter() - start
    params = scorer.params()
    if isinstance(scorer, AmpEntropyCriterion):
        params = {**params, "temp_inv": scorer.resolved_temp_inv(loaded.model)}
    config = {"model": loaded.spec, "kind": loaded.kind, "criterion": criterion, "criterion_params": params,
              "cost": scorer.cost, **{k: v for k, v in options.to_dict().items()
                                      if k in ("samples", "seed", "batch_size", "image_size", "seq_len", "source")},
              "examples": int(data.shape[0]), "tool_version": __version__}
    return ScoreResult([s.detach().cpu().float() for s in scores], config, seconds)


# ----------------------------------------------------------------------------------------------
# allocation: the shared adaptive search with AMP's fidelity
# ----------------------------------------------------------------------------------------------


class EmbeddingEntropyEvaluator(MaskedModel):
    """AMP's search fidelity: the similarity entropy of the held-out examples' embeddings (all of
    them in one distribution) with the current neuron masks. Block inputs of the dense model are
    cached so a probe of layer l runs blocks l… only."""

    def __init__(self, model: nn.Module, data: torch.Tensor, scores: list[torch.Tensor], temp_inv: float,
                 self_similarity: bool = True, batch_size: int = 32):
        super().__init__(model, scores)
        if data.shape[0] < 2:
            raise SelectionError("The adaptive search needs at least 2 held-out examples.")
        self.fidelity = "similarity_entropy"
        self.temp_inv, self.self_similarity = float(temp_inv), bool(self_similarity)
        self.batches = [b.to(self.device) for b in batches(data, batch_size)]
        self.tokens = int(data.shape[0])
        with torch.no_grad():
            runs = [self._layer_inputs(lambda b=b: embed(self.model, b)) for b in self.batches]
        self.layer_inputs = [captured for captured, _ in runs]  # [batch][block] → (B, N, H)
        self.dense_value = float(similarity_entropy(torch.cat([e for _, e in runs]), self.temp_inv,
                                                    self.self_similarity))

    @torch.no_grad()
    def value(self, start: int = 0) -> float:
        self._check_start(start)
        self.evaluations += 1
        features = []
        with self._mask_hooks(), self._start_at(start) as stub:
            for index, batch in enumerate(self.batches):
                if stub is not None:
                    stub.value = self.layer_inputs[index][start]
                features.append(embed(self.model, batch))  # (B, H)
        return float(similarity_entropy(torch.cat(features), self.temp_inv, self.self_similarity))


def plan_encoder_widths(loaded: LoadedEncoder, result: ScoreResult, ratio: float, allocation: str = "adaptive",
                        options: EncoderOptions | None = None, *, temp_inv: float | None = None,
                        self_similarity: bool = True, progress: bool = True,
                        stop: Callable[[], bool] | None = None) -> WidthPlan:
    """Widths for ``ratio`` (fraction of MLP neurons removed; checked here). ``adaptive`` runs AMP's search
    with the similarity entropy on held-out examples (``temp_inv`` defaults to the family's)."""
    return _encoder_widths(loaded, result, check_ratio(ratio), allocation, options or EncoderOptions(),
                           temp_inv=temp_inv, self_similarity=self_similarity, progress=progress, stop=stop)


def _encoder_widths(loaded: LoadedEncoder, result: ScoreResult, ratio: float, allocation: str,
                    options: EncoderOptions, *, temp_inv: float | None = None, self_similarity: bool = True,
                    progress: bool, stop: Callable[[], bool] | None) -> WidthPlan:
    """:func:`plan_encoder_widths` for a ratio the caller has checked."""
    if allocation not in ALLOCATIONS:
        raise VisionConfigError(f"Unknown allocation '{allocation}'; choose one of: {', '.join(ALLOCATIONS)}.")
    full = mlp_widths(loaded.model)
    if [s.numel() for s in result.scores] != full:
        raise VisionConfigError("These scores were computed for a model with different MLP widths.")
    if allocation == "uniform":
        return WidthPlan(allocation, ratio, uniform_widths(full, ratio, options.round_to), full)
    if allocation == "global":
        return WidthPlan(allocation, ratio, global_widths(result.scores, ratio, min_keep=options.min_keep,
                                                            round_to=options.round_to), full)
    temp = temp_inv or result.config.get("criterion_params", {}).get("temp_inv") or loaded.temp_inv
    evaluator = EmbeddingEntropyEvaluator(loaded.model, heldout_data(loaded, options), result.scores, temp,
                                          self_similarity, options.batch_size)
    search = adaptive_search(loaded.model, result.scores, ratio, None, mode=options.mode, halvings=options.halvings,
                             min_keep=options.min_keep, round_to=options.round_to, progress=progress, stop=stop,
                             evaluator=evaluator)
    return WidthPlan(allocation, ratio, search.widths, full, search)


def prune_encoder(loaded: LoadedEncoder, result: ScoreResult, ratio: float, allocation: str = "adaptive",
                  options: EncoderOptions | None = None, *, plan: WidthPlan | None = None,
                  progress: bool = True, stop: Callable[[], bool] | None = None) -> PruneResult:
    """Keep each layer's top-scoring neurons at the planned widths: a new, smaller encoder. ``ratio`` is
    checked here, once; the planning takes the checked value."""
    ratio = check_ratio(ratio)
    options = options or EncoderOptions()
    if plan is None or plan.allocation != allocation or plan.ratio != ratio:
        plan = _encoder_widths(loaded, result, ratio, allocation, options, progress=progress, stop=stop)
    kept = top_k_indices(result.scores, plan.widths)
    model = prune_mlp_neurons(loaded.model, kept)
    meta = {"model": loaded.spec, "kind": loaded.kind, "criterion": result.config.get("criterion"),
            "criterion_params": result.config.get("criterion_params", {}), "allocation": allocation,
            "ratio": ratio, "achieved_ratio": plan.achieved_ratio,
            "original_intermediate_sizes": plan.full_widths,
            "intermediate_sizes": plan.widths, "kept_indices": [k.tolist() for k in kept],
            "calibration": {k: result.config.get(k) for k in ("samples", "seed", "image_size", "seq_len", "source")},
            "encoder_options": options.to_dict(), "tool_version": __version__}
    if plan.adaptive is not None:
        a = plan.adaptive
        meta["adaptive"] = {"tolerance": a.tolerance, "fidelity": a.fidelity, "mode": a.mode,
                            "search_ratio": a.search_ratio, "evaluations": a.evaluations,
                            "heldout_examples": a.heldout_tokens, "seconds": a.seconds,
                            "trace": [{"layer": t.layer, "tried": t.tried, "chosen": t.chosen, "width": t.width}
                                      for t in a.traces]}
    return PruneResult(model, plan.widths, kept, meta)


def default_export(widths: list[int], model: nn.Module) -> str:
    """hf-native when the config can state the widths, else hf-remote-code."""
    if len(set(widths)) == 1 and (model.config.model_type != "dinov2" or widths[0] % model.config.hidden_size == 0):
        return "hf-native"
    return "hf-remote-code"


def save_encoder(result: PruneResult, loaded: LoadedEncoder, out_dir: str, mode: str | None = None):
    """Export a pruned encoder (core.export.save_pruned: weights, preprocess / tokenizer, meta)."""
    return save_pruned(result.model, loaded.processor, out_dir, result.meta,
                       mode=mode or default_export(result.widths, result.model))


# ----------------------------------------------------------------------------------------------
# recovery: feature distillation through core.train
# ----------------------------------------------------------------------------------------------


class FeatureDistillation:
    """``core.train`` objective: MSE(student CLS, teacher CLS) + MSE(student patch tokens, teacher
    patch tokens), 1:1, on the tokens before the final norm (AMP's distil.py). Text encoders: all
    tokens in the patch term. ``batch``: normalised pixels (B, 3, S, S) or ids (B, T); held-out
    number: the same loss on fixed examples (teacher tokens cached)."""

    name = "feature-distillation"
    heldout_name = "feature_mse"

    def __init__(self) -> None:
        self._cache: tuple[torch.Tensor, nn.Module, list[torch.Tensor]] | None = None

    def needs_teacher(self) -> bool:
        return True

    @staticmethod
    def loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(B, N, H) each → (scalar loss, parts) in fp32."""
        s, t = student_tokens.float(), teacher_tokens.float()
        cls = F.mse_loss(s[:, 0], t[:, 0])
        patch = F.mse_loss(s[:, 1:], t[:, 1:])
        return cls + patch, {"cls_mse": float(cls.detach()), "patch_mse": float(patch.detach())}

    def forward_backward(self, student, teacher, batch, state):
        t0 = time.perf_counter()
        with torch.no_grad():
            target = prefinal_tokens(teacher, batch)  # (B, N, H)
        t1 = time.perf_counter()
        loss, parts = self.loss(prefinal_tokens(student, batch), target)
        t2 = time.perf_counter()
        (loss * state.scale).backward()
        t3 = time.perf_counter()
        return LossReport(float(loss.detach()), int(batch.shape[0]), parts,
                          {"teacher": t1 - t0, "student_and_loss": t2 - t1, "backward_stack": t3 - t2})

    @torch.no_grad()
    def heldout(self, student, teacher, windows, batch_size, stop):
        if self._cache is None or self._cache[0] is not windows or self._cache[1] is not teacher:
            self._cache = (windows, teacher, [prefinal_tokens(teacher, b) for b in batches(windows, batch_size)])
        total = 0.0
        for target, batch in zip(self._cache[2], batches(windows, batch_size)):
            check_stop(stop, "Training was stopped during the held-out evaluation.")
            total += float(self.loss(prefinal_tokens(student, batch), target)[0]) * batch.shape[0]
        return total / windows.shape[0]


def augmented_pool(loaded: LoadedEncoder, count: int, seed: int = 0, size: int | None = None,
                   scale: tuple[float, float] = (0.2, 1.0)) -> torch.Tensor:
    """Distillation examples: ``count`` random resized crops + flips (normalised), seeded apart from
    the scoring crops; text encoders: calibration windows."""
    if loaded.kind == "text":
        return _text_windows(loaded, EncoderOptions(samples=count, seed=seed + 7), count, heldout=False)
    crops = random_crops(sample_images(), count, size or loaded.preprocess.size, seed + 7, scale)
    return loaded.preprocess.normalize(crops)


def distill_encoder(student: nn.Module, teacher: nn.Module, data: torch.Tensor, options, *,
                    heldout: torch.Tensor | None = None, stop: Callable[[], bool] | None = None,
                    on_step=None, progress: bool = False):
    """Train every student parameter on :class:`FeatureDistillation` against ``teacher`` with
    ``core.train.train`` (``options``: a ``TrainOptions``; AMP uses beta2 0.95, warm-up + cosine)."""
    if [h.up.in_features for h in mlp_handles(student)] != [h.up.in_features for h in mlp_handles(teacher)]:
        raise HFPruneError("The teacher is not the dense version of this student (hidden sizes differ).")
    params = ParamSet("full", [(n, p) for n, p in student.named_parameters() if "mask_token" not in n])
    return train(student, teacher, FeatureDistillation(), data, params, options, heldout=heldout, stop=stop,
                 on_step=on_step, progress=progress)
