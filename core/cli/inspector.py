"""CLI subcommands ``neuron``, ``stability`` and ``report`` (seeing into a neuron, into the noise, and
writing a run up).

    python -m core neuron --layer 3 --index 17 --criteria entropy,cross_entropy --json
    python -m core stability --criteria entropy,cross_entropy --draws 4 --samples 16 --seq-len 128 \
        --ratios 0.2,0.3,0.4 --json
    python -m core report --run 20261201-120000-prune-abc123 --out report.html
"""
from __future__ import annotations

from pathlib import Path

from core.cli.prune import _common
from core.data.text import CalibrationOptions, calibration_windows, evaluation_windows
from core.errors import HFPruneError, SelectionError
from core.importance.criteria import resolve_params
from core.measure.evaluate import QUICK_EVAL
from core.methods.oneshot import ScoreResult, score_model
from core.models.loading import load_model
from core.models.placement import PlacementOptions, load_placed
from core.runs import RunStore
from core.studies.neuron import InspectOptions, check_neuron, inspect_neuron
from core.studies.report import DEFAULT_CONTEXTS, build_report, check_report_path, write_report
from core.studies.stability import (
    StabilityOptions,
    compare_over_draws,
    fidelity_over_draws,
    measure_stability,
)
from core.studies.sweep import parse_ratios

CALIBRATION_FIELDS = tuple(f.name for f, _spec, _kind in CalibrationOptions.knobs())


def _names(text: str | None) -> list[str]:
    return [c.strip() for c in (text or "").split(",") if c.strip()]


def _ratios(text: str) -> list[float]:
    return parse_ratios(text)


def register(sub) -> None:
    """Add the ``neuron``, ``stability`` and ``report`` subcommands."""
    neuron = sub.add_parser("neuron", help="one MLP neuron: its ranks, top-activating contexts and what removing "
                                           "it alone does there")
    _common(neuron)
    neuron.add_argument("--layer", type=int, required=True, help="decoder layer (0-based)")
    neuron.add_argument("--index", type=int, required=True, help="neuron index in that layer's MLP (0-based)")
    neuron.add_argument("--criteria", help="score these criteria on the same windows, comma-separated")
    neuron.add_argument("--scores-run", action="append", default=[], help="a stored score run (repeatable)")
    neuron.add_argument("--scores", action="append", default=[], help="a scores .safetensors file (repeatable)")
    neuron.add_argument("--runs-root", help="run store folder (default: the cache's runs folder)")
    InspectOptions.add_arguments(neuron, skip=("batch_size",))
    neuron.add_argument("--json", action="store_true", help="print one JSON object")
    neuron.set_defaults(handler=cmd_neuron)

    stab = sub.add_parser("stability", help="rank agreement of criteria across disjoint calibration draws")
    _common(stab)
    stab.add_argument("--criteria", default="entropy,cross_entropy", help="comma-separated criteria")
    StabilityOptions.add_arguments(stab, skip=CALIBRATION_FIELDS)  # --draws; the calibration flags come from _common
    stab.add_argument("--ratios", default="0.2,0.3,0.4", help="ratios for the removal overlap (and the KL bars)")
    stab.add_argument("--fidelity", action="store_true",
                      help="also prune with each draw's scores (uniform allocation) and give KL to dense over the "
                           "draws (error bars; the dashboard sweep's 'Error bars over K calibration draws')")
    stab.add_argument("--eval-windows", type=int, default=8, help="--fidelity: evaluation windows")
    stab.add_argument("--eval-seq-len", type=int, default=128, help="--fidelity: tokens per evaluation window")
    stab.add_argument("--json", action="store_true", help="print one JSON object")
    stab.set_defaults(handler=cmd_stability)

    report = sub.add_parser("report", help="a stored run as one self-contained HTML file (opens offline)")
    report.add_argument("--run", required=True, help="run id (see the dashboard's Runs tab)")
    report.add_argument("--out", required=True, help="output .html file (must not exist)")
    report.add_argument("--runs-root", help="run store folder (default: the cache's runs folder)")
    report.add_argument("--context", action="append", default=[],
                        help="prune runs: a context whose next-token menus (original vs pruned) are drawn "
                             "(repeatable; default two built-in ones)")
    report.add_argument("--no-model", action="store_true",
                        help="do not load the model: no menus, only what the run stored")
    report.add_argument("--eval-windows", type=int, default=QUICK_EVAL[0],
                        help="prune runs without stored metrics: held-out windows to measure them on (0: none; "
                             "default: the dashboard's quality at a glance)")
    report.add_argument("--eval-seq-len", type=int, default=QUICK_EVAL[1],
                        help="tokens per held-out window (default: the dashboard's quality at a glance)")
    report.add_argument("--quiet", action="store_true", help="no progress bars")
    report.set_defaults(handler=cmd_report)


def cmd_neuron(args) -> dict:
    options = InspectOptions.from_args(args, batch_size=args.batch_size)
    names = _names(args.criteria)
    store = RunStore(args.runs_root) if args.scores_run else None
    scores: dict[str, object] = {}
    for run_id in args.scores_run:  # read the stored scores before the (slow) model load
        run = store.load(run_id)
        if run.kind != "score":
            raise SelectionError(f"Run {run_id} is a {run.kind} run, not a score run.")
        scores[f"{run.config.get('criterion')} ({run_id})"] = run.scores()
    for path in args.scores:
        result = ScoreResult.load(path)
        scores[result.config.get("criterion") or Path(path).stem] = result
    for name in names:
        resolve_params(name)  # an unknown criterion: one sentence before the model loads
    loaded = load_placed(args.model, PlacementOptions.from_args(args))  # --device / --dtype as for score
    check_neuron(loaded.model, args.layer, args.index)
    computed = {name: score_model(loaded, name, source=args.source, samples=args.samples, seq_len=args.seq_len,
                                  seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)
                for name in names}
    windows = calibration_windows(loaded.tokenizer, args.source, args.samples, args.seq_len, args.seed,
                                  max_length=loaded.max_length)
    report = inspect_neuron(loaded, windows, args.layer, args.index, scores={**computed, **scores}, options=options)
    return {"model": args.model, "source": args.source, "samples": args.samples, "seq_len": args.seq_len,
            "seed": args.seed, **report.to_dict()}


def cmd_stability(args) -> dict:
    options = StabilityOptions.from_args(args)  # _common's calibration flags + --draws
    criteria = _names(args.criteria)
    if not criteria:
        raise SelectionError("Give at least one criterion, e.g. --criteria entropy,cross_entropy.")
    for name in criteria:
        resolve_params(name)
    ratios = _ratios(args.ratios)
    if args.fidelity and (args.eval_windows < 1 or args.eval_seq_len < 8):
        raise HFPruneError("--fidelity needs at least 1 evaluation window of at least 8 tokens.")
    loaded = load_placed(args.model, PlacementOptions.from_args(args))  # --device / --dtype as for score
    result, scores = measure_stability(loaded, criteria, options, ratios=ratios, progress=not args.quiet)
    out = {**result.to_dict(), "summary": result.summary()}
    if args.fidelity:
        ids = evaluation_windows(loaded.tokenizer, args.source, args.eval_windows, args.eval_seq_len,
                                 max_length=loaded.max_length)
        rows = fidelity_over_draws(loaded, scores, ratios, ids, progress=not args.quiet)
        out["fidelity"] = rows
        out["comparisons"] = [c for i, a in enumerate(criteria) for b in criteria[i + 1:]
                              for c in compare_over_draws(rows, a, b)]
    return out


def cmd_report(args) -> dict:
    out = check_report_path(args.out)  # a bad path: one sentence before any work
    if args.eval_windows > 0 and args.eval_seq_len < 8:
        raise HFPruneError(f"--eval-seq-len must be at least 8 tokens, got {args.eval_seq_len}.")
    store = RunStore(args.runs_root)
    run = store.load(args.run)
    loaded = None
    if run.kind == "prune" and not args.no_model:
        loaded = load_model(run.config.get("model"))
    html = build_report(args.run, store=store, loaded=loaded, contexts=args.context or DEFAULT_CONTEXTS,
                        eval_windows=max(0, args.eval_windows), eval_seq_len=args.eval_seq_len,
                        progress=not args.quiet)
    write_report(html, out)
    return {"out": str(out), "run": args.run, "kind": run.kind, "bytes": len(html.encode("utf-8"))}
