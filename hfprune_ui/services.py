"""The dashboard's bridge to the engine: resolves user input, calls core, caches and stores runs.

Every call that runs a shared model goes through ``Services.model_lock`` (in addition to Gradio's
single ``model`` concurrency slot), so hooks of one job never see another job's forward pass.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from core.data.text import (
    CalibrationOptions,
    calibration_windows,
    evaluation_windows,
    store_text_file,
    window_capacity,
)
from core.errors import DataError, HFPruneError, PruneConfigError
from core.export.gguf import GGUFOptions, check_gguf_widths, save_gguf
from core.export.hf import save_pruned, zip_folder
from core.export.kquant import LlamaCppMissing, llama_cpp_missing
from core.importance.criteria import REGISTRY, resolve_params
from core.measure.evaluate import QUICK_EVAL, Reference, evaluate, evaluate_reference
from core.measure.llamacpp import LlamaCppOptions, measure_llamacpp
from core.measure.outputs import (
    GenerationSettings,
    TokenKL,
    TokenMenu,
    generate_side_by_side,
    next_token_menus,
    per_token_kl_text,
)
from core.measure.speed import MIN_SPREAD_REPEATS, add_measured_speedups, ideal_speedup, measure_speed
from core.measure.timing import (
    adaptive_seconds,
    budgeted_speed_seconds,
    evaluation_seconds,
    refit_seconds,
    scoring_seconds,
    seconds_per_decode_step,
    seconds_per_token,
)
from core.measure.zeroshot import check_tasks, run_zeroshot
from core.methods import oneshot as engine
from core.methods.gates import TRAIN_DEFAULTS, DDPOptions, ddp
from core.methods.pipeline import (
    AblationResult,
    MeasureOptions,
    PipelineOptions,
    PipelineResult,
    Shared,
    run_ablation,
    run_pipeline,
)
from core.methods.recover import TRAIN_DEFAULTS as RECOVER_TRAIN
from core.methods.recover import LoraOptions, RecoverOptions, param_set, recover
from core.models.adapters import mlp_widths
from core.models.counts import mlp_widths_any
from core.models.loading import LoadedModel
from core.models.slicing import pruned_view
from core.paths import cache_dir
from core.progress import check_stop
from core.quantize.backends import check_method, quantize_model
from core.runs import RunStore
from core.studies.claims import adaptive_claim, load_probe_evidence, load_recipe_evidence, probe_claim, refit_claim
from core.studies.neuron import InspectOptions, NeuronReport, inspect_neuron
from core.studies.report import build_report, rebuild_run_model, write_report
from core.studies.stability import (
    StabilityOptions,
    check_sweep_draws,
    draw_windows,
    load_tour_draws,
    measure_stability,
    score_draws,
    sweep_over_draws,
)
from core.studies.sweep import fidelity_sweep
from core.train.loop import DistillOptions, TrainOptions
from core.train.teacher_cache import TeacherOptions

from .progress import engine_bars
from .state import DataSpec, ModelCache, ScoreCache, Session, SessionStore, Variant

T = TypeVar("T")

SOURCES = {"wiki": "Wikipedia (built-in)", "news": "News paragraphs (built-in)", "upload": "Uploaded file"}
BASELINE = "random (baseline)"  # the sweep's rows for seeded random scores


def criteria() -> list[str]:
    """Criterion names, read from the engine's registry at call time (new ones appear by themselves)."""
    return list(REGISTRY)


# The dashboard's allocation choices: the engine's allocations, plus AMP's sequential adaptive search
# (later layers already pruned while a layer is searched) as its own entry.
SEQUENTIAL = "adaptive-sequential"


def allocations() -> list[tuple[str, str]]:
    """(label, value) pairs for the allocation dropdown (adaptive carries the recommendation that
    :func:`recipe_advice` explains beside it)."""
    labels = {"adaptive": "adaptive — recommended (each layer vs the dense model)"}
    return [(labels.get(a, a), a) for a in engine.ALLOCATIONS] + [("adaptive (AMP: last to first, sequential)",
                                                                       SEQUENTIAL)]


def recipe_advice() -> dict[str, str]:
    """The Prune tab's two recipe sentences, generated from the stored criteria benchmark
    (core.studies.claims): ``refit`` (what the default refit buys and costs) and ``adaptive`` (its gain
    over uniform widths and its export consequence), and from the stored heal tables ``probes`` (what
    probing the search with the refit changed); empty strings when the result files are missing."""
    evidence = load_recipe_evidence()
    refit, adaptive, probes = refit_claim(evidence), adaptive_claim(evidence), probe_claim(load_probe_evidence())
    return {"refit": refit.text if refit else "", "adaptive": adaptive.text if adaptive else "",
            "probes": probes.text if probes else ""}


def engine_allocation(choice: str, knobs: dict | None = None) -> tuple[str, engine.AllocationOptions]:
    """A dashboard allocation choice (+ the adaptive search's knobs: halvings, heldout_samples,
    heldout_seq_len, fidelity) → the engine's allocation name and options."""
    knobs = dict(knobs or {})
    if choice == SEQUENTIAL:
        return "adaptive", engine.AllocationOptions(**{**knobs, "mode": "sequential"})
    return choice, engine.AllocationOptions(**knobs)


def prune_name(criterion: str, ratio: float, allocation: str, refit: bool | str) -> str:
    """The default name of a pruned variant, saying what sets it apart: criterion and ratio, the
    allocation when it is not uniform, '+lsq' when down_proj was refitted, or '+<method>' for another
    compensation method ('entropy-30%', 'entropy-30%-global', 'entropy-30%-adaptive+lsq', 'entropy-30%+region')."""
    percent = f"{100 * float(ratio):.1f}".rstrip("0").rstrip(".")
    spread = "" if allocation == "uniform" else f"-{allocation}"
    suffix = f"+{refit}" if isinstance(refit, str) and refit != "none" else ("+lsq" if refit is True else "")
    return f"{criterion}-{percent}%{spread}{suffix}"


def locked_steps(lock: threading.RLock, steps: Iterator[T]) -> Iterator[T]:
    """Yield ``steps``' items, holding ``lock`` only while each item is computed, never across a ``yield``.

    Gradio advances a sync generator with one worker-thread call per step, and a Stop, a cancel or a
    dropped client closes it from yet another thread (or the garbage collector): an ``RLock`` taken
    in one step and released in another raises "cannot release un-acquired lock" and stays held, so
    every later model job would hang. Here each ``next()`` takes and releases the lock on the same
    thread, and closing this generator closes ``steps`` without waiting for the lock (an engine
    generator suspended at its ``yield`` holds no model state that needs it)."""
    try:
        while True:
            with lock:
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item
    finally:
        steps.close()


def tour_file(model_spec: str, data: DataSpec, criterion: str) -> str:
    """File name of shipped precomputed scores: model, criterion and calibration settings spelled out."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{model_spec}_{criterion}")
    return f"{safe}_{data.name}_{data.samples}x{data.seq_len}_seed{data.seed}.safetensors"


def _bench_step(on_step: Callable[[str, int, int, float], None],
                budget_s: float | None) -> Callable[[str, int, int], None]:
    """measure_speed's ``on_progress`` for one model → ``on_step(phase, done, most, fraction)``: with a
    budget the fraction is the share of the budget spent (it bounds the time), without one prefill
    fills the first half and decode the second."""
    began = time.monotonic()

    def step(phase: str, done: int, most: int) -> None:
        if budget_s:
            fraction = (time.monotonic() - began) / budget_s
        else:
            fraction = 0.5 * done / max(1, most) + (0.5 if phase == "decode" else 0.0)
        on_step(phase, done, most, min(0.99, fraction))
    return step


class Services:
    """Shared caches + the per-session store + the run store, and the engine calls on top of them."""

    def __init__(self, runs_root: str | os.PathLike | None = None,
                 export_root: str | os.PathLike | None = None) -> None:
        """``export_root``: when set, "save to folder" only writes inside it (relative paths are taken
        from it); None lets a local user save anywhere the server process may write."""
        self.export_root = Path(export_root).expanduser().resolve() if export_root else None
        self.runs = RunStore(runs_root)
        self.models = ModelCache()
        self.scores = ScoreCache()
        self.sessions = SessionStore()
        self._quick_originals: dict[tuple, tuple] = {}  # (model, source, windows, seq_len) → (Reference, perplexity)
        self._per_token: dict[str, tuple[float, float]] = {}  # model spec → (forward s/token, when probed)
        self._per_step: dict[str, tuple[float, float]] = {}  # model spec → (decode s/step, when probed)
        self._tour_draws: dict[Path, dict] = {}  # assets/tour/draws.json, read once
        self.model_lock = threading.RLock()

    # -- inputs ----------------------------------------------------------------------------
    def data_spec(self, source: str, upload: str | None, samples: int, seq_len: int, seed: int) -> DataSpec:
        """Validate the calibration choice; uploads are copied under the cache, named by content hash."""
        samples, seq_len, seed = int(samples), int(seq_len), int(seed)
        if source in ("wiki", "news"):
            return DataSpec(source, source, samples, seq_len, seed)
        if source != "upload":
            raise DataError(f"Unknown calibration source '{source}'.")
        if not upload:
            raise DataError("Choose 'Uploaded file' only after uploading a .txt or .jsonl file.")
        path = Path(upload)
        if not path.is_file():
            raise DataError("The uploaded file is gone from the server; upload it again.")
        stored, digest = store_text_file(path, cache_dir() / "uploads")
        return DataSpec(str(stored), f"upload:{path.name}#{digest}", samples, seq_len, seed)

    def model(self, spec: str) -> LoadedModel:
        return self.models.get(spec)

    # -- scoring ---------------------------------------------------------------------------
    def score(self, session: Session, model_spec: str, data: DataSpec, criterion: str, *, batch_size: int = 1,
              params: dict | None = None,
              stop: Callable[[], bool] | None = None) -> tuple[engine.ScoreResult, str, str]:
        """Scores for (model, data, criterion, criterion parameters): memory cache → run store → engine.
        ``params`` may hold every criterion's knobs; only the chosen criterion's are used. Returns
        (result, run id, where it came from: 'memory' | 'disk' | 'computed')."""
        resolved = resolve_params(criterion, params)  # unknown criterion / bad value: a clear error
        session.set_context(model_spec, data)
        stored = self.stored_scores(session, model_spec, data, criterion, resolved)
        if stored is not None and stored[2] == "precomputed":
            return stored  # the Tour's shipped scores
        key = ScoreCache.key(model_spec, data, criterion, resolved)
        hit, origin = (stored[:2], stored[2]) if stored is not None else (None, "")
        if hit is None:
            loaded = self.model(model_spec)
            with self.model_lock:
                result = engine.score_model(loaded, criterion, source=data.source, samples=data.samples,
                                              seq_len=data.seq_len, seed=data.seed, batch_size=batch_size,
                                              progress=engine_bars(), stop=stop, criterion_params=resolved)
            config = {**result.config, "source": data.label, "source_path": data.source, "session": session.session_id}
            run = self.runs.create("score", config, results={"seconds": result.seconds,
                                                             "tokens": result.config.get("tokens")},
                                   scores=result.scores)
            hit, origin = (result, run.run_id), "computed"
        self.scores.put(key, *hit)
        session.scores[criterion], session.score_runs[criterion] = hit
        return hit[0], hit[1], origin

    def stored_scores(self, session: Session, model_spec: str, data: DataSpec, criterion: str,
                      params: dict | None = None) -> tuple[engine.ScoreResult, str, str] | None:
        """What :meth:`score` would return without computing — (result, run id, 'precomputed' | 'memory' |
        'disk') — or None when it would score; changes nothing (an estimate asks before the work)."""
        resolved = resolve_params(criterion, params)
        held = session.scores.get(criterion)
        if (held is not None and held.config.get("precomputed") and session.model_spec == model_spec
                and session.data == data and held.config.get("criterion_params", {}) == resolved):
            return held, session.score_runs.get(criterion, ""), "precomputed"
        hit = self.scores.get(ScoreCache.key(model_spec, data, criterion, resolved))
        if hit is not None:
            return hit[0], hit[1], "memory"
        run = self.runs.find("score", {"model": model_spec, "criterion": criterion, "criterion_params": resolved,
                                       **data.match()})
        if run is None:
            return None
        return engine.ScoreResult(run.scores(), run.config, float(run.results.get("seconds", 0))), run.run_id, "disk"

    # -- pruning ---------------------------------------------------------------------------
    def plan(self, loaded: LoadedModel, ratio: float, allocation: str, round_to: int,
             scores: list[torch.Tensor] | None) -> list[int] | None:
        """Kept widths per layer from the engine's planner; None for ``adaptive`` (its widths come from
        a search that runs when the user presses Prune)."""
        if allocation in ("adaptive", SEQUENTIAL):
            return None
        return list(engine.plan_widths(loaded.model, float(ratio), allocation, int(round_to), scores))

    def prune(self, session: Session, criterion: str, ratio: float, allocation: str, round_to: int,
              name: str, stop: Callable[[], bool] | None = None,
              compensate_windows: int = 0, adaptive: dict | None = None,
              replace: bool = False, keep: Collection[str] = (),
              on_phase: Callable[[str], None] | None = None,
              region: dict | None = None) -> tuple[Variant, str | None]:
        """Prune the session's model with its scores for ``criterion``; store the run and the variant.
        ``compensate_windows`` > 0 refits every down_proj by least squares on that many calibration
        windows (of the session's data source and window length); ``region`` (CompensationOptions'
        ``region_*`` knobs without the prefix: samples, steps, lr, batch, target) then also reconstructs every
        MLP layer by layer (within the 'refit' phase; needs the refit's windows > 0); ``adaptive`` holds the adaptive
        search's knobs (see :func:`engine_allocation`). An empty ``name`` gets :func:`prune_name`
        (with '-2', '-3'… when taken); a typed name the session holds is refused, unless ``replace``
        (the Tour remakes its own variants), which replaces it with a notice. A full session makes room
        with any variant but those in ``keep``. ``on_phase(phase)`` is called as each part of the work
        starts: 'widths' (the allocation; the adaptive search), then 'refit' when compensating."""
        if not session.model_spec or criterion not in session.scores:
            raise PruneConfigError(f"Score the model with '{criterion}' first (Importance tab).")
        typed = (name or "").strip()
        if typed == "original":
            raise PruneConfigError("'original' names the unpruned model; choose another variant name.")
        compensation = self.compensation(session, [criterion], compensate_windows, region)
        default = prune_name(criterion, ratio, allocation, compensation.method)
        name = typed if replace and typed else session.new_name(typed, default)
        if name not in session.variants:
            session.room_for(keep)  # a full session that cannot make room refuses before the work
        loaded = self.model(session.model_spec)
        scores = session.scores[criterion]
        phase = on_phase or (lambda _phase: None)
        bars = engine_bars()
        with self.model_lock:
            engine_name, options = engine_allocation(allocation, adaptive)
            phase("widths")
            plan = engine.preview_widths(loaded, float(ratio), engine_name, scores=scores, round_to=int(round_to),
                                         options=options, progress=bars, stop=stop, compensation=compensation)
            if compensation.method != "none":
                phase("refit")
            result = engine.prune_with_scores(loaded, scores, float(ratio), allocation=engine_name, options=options,
                                                round_to=int(round_to), plan=plan, progress=bars, stop=stop,
                                                compensation=compensation)
            model = pruned_view(loaded.model, result.kept, weights_from=result.model)  # shares non-MLP tensors
            del result.model
        config = {"model": session.model_spec, "name": name, "criterion": criterion, "ratio": float(ratio),
                  "allocation": allocation, "round_to": int(round_to), "compensation": compensation.to_dict(),
                  "scores_run": session.score_runs.get(criterion),
                  # the Tour's shipped scores have no score run: the report finds them by this file name
                  **({"scores_precomputed": scores.config.get("precomputed_file") or True}
                     if scores.config.get("precomputed") else {}),
                  "session": session.session_id, **(session.data.match() if session.data else {})}
        run = self.runs.create("prune", config, results={"widths": result.widths, "meta": result.meta},
                               kept=result.kept)
        variant = Variant(name, session.model_spec, model, result.widths, result.meta, run.run_id)
        return variant, session.add_variant(variant, keep=keep, replace=replace)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate_variants(self, session: Session, names: list[str], windows: int, seq_len: int) -> list[dict]:
        """Perplexity + fidelity to the original of the original and each named variant; the metrics
        are written into each variant's prune run."""
        loaded = self.model(self.require_model(session))
        source = session.source
        ids = evaluation_windows(loaded.tokenizer, source, int(windows), int(seq_len), max_length=loaded.max_length)
        rows = []
        with self.model_lock:
            reference = Reference(loaded.model, ids)  # the original runs once, not once per variant
            base = evaluate_reference(reference, progress=engine_bars()).to_dict()
            rows.append({"variant": "original", **base})
            for name in names:
                variant = self.variant(session, name)
                metrics = evaluate(variant.model, ids, reference, progress=engine_bars()).to_dict()
                variant.metrics = metrics
                if variant.run_id:
                    try:
                        self.runs.update_results(variant.run_id, {"metrics": metrics})
                    except HFPruneError:
                        pass  # the run was deleted meanwhile; the variant itself is still usable
                rows.append({"variant": name, **metrics})
        return rows

    def sweep(self, session: Session, names: list[str], ratios: list[float], allocation: str, round_to: int,
              windows: int, seq_len: int, stop: Callable[[], bool] | None = None,
              compensate_windows: int = 64, baseline: bool = False, draws: int = 1,
              on_draw: Callable[[str, int, int], None] | None = None) -> Iterator[dict]:
        """Criteria × ratio fidelity rows (engine: core.sweep) for this session's scored criteria;
        ``+lsq`` allocations refit on ``compensate_windows`` calibration windows; ``baseline`` adds
        rows for seeded random scores (criterion ``BASELINE``), the floor every criterion must beat.
        ``draws`` K ≥ 2: each criterion is scored on K disjoint calibration draws (:meth:`draw_scores`)
        and each row is the summary over them (core.stability.sweep_over_draws: KL mean, std, min,
        max, per-draw values); ``on_draw(criterion, k, K)`` is called before each scoring pass."""
        draws = check_sweep_draws(draws, allocation)
        loaded = self.model(self.require_model(session))
        missing = [n for n in names if n not in session.scores]
        if missing:
            raise HFPruneError(f"Score {', '.join(missing)} first (Importance tab).")
        source = session.source
        ids = evaluation_windows(loaded.tokenizer, source, int(windows), int(seq_len), max_length=loaded.max_length)
        compensation = self.compensation(session, names, compensate_windows)
        if draws > 1:
            scored_draws = self.draw_scores(session, names, draws, baseline=baseline, stop=stop, on_draw=on_draw)
            rows = sweep_over_draws(loaded, scored_draws, ratios, ids, allocation=allocation, round_to=int(round_to),
                                    compensation=compensation, progress=engine_bars(), stop=stop)
            yield from locked_steps(self.model_lock, rows)
            return
        scored = {n: session.scores[n] for n in names}
        if baseline:
            scored[BASELINE] = self.random_scores(session)
        rows = fidelity_sweep(loaded, scored, ratios, ids,
                              allocation=allocation, round_to=int(round_to), progress=engine_bars(),
                              stop=stop, compensation=compensation)
        yield from locked_steps(self.model_lock, rows)

    def draw_scores(self, session: Session, names: list[str], draws: int, *, baseline: bool = False,
                    stop: Callable[[], bool] | None = None,
                    on_draw: Callable[[str, int, int], None] | None = None) -> dict[str, list[engine.ScoreResult]]:
        """criterion → K score results on K disjoint calibration draws of the session's data
        (core.stability.draw_windows; draw 0 is the session's own scores, whose windows it is), each
        criterion with the parameters its session scores were made with. Draws k ≥ 1 are scored one
        pass at a time under ``model_lock`` and kept in the score cache (key: the scores' key + draw k;
        a draw's windows do not depend on K). ``baseline``: random scores seeded seed + k. Their
        configs name ``source`` by its path, so a ``+lsq`` refit reads the right text."""
        spec = self.require_model(session)
        loaded = self.model(spec)
        data = session.calibration
        windows: list[torch.Tensor] | None = None
        out: dict[str, list[engine.ScoreResult]] = {}
        for name in names:
            first = session.scores[name]
            params = resolve_params(name, first.config.get("criterion_params"))
            config = {**first.config, "source": data.source, "source_label": data.label, "samples": data.samples,
                      "seq_len": data.seq_len, "seed": data.seed}
            batch_size = int(first.config.get("batch_size") or 1)
            results = [engine.ScoreResult(first.scores, {**config, "draw": 0}, first.seconds)]
            for k in range(1, draws):
                key = (*ScoreCache.key(spec, data, name, params), "draw", k)
                hit = self.scores.get(key)
                if hit is None:
                    check_stop(stop, "The sweep was stopped.")
                    if windows is None:  # tokenised once, only when some draw is not cached
                        windows = draw_windows(loaded, StabilityOptions(draws=draws, samples=data.samples,
                                                                        seq_len=data.seq_len, seed=data.seed,
                                                                        source=data.source))
                    if on_draw is not None:
                        on_draw(name, k, draws)
                    with self.model_lock:
                        start = time.perf_counter()
                        scores = score_draws(loaded, [name], [windows[k]], params={name: params},
                                             batch_size=batch_size, seed=data.seed, progress=engine_bars(),
                                             stop=stop)[name][0]
                        seconds = time.perf_counter() - start
                    hit = (engine.ScoreResult(scores, {**config, "draw": k}, seconds), "")
                    self.scores.put(key, *hit)
                results.append(hit[0])
            out[name] = results
        if baseline:
            out[BASELINE] = [self.random_scores(session, draw=k) for k in range(draws)]
        return out

    # -- quantize / zero-shot / speed --------------------------------------------------------
    def quantize(self, session: Session, source: str, method: str) -> tuple[Variant, str | None]:
        """A quantized copy of 'original' or a session variant, held as variant '<source>+<method>' (with
        '-2', '-3'… when taken). A full session makes room with any variant but ``source``, or refuses
        before quantizing."""
        check_method(method)  # unknown method / missing backend: a clear error before any copying
        base_spec = self.require_model(session)
        name = session.new_name("", f"{source}+{method}")
        session.room_for(keep=(source,))
        if source == "original":
            model, widths, meta = self.model(base_spec).model, None, {"criterion": None, "ratio": 0.0}
        else:
            variant = self.variant(session, source)
            if variant.meta.get("quantization"):
                raise HFPruneError(f"'{source}' is already quantized; quantize the unquantized variant instead.")
            model, widths, meta = variant.model, variant.widths, variant.meta
        with self.model_lock:
            quantized = quantize_model(copy.deepcopy(model), method)
        widths = widths or [h for h in mlp_widths_any(quantized)]
        variant = Variant(name, base_spec, quantized, list(widths), {**meta, "quantization": method, "source": source})
        return variant, session.add_variant(variant, keep=(source,))

    def zeroshot(self, session: Session, names: list[str], tasks: list[str], limit: int,
                 stop: Callable[[], bool] | None = None,
                 on_model: Callable[[int, int, str], None] | None = None) -> list[dict]:
        """lm-eval zero-shot accuracies (acc, acc_norm, each with its binomial standard error; the
        task's chance level) of the original and each named variant. ``on_model(k, n, name)`` is
        called before model k (0-based) of n; ``stop`` is checked between models."""
        tasks = check_tasks(tasks)
        rows = []
        tokenizer = self.model(self.require_model(session)).tokenizer
        chosen = self.models_for(session, names)
        for index, (name, model) in enumerate(chosen.items()):
            check_stop(stop, "The zero-shot run was stopped.")
            if on_model is not None:
                on_model(index, len(chosen), name)
            with self.model_lock:
                result = run_zeroshot(model, tokenizer, tasks, limit=int(limit), progress=engine_bars())
            row = {"variant": name}
            for task, entry in result["tasks"].items():
                for metric in ("acc", "acc_norm"):
                    if metric in entry:
                        row[f"{task} {metric}"] = entry[metric]
                        row[f"{task} {metric}_stderr"] = entry.get(f"{metric}_stderr")
                row[f"{task} n"] = entry["n"]
                row[f"{task} chance"] = entry.get("chance")
            rows.append(row)
        return rows

    def bench(self, session: Session, names: list[str], prefill_tokens: int, decode_tokens: int,
              repeats: int, max_repeats: int | None = None, budget_s: float | None = None,
              stop: Callable[[], bool] | None = None,
              on_model: Callable[[int, int, str], None] | None = None,
              on_step: Callable[[str, int, int, float], None] | None = None) -> Iterator[dict]:
        """Measured prefill latency, decode speed, memory and size of the original and each variant,
        one row yielded as each model finishes (the original first: the baseline of the speed-ups).
        Each timing is repeated ``repeats`` times, and up to ``max_repeats`` until its spread is known,
        within ``budget_s`` seconds per model (:class:`SpeedBudget`; None: no limit); rows carry prefill
        and decode speed-ups with their quartile intervals and the spread each timing reached.
        ``on_step(phase, done, most, fraction)``: each repeat, with the fraction of this model done.
        A Stop raises :class:`~core.errors.Stopped`; the rows already yielded are the caller's to keep.
        The model lock is held while one model is measured, never across a ``yield``."""
        loaded = self.model(self.require_model(session))
        dense = mlp_widths_any(loaded.model)
        rows: list[dict] = []
        chosen = self.models_for(session, names)
        for index, (name, model) in enumerate(chosen.items()):
            if on_model is not None:
                on_model(index, len(chosen), name)
            report = None if on_step is None else _bench_step(on_step, budget_s)
            with self.model_lock:
                result = measure_speed(model, loaded.tokenizer, prefill_tokens=int(prefill_tokens),
                                       decode_tokens=int(decode_tokens), repeats=int(repeats),
                                       max_repeats=max_repeats, budget_s=budget_s, stop=stop, on_progress=report,
                                       method=getattr(model, "hfprune_quantization", None))
            rows.append({"variant": name, **result.to_dict(),
                         "ideal_speedup": ideal_speedup(model, dense, int(prefill_tokens))})
            add_measured_speedups(rows)  # row k's speed-ups are against row 0: earlier rows do not change
            yield rows[-1]

    # -- llama.cpp (issue 22): the variants as GGUF files, measured in llama.cpp itself ----------------
    @staticmethod
    def llamacpp_missing() -> str | None:
        """None when llama-cpp-python can be imported, else the sentence saying how to install it."""
        return llama_cpp_missing()

    def llamacpp_bench(self, session: Session, names: list[str], gguf_type: str, options: LlamaCppOptions,
                       stop: Callable[[], bool] | None = None,
                       on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """The original and each named variant written as GGUF ``gguf_type`` (a temporary folder, removed
        afterwards) and measured in llama.cpp (core.measure.llamacpp): prompt / generation tokens/s with
        their spread, speed-ups over the original in the same format beside the FLOP ideal, perplexity
        and KL to the original from llama.cpp's logits. A variant whose widths do not fill the type's
        blocks, or a torch-quantized one, is refused in one sentence before anything is written."""
        missing = llama_cpp_missing()
        if missing:
            raise LlamaCppMissing(missing)
        gguf = GGUFOptions(type=gguf_type)
        loaded = self.model(self.require_model(session))
        chosen = self.models_for(session, names)
        for name in chosen:
            if name == "original":
                continue
            variant = self.variant(session, name)
            if variant.meta.get("quantization"):
                raise HFPruneError(f"'{name}' is quantized in torch; llama.cpp quantizes by itself: pick its "
                                   "unquantized source and a GGUF type.")
            check_gguf_widths(gguf.type, variant.widths, f"'{name}'")
        work = Path(tempfile.mkdtemp(prefix="hfprune-llamacpp-"))
        try:
            paths = {}
            for index, (name, model) in enumerate(chosen.items()):
                check_stop(stop, "The llama.cpp measurement was stopped.")
                paths[name] = save_gguf(model, loaded.tokenizer, work / f"{index}-{gguf.file_name()}", gguf,
                                        source=session.model_spec, name=name)
            return measure_llamacpp(paths, options, reference="original", tokenizer=loaded.tokenizer, stop=stop,
                                    on_progress=on_progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # -- dashboard helpers (issue 10): quality at a glance, the sweep's random baseline ---------
    QUICK_WINDOWS, QUICK_SEQ_LEN = QUICK_EVAL  # held-out windows × tokens of the quality shown after Prune

    def quick_quality(self, session: Session, name: str, stop: Callable[[], bool] | None = None) -> dict:
        """Perplexity of the original and of variant ``name`` and the variant's KL to the original on a
        few held-out windows: {} when the held-out text has no room for one window."""
        loaded = self.model(self.require_model(session))
        variant = self.variant(session, name)
        source = session.source
        windows = min(self.QUICK_WINDOWS, window_capacity(loaded.tokenizer, source, "evaluation", self.QUICK_SEQ_LEN))
        if windows < 1:
            return {}
        ids = evaluation_windows(loaded.tokenizer, source, windows, self.QUICK_SEQ_LEN, max_length=loaded.max_length)
        with self.model_lock:
            key = (session.model_spec, source, windows, self.QUICK_SEQ_LEN)
            if key not in self._quick_originals:  # the original runs once per set of windows (~50 MB of log-probs)
                reference = Reference(loaded.model, ids)
                self._quick_originals[key] = (reference, evaluate_reference(reference, progress=False).perplexity)
                while len(self._quick_originals) > 4:
                    self._quick_originals.pop(next(iter(self._quick_originals)))
            reference, original = self._quick_originals[key]
            metrics = evaluate(variant.model, ids, reference, progress=False, stop=stop)
        return {"windows": windows, "seq_len": self.QUICK_SEQ_LEN, "original_perplexity": original,
                "perplexity": metrics.perplexity, "kl": metrics.kl_to_reference, "top1": metrics.top1_agreement}

    PROBE_MAX_AGE_S = 10.0  # an estimate re-times the model when its last probe is older than this
    PROBE_SECONDS = 0.5  # … for about this long: a burst of other work is averaged in, not hit or missed

    def seconds_per_token(self, spec: str) -> float:
        """The model's forward time per token on this machine, timed on the spot (a short probe, at
        most every :attr:`PROBE_MAX_AGE_S`), so the estimates built on it include the machine's current
        load; while a job holds the model the last probe is used rather than waiting for the job."""
        # a warm model needs no warm-up forward: forwards of 2 × 64 tokens for PROBE_SECONDS, at least two
        return self._probe(spec, self._per_token, lambda model, warm: seconds_per_token(
            model, repeats=2, warmup=0 if warm else 1, min_seconds=self.PROBE_SECONDS))

    def decode_step_seconds(self, spec: str) -> float:
        """The model's one-token KV-cached decode step on this machine, timed on the spot like
        :meth:`seconds_per_token` (same age and lock rules): on a CPU it is not a fixed multiple of a
        batched forward's time per token, and the ratio changes with the load."""
        return self._probe(spec, self._per_step, lambda model, warm: seconds_per_decode_step(
            model, warmup=0 if warm else 1, min_seconds=self.PROBE_SECONDS / 2))

    def _probe(self, spec: str, store: dict[str, tuple[float, float]],
               measure: Callable[[torch.nn.Module, bool], float]) -> float:
        """``measure(model, warm)`` for ``spec``'s model, kept in ``store`` for :attr:`PROBE_MAX_AGE_S`; while
        a job holds the model lock the last value is used (only a first probe waits for the lock)."""
        loaded = self.model(spec)
        last = store.get(spec)
        if last is not None and time.monotonic() - last[1] <= self.PROBE_MAX_AGE_S:
            return last[0]
        if not self.model_lock.acquire(blocking=last is None):
            return last[0]
        try:
            value = measure(loaded.model, last is not None)
        finally:
            self.model_lock.release()
        store[spec] = (value, time.monotonic())
        return value

    def bench_seconds(self, spec: str, models: int, prefill_tokens: int, decode_tokens: int, repeats: int,
                      budget_s: float, eval_tokens: int = 0) -> tuple[float, float]:
        """(seconds per model, seconds in all) of a :meth:`bench` of ``models`` models on this machine now:
        each model's budget, or what the warm-up and the fewest repeats every timing runs need
        (:data:`core.measure.speed.MIN_SPREAD_REPEATS`) when that is more (core.measure.timing's
        budgeted_speed_seconds with both probes); in all, with the models and their reference over
        ``eval_tokens`` held-out tokens afterwards (the size-vs-quality plot's perplexity)."""
        fewest = min(int(repeats), MIN_SPREAD_REPEATS)
        per_token = self.seconds_per_token(spec)
        each = budgeted_speed_seconds(per_token, int(prefill_tokens), int(decode_tokens), float(budget_s or 0),
                                      fewest, per_step=self.decode_step_seconds(spec))
        return each, models * each + evaluation_seconds(per_token, int(eval_tokens), models + 1)

    def adaptive_seconds(self, spec: str, halvings: int, heldout_samples: int, heldout_seq_len: int,
                         sequential: bool = False) -> float:
        """About how long the adaptive search would take on this machine (core.timing)."""
        layers = len(mlp_widths(self.model(spec).model))
        return adaptive_seconds(self.seconds_per_token(spec), layers, halvings, heldout_samples * heldout_seq_len,
                                sequential)

    PRUNE_PHASES = ("scores", "widths", "refit", "quality")  # the parts of a Prune, in order (see prune_seconds)

    def prune_seconds(self, session: Session, model_spec: str, data: DataSpec, criterion: str, allocation: str, *,
                      params: dict | None = None, adaptive: dict | None = None,
                      compensate_windows: int = 0, region: dict | None = None) -> dict[str, float]:
        """About how long each part of a Prune takes on this machine now, in :attr:`PRUNE_PHASES` order:
        scoring (0 when the scores are stored), the widths (the adaptive search; others are instant; a search
        that probes with the refit computes the refit's statistics first, so they count here), the
        least-squares refit (with ``region``: and the whole-MLP reconstruction, about 2.5 forward passes
        over its tokens plus its Adam steps) and the quality at a glance — scaled from a probe timed on the spot."""
        per_token = self.seconds_per_token(model_spec)
        stored = self.stored_scores(session, model_spec, data, criterion, params)
        scores = 0.0 if stored else scoring_seconds(per_token, data.samples * data.seq_len, REGISTRY[criterion].cost)
        widths = 0.0
        if allocation in ("adaptive", SEQUENTIAL):
            _, options = engine_allocation(allocation, adaptive)
            widths = self.adaptive_seconds(model_spec, options.halvings, options.heldout_samples,
                                           options.heldout_seq_len, sequential=allocation == SEQUENTIAL)
        refit = refit_seconds(per_token, int(compensate_windows) * data.seq_len)
        if widths and refit and options.refit_probes:  # the search probes with the refit: its statistics come first
            widths, refit = widths + refit, 0.0
        if region:
            knobs = engine.CompensationOptions("region", **{f"region_{k}": v for k, v in region.items()})
            refit += (2.5 * refit_seconds(per_token, knobs.region_samples * data.seq_len)
                      + 2 * per_token * knobs.region_steps * knobs.region_batch)
        quality = evaluation_seconds(per_token, self.QUICK_WINDOWS * self.QUICK_SEQ_LEN, models=2)
        return dict(zip(self.PRUNE_PHASES, (scores, widths, refit, quality)))

    # -- the Tour's precomputed default scores (assets/tour; recomputable with one click) ------------
    def tour_seconds(self, session: Session, model_spec: str, data: DataSpec, criteria: list[str], folder: Path,
                     recompute: bool = False) -> list[float]:
        """About how long :meth:`tour_scores` takes for each criterion on this machine now: 0 for shipped or
        stored scores, else a scoring pass scaled from a probe timed on the spot."""
        out = []
        for criterion in criteria:
            shipped = not recompute and (folder / tour_file(model_spec, data, criterion)).is_file()
            stored = self.stored_scores(session, model_spec, data, criterion)
            if shipped or (stored is not None and stored[2] != "precomputed"):
                out.append(0.0)
            else:
                out.append(scoring_seconds(self.seconds_per_token(model_spec), data.samples * data.seq_len,
                                           REGISTRY[criterion].cost))
        return out

    def tour_scores(self, session: Session, model_spec: str, data: DataSpec, criteria: list[str], folder: Path,
                    recompute: bool = False, stop: Callable[[], bool] | None = None,
                    on_criterion: Callable[[int, str], None] | None = None) -> dict[str, str]:
        """Make ``criteria``'s scores for (model, data) the session's: read from ``folder`` (shipped,
        computed with exactly these settings; marked ``precomputed`` in their config) unless ``recompute``
        or a file is missing or does not fit the model, else computed here (cached / stored like any
        scoring). ``on_criterion(k, name)`` is called before criterion k. Returns {criterion:
        'precomputed' | 'memory' | 'disk' | 'computed'}."""
        widths = mlp_widths(self.model(model_spec).model)
        origins = {}
        for index, criterion in enumerate(criteria):
            if on_criterion is not None:
                on_criterion(index, criterion)
            path = folder / tour_file(model_spec, data, criterion)
            result = None
            if not recompute and path.is_file():
                result = engine.ScoreResult.load(path)
                if [s.numel() for s in result.scores] != widths:
                    result = None  # shipped for another model: compute instead
            if result is None:
                held = session.scores.get(criterion)
                if held is not None and held.config.get("precomputed"):
                    del session.scores[criterion]  # recompute means: not the shipped ones
                origins[criterion] = self.score(session, model_spec, data, criterion, stop=stop)[2]
                continue
            session.set_context(model_spec, data)
            result.config = {**result.config, "precomputed": True, "precomputed_file": path.name}
            session.scores[criterion] = result
            session.score_runs.pop(criterion, None)
            origins[criterion] = "precomputed"
        return origins

    def tour_draws(self, folder: Path) -> dict:
        """The Tour's precomputed calibration-draw numbers (``folder``/draws.json, core.stability.tour_draws),
        read once."""
        path = Path(folder) / "draws.json"
        if path not in self._tour_draws:
            self._tour_draws[path] = load_tour_draws(path)
        return self._tour_draws[path]

    def random_scores(self, session: Session, draw: int = 0) -> engine.ScoreResult:
        """Seeded random scores for the session's model (the sweep's baseline row; weights only, instant);
        ``draw`` k shifts the seed by k (the baseline's k-th calibration draw)."""
        loaded = self.model(self.require_model(session))
        with self.model_lock:  # random scores read no text: one tiny window satisfies the signature
            return engine.score_model(loaded, "random", source=session.source, samples=1, seq_len=16,
                                      seed=session.calibration.seed + int(draw), progress=False)

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def compensation(session: Session, criteria: list[str], windows: int,
                     region: dict | None = None) -> engine.CompensationOptions:
        """Least-squares compensation on ``windows`` calibration windows of the scores' window length
        (``windows`` 0 = none); with ``region`` ({samples, steps, lr, batch, target}: the ``region_*`` knobs)
        the whole-MLP reconstruction after it."""
        config = session.scores[criteria[0]].config if criteria and criteria[0] in session.scores else {}
        if region and windows <= 0:
            raise PruneConfigError("The whole-MLP reconstruction starts from the least-squares refit: turn the "
                                   "refit on too.")
        knobs = {f"region_{k}": v for k, v in (region or {}).items() if v is not None}
        method = ("region" if region else "lsq") if windows > 0 else "none"
        return engine.CompensationOptions(method, samples=max(1, int(windows)),
                                          seq_len=int(config.get("seq_len") or 128), **knobs)

    def require_model(self, session: Session) -> str:
        if not session.model_spec:
            raise HFPruneError("Load a model first (Model & data tab, or press Score).")
        return session.model_spec

    def variant(self, session: Session, name: str) -> Variant:
        if name not in session.variants:
            raise PruneConfigError(f"No variant named '{name}' in this session; prune one first.")
        return session.variants[name]

    def models_for(self, session: Session, names: list[str]) -> dict[str, torch.nn.Module]:
        """{'original': base, name: variant, ...} for the names picked (unknown names are an error)."""
        loaded = self.model(self.require_model(session))
        chosen = {"original": loaded.model}
        for name in names:
            if name != "original":
                chosen[name] = self.variant(session, name).model
        return chosen

    # -- what models say (Compare, the Tour) -----------------------------------------------
    def generate(self, session: Session, names: list[str], prompt: str,
                 settings: GenerationSettings) -> dict[str, str]:
        """Generations of the original and each named variant for one prompt (same seed and settings)."""
        models = self.models_for(session, names)
        tokenizer = self.model(session.model_spec).tokenizer
        with self.model_lock:
            return generate_side_by_side(models, tokenizer, prompt, settings)

    def menus(self, session: Session, names: list[str], context: str, k: int) -> TokenMenu:
        """The next-token menus (top ``k`` of each) of the original and each named variant after ``context``."""
        models = self.models_for(session, names)
        tokenizer = self.model(session.model_spec).tokenizer
        with self.model_lock:
            return next_token_menus(models, tokenizer, context, int(k))

    def token_kl(self, session: Session, name: str, text: str) -> TokenKL:
        """Per-token KL of variant ``name`` to the original along ``text``."""
        models = self.models_for(session, [name])
        tokenizer = self.model(session.model_spec).tokenizer
        with self.model_lock:
            return per_token_kl_text(models["original"], models[name], tokenizer, text)

    # -- neuron inspector, rank stability, reports -------------------------------------------
    def neuron(self, session: Session, spec: str, data: DataSpec, layer: int, index: int, *, top_k: int,
               stop: Callable[[], bool] | None = None,
               on_progress: Callable[[str, float], None] | None = None) -> NeuronReport:
        """One neuron of ``spec`` up close (core.neuron) on ``data``'s calibration windows, with its ranks
        under the session's scores; ``on_progress(what, fraction)`` as its two passes go."""
        loaded = self.model(spec)
        windows = calibration_windows(loaded.tokenizer, data.source, data.samples, data.seq_len, data.seed,
                                      max_length=loaded.max_length)
        with self.model_lock:
            return inspect_neuron(loaded, windows, int(layer), int(index), scores=session.scores, stop=stop,
                                  options=InspectOptions(top_k=int(top_k)), on_progress=on_progress)

    def stability(self, session: Session, spec: str, data: DataSpec, criteria: list[str], options: StabilityOptions,
                  *, ratios: list[float], params: dict | None = None, stop: Callable[[], bool] | None = None,
                  on_draw: Callable[[str, int], None] | None = None) -> dict:
        """Score ``criteria`` on K disjoint draws of ``data`` and compare them (core.stability); the result
        is stored as a ``stability`` run. Returns the result as a dict with its ``run_id``."""
        loaded = self.model(spec)
        with self.model_lock:
            result, _scores = measure_stability(loaded, criteria, options, ratios=ratios, params=params,
                                                progress=engine_bars(), stop=stop, on_draw=on_draw)
        out = result.to_dict()
        run = self.runs.create("stability", {**result.config, "model": spec, "source": data.label,
                                             "criteria": criteria, "session": session.session_id},
                               results={"stability": out, "summary": result.summary()})
        return {**out, "run_id": run.run_id}

    def export_report(self, run_id: str, contexts: list[str],
                      on_step: Callable[[int, str], None] | None = None) -> tuple[str, Path]:
        """A stored score or prune run as one HTML file (core.report) in a fresh temporary folder: (html, path).
        A prune run's model is rebuilt to draw the menus after ``contexts`` and, without stored metrics,
        to evaluate it on the held-out windows of the quality at a glance (4 × 64 tokens), so the
        report's perplexity is the number the Prune tab showed; the report says which windows.
        ``on_step(k, what)`` as each of core.studies.report's REPORT_STEPS starts (its only progress)."""
        run = self.runs.load(run_id)
        loaded = self.model(run.config["model"]) if run.kind == "prune" else None
        with self.model_lock:
            html = build_report(run_id, store=self.runs, loaded=loaded, contexts=contexts,
                                eval_windows=self.QUICK_WINDOWS, eval_seq_len=self.QUICK_SEQ_LEN,
                                progress=False, on_step=on_step)
        folder = Path(tempfile.mkdtemp(prefix="hfprune-report-"))
        return html, write_report(html, folder / f"report-{run_id}.html")

    # -- the prune → quantize → distil pipeline ----------------------------------------------
    def pipeline(self, model_spec: str, options: PipelineOptions, *, out: Path, shared: Shared,
                 calibration: CalibrationOptions, train_options: TrainOptions, measure: MeasureOptions,
                 stop: Callable[[], bool] | None = None,
                 on_event: Callable[[dict], None] | None = None) -> PipelineResult:
        """One order of the pipeline (core.pipeline), exported to ``out``. Takes ``model_lock`` for the
        whole run: call it from a worker thread, never from a generator that yields while it runs."""
        loaded = self.model(model_spec)
        with self.model_lock:
            return run_pipeline(loaded, options, calibration=calibration, train_options=train_options, measure=measure,
                                out=out, shared=shared, stop=stop, on_event=on_event)

    def pipeline_ablation(self, model_spec: str, options: PipelineOptions, *, out_root: Path,
                          calibration: CalibrationOptions, train_options: TrainOptions, measure: MeasureOptions,
                          stop: Callable[[], bool] | None = None, on_event: Callable[[dict], None] | None = None,
                          on_row: Callable[[dict], None] | None = None) -> AblationResult:
        """All six orders at the same settings (core.pipeline.run_ablation), rows stored as runs and
        reused. Takes ``model_lock`` for the whole run: call it from a worker thread."""
        loaded = self.model(model_spec)
        with self.model_lock:
            return run_ablation(loaded, options, out_root=out_root, store=self.runs, calibration=calibration,
                                train_options=train_options, measure=measure, stop=stop, on_event=on_event,
                                on_row=on_row)

    # -- runs ------------------------------------------------------------------------------
    def load_run(self, session: Session, run_id: str) -> str:
        """Bring a stored run back into this session: scores → active scores; prune → a variant."""
        run = self.runs.load(run_id)
        config = run.config
        model_spec = config.get("model")
        if run.kind == "score":
            data = DataSpec(config.get("source_path") or config["source"], config["source"], int(config["samples"]),
                            int(config["seq_len"]), int(config.get("seed", 0)))
            session.set_context(model_spec, data)
            result = engine.ScoreResult(run.scores(), config, float(run.results.get("seconds", 0)))
            self.scores.put(ScoreCache.key(model_spec, data, config["criterion"], config.get("criterion_params")),
                            result, run.run_id)
            session.scores[config["criterion"]] = result
            session.score_runs[config["criterion"]] = run.run_id
            return f"Loaded {config['criterion']} scores of {model_spec} from run {run_id}."
        if run.kind == "prune":
            self.model(model_spec)  # loaded (or found cached) before the lock is taken
            with self.model_lock:
                model = self.rebuild_variant_model(run)
            session.switch_model(model_spec)
            name = loaded_name(session, config.get("name") or run_id, run.run_id)
            variant = Variant(name, model_spec, model, list(run.results.get("widths", [])),
                              run.results.get("meta", {}), run.run_id, run.results.get("metrics"))
            evicted = session.add_variant(variant, replace=True)
            extra = f" ('{evicted}' was dropped from this session to make room)" if evicted else ""
            return f"Loaded pruned variant '{name}' of {model_spec} from run {run_id}{extra}."
        if run.kind == "recover":
            return self.load_recover_run(session, run)
        if run.kind == "ddp":
            return self.load_ddp_run(session, run)
        raise HFPruneError(f"Run {run_id} is of kind '{run.kind}', which cannot be loaded into the dashboard.")

    def delete_run(self, run_id: str, session: Session | None = None) -> None:
        """Delete a stored run. With ``session``, a run that another open browser session created is
        refused (runs of closed or earlier sessions — e.g. before a restart — may be deleted by anyone)."""
        if session is not None:
            owner = self.runs.load(run_id).config.get("session")
            if owner and owner != session.session_id and owner in self.sessions:
                raise HFPruneError(f"Run {run_id} belongs to another open browser session; it can be deleted "
                                   "there, or by anyone once that session has closed.")
        self.runs.delete(run_id)
        self.scores.forget_run(run_id)

    # -- export ----------------------------------------------------------------------------
    def export(self, session: Session, name: str, mode: str, folder: str | os.PathLike,
               gguf_type: str = GGUFOptions.type) -> Path:
        """Save a variant with the engine's exporter (safetensors + pruning_meta.json; GGUF: one file of
        ``gguf_type``, whose block the variant's widths must fill — else one sentence saying to prune again
        with widths rounded to it, as ``prune --export gguf`` does by default)."""
        variant = self.variant(session, name)
        if variant.meta.get("quantization"):
            raise HFPruneError(f"'{name}' is quantized: export its unquantized source and apply "
                               f"`python -m core quantize --method {variant.meta['quantization']}` to the folder.")
        gguf = GGUFOptions(type=gguf_type) if mode == "gguf" else None
        if gguf is not None:
            check_gguf_widths(gguf.type, variant.widths, f"'{name}'")
        loaded = self.model(variant.base_spec)
        meta = {**variant.meta, "variant_name": name, "run_id": variant.run_id}
        return save_pruned(variant.model, loaded.tokenizer, folder, meta, mode=mode, gguf=gguf)

    def save_to_folder(self, session: Session, name: str, mode: str, folder: str,
                       gguf_type: str = GGUFOptions.type) -> Path:
        """Export a variant into a folder the user typed, kept inside ``export_root`` when one is set."""
        target = Path(folder).expanduser()
        if self.export_root is not None:
            target = (self.export_root / target).resolve()
            if not target.is_relative_to(self.export_root):
                raise HFPruneError(f"This server saves exports only inside {self.export_root}; "
                                   f"'{folder}' is outside it (download the .zip instead).")
            self.export_root.mkdir(parents=True, exist_ok=True)
        return self.export(session, name, mode, target, gguf_type)

    def export_zip(self, session: Session, name: str, mode: str, gguf_type: str = GGUFOptions.type) -> Path:
        """Export into a fresh temporary folder and pack it as ``<name>.zip`` (stored, not deflated:
        safetensors barely compress) for download."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "variant"
        if session.export_dir:  # one archive per session on disk: the previous download is done with
            shutil.rmtree(session.export_dir, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix="hfprune-export-"))
        session.export_dir = str(work)
        folder = self.export(session, name, mode, work / safe, gguf_type)
        archive = zip_folder(folder, work / f"{safe}.zip")
        shutil.rmtree(folder, ignore_errors=True)
        return archive

    # -- recovery (issue 11: distil a pruned variant from the original) ----------------------------
    def recover(self, session: Session, source: str, *, params: str = "mlp", minutes: float = 2.0, steps: int = 0,
                lr: float = RECOVER_TRAIN["lr"], name: str = "", lora_rank: int = 16, tau: float = 1.0,
                alpha: float = 1.0, batch_size: int = 4, seq_len: int = 128,
                eval_every: int = RECOVER_TRAIN["eval_every"], keep: Collection[str] = (),
                stop: Callable[[], bool] | None = None,
                on_step: Callable[[object], None] | None = None,
                teacher_logits: str = TeacherOptions.logits) -> tuple[Variant, str | None]:
        """Train a copy of variant ``source`` against the session's original (core.recover) for the
        budget, store it as a ``recover`` run (its trained tensors, or its LoRA adapters) and add it as
        a new variant. Takes ``model_lock`` for the whole run: call it from a worker thread, never
        from a generator that yields while it runs. Stop leaves ``source`` untouched, stores nothing. A
        full session makes room with any variant but ``source`` and those in ``keep``. ``teacher_logits``
        "cached": the original runs once over a subset of the training windows (or that pass is read
        from the disk cache) and each step runs only the student (core.train.teacher_cache)."""
        variant = self.variant(session, source)
        teacher = TeacherOptions(logits=teacher_logits)
        name = self.recover_name(session, source, params, name, keep)
        options = RecoverOptions(params=params, seq_len=int(seq_len),
                                 source=session.source)
        train_options = TrainOptions(minutes=float(minutes), steps=int(steps), lr=float(lr),
                                     batch_size=int(batch_size), eval_every=int(eval_every),
                                     warmup_steps=TrainOptions.warmup_for(int(steps)))
        distill = DistillOptions(tau=float(tau), alpha=float(alpha))
        lora = LoraOptions.for_rank(lora_rank)
        loaded = self.model(variant.base_spec)
        with self.model_lock:
            student = LoadedModel(copy.deepcopy(variant.model), loaded.tokenizer, f"{variant.base_spec}:{source}", "")
            result = recover(student, loaded, options, train_options, distill, lora, meta=variant.meta, stop=stop,
                             on_step=on_step, teacher_options=teacher)
        weights = result.lora_state if params == "lora" else _trained_tensors(result.model, params)
        config = {"model": variant.base_spec, "name": name, "source_variant": source, "source_run": variant.run_id,
                  "params": params, "recover_options": options.to_dict(), "train": train_options.to_dict(),
                  "distill": distill.to_dict(), "lora": lora.to_dict(), "teacher": teacher.to_dict(),
                  "session": session.session_id}
        widths = mlp_widths_any(result.model)
        run = self.runs.create("recover", config, results={"widths": widths, "meta": result.meta}, weights=weights)
        recovered = Variant(name, variant.base_spec, result.model, widths, result.meta, run.run_id)
        return recovered, session.add_variant(recovered, keep=(source, *keep))

    def recover_name(self, session: Session, source: str, params: str, name: str = "",
                     keep: Collection[str] = ()) -> str:
        """The name the recovered variant will get (typed, or '<source>+kd-<params>' with '-2', '-3'… when
        taken), refused with one sentence — before any training — when it cannot be stored: a typed
        name the session holds, or a full session where only ``source`` could make room."""
        self.variant(session, source)
        typed = (name or "").strip()
        if typed in ("original", source):
            raise PruneConfigError(f"Name the recovered variant differently from '{typed}'.")
        name = session.new_name(typed, f"{source}+kd-{params}")
        session.room_for(keep=(source, *keep))
        return name

    def rebuild_variant_model(self, run) -> torch.nn.Module:
        """The model of a stored prune, ddp or recover run (core.report.rebuild_run_model on its base model).
        Callers hold ``model_lock``."""
        return rebuild_run_model(run, self.model(run.config.get("model")), self.runs, progress=engine_bars())

    def load_recover_run(self, session: Session, run) -> str:
        """A stored recover run → a session variant (rebuilt from the prune run it started from)."""
        return self._load_rebuilt_run(session, run, "recovered")

    def _load_rebuilt_run(self, session: Session, run, label: str) -> str:
        """A stored run → a session variant via ``rebuild_variant_model``; returns the status sentence,
        which calls the variant ``label`` (e.g. 'recovered', 'DDP')."""
        model_spec = run.config.get("model")
        with self.model_lock:
            model = self.rebuild_variant_model(run)
        session.switch_model(model_spec)
        name = loaded_name(session, run.config.get("name") or run.run_id, run.run_id)
        variant = Variant(name, model_spec, model, list(run.results.get("widths", [])), run.results.get("meta", {}),
                          run.run_id, run.results.get("metrics"))
        evicted = session.add_variant(variant, replace=True)
        extra = f" ('{evicted}' was dropped from this session to make room)" if evicted else ""
        return f"Loaded {label} variant '{name}' of {model_spec} from run {run.run_id}{extra}."

    # -- DDP (issue 12: learned gates hardened into the pruned structure) --------------------------
    def ddp(self, session: Session, *, ratio: float = 0.2, units: str = "mlp", head_ratio: float = 0.0,
            minutes: float = 2.0, steps: int = 0, lr: float = 5e-2, warm_start: bool = False, name: str = "",
            batch_size: int = 4, seq_len: int = 128, eval_every: int = 10, kd_weight: float = 2.0,
            stop: Callable[[], bool] | None = None,
            on_step: Callable[[dict], None] | None = None) -> tuple[Variant, str | None, dict]:
        """Train DDP gates on the session's model for the budget (core.ddp), store the result as a
        ``ddp`` run (kept units + gate values) and add it as a variant. The entropy-Taylor scores of
        the session's calibration data (cached / stored like any scores) give the warm start and the
        widths a one-shot global entropy allocation would choose. Takes ``model_lock`` for the whole run
        (the gates hook into the shared model): call it from a worker thread, never from a generator
        that yields while it runs. Stop stores nothing and leaves the model as it was. Returns (variant,
        evicted variant name, {"history", "snapshots", "entropy_widths"})."""
        model_spec = self.require_model(session)
        name = self.ddp_name(session, units, ratio, name)
        data = session.calibration
        options = DDPOptions(ratio=float(ratio), units=units, head_ratio=float(head_ratio), warm_start=bool(warm_start),
                             kd_weight=float(kd_weight), seq_len=int(seq_len), source=data.source)
        train_options = TrainOptions(**{**TRAIN_DEFAULTS, "minutes": 0.0 if steps else float(minutes),
                                        "steps": int(steps), "lr": float(lr), "batch_size": int(batch_size),
                                        "eval_every": int(eval_every)})
        loaded = self.model(model_spec)
        scores = None
        if options.prunes_mlp:  # the warm start and the comparison with a one-shot entropy allocation
            scores = self.score(session, model_spec, data, "entropy", stop=stop)[0].scores
        with self.model_lock:
            result = ddp(loaded, options, train_options, scores=scores, stop=stop, on_step=on_step)
        config = {"model": model_spec, "name": name, "criterion": "ddp", "allocation": f"learned ({units})",
                  "ratio": float(ratio), "ddp": options.to_dict(), "train": train_options.to_dict(),
                  "source": data.label, "samples": result.meta["ddp"]["training_windows"], "seq_len": int(seq_len),
                  "seed": train_options.seed, "session": session.session_id}
        extra = {"history": result.history, "snapshots": result.snapshots, "entropy_widths": result.entropy_widths}
        run = self.runs.create("ddp", config, results={"widths": result.plan.widths(), "meta": result.meta, **extra},
                               weights=result.plan.to_tensors())
        variant = Variant(name, model_spec, result.model, result.plan.widths(), result.meta, run.run_id)
        return variant, session.add_variant(variant), extra

    def ddp_name(self, session: Session, units: str, ratio: float, name: str = "") -> str:
        """The name the DDP variant will get (typed, or 'ddp-<units>-<percent>' with '-2', '-3'… when taken),
        refused with one sentence — before any training — when the session already holds a typed name."""
        self.require_model(session)
        typed = (name or "").strip()
        if typed == "original":
            raise PruneConfigError("Name the DDP variant something other than 'original'.")
        name = session.new_name(typed, f"ddp-{units}-{round(float(ratio) * 100)}")
        session.room_for()
        return name

    def load_ddp_run(self, session: Session, run) -> str:
        """A stored ddp run → a session variant (the original folded and sliced again from the stored plan)."""
        return self._load_rebuilt_run(session, run, "DDP")


def loaded_name(session: Session, name: str, run_id: str) -> str:
    """The name a stored run gets when loaded: its own, kept when it is this very run loaded again (it is
    replaced by itself), else made free with '-2', '-3'… (a run's name was not typed now)."""
    held = session.variants.get(name)
    return name if held is None or held.run_id == run_id else session.free_name(name)


def _trained_tensors(model: torch.nn.Module, params: str) -> dict[str, torch.Tensor]:
    """The tensors a full / mlp recovery changed, by parameter name (tied weights stored once)."""
    return {n: p.detach().cpu().clone() for n, p in param_set(model, params).named}
