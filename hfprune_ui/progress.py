"""One honest progress line per job: work done / total over all of the job's stages, "model k of n",
what the engine is doing now, and a time left computed from the time spent so far.

The engine reports its loops through tqdm (scoring windows, evaluation batches, search steps);
Gradio's ``track_tqdm`` hands those bars to the handler's ``gr.Progress``. :class:`JobProgress`
takes over that progress object's callback and turns the nested bars into one line, e.g.
``Measure · model 2 of 3 (ent30) · decode repeat 4/5 · 53 % · about 40 s left``.

The shown fraction never goes back (a stage whose bar restarts, e.g. the adaptive search's "refining",
holds at the furthest point reached), and the time left comes from the rate of the work done so far
(elapsed / done × what remains), blended from the up-front estimate (when the job has one) while
little is done, so a loaded machine's slower pace corrects it as the job goes.

:func:`stream_worker` is the one home of "run the engine in a worker thread and redraw live curves
or rows while yielding to Gradio" (Recover, DDP, Pipeline, Measure).
"""
from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

import gradio as gr
from gradio.context import LocalContext
from gradio.helpers import TrackedIterable

MIN_FRACTION_FOR_ETA = 0.03  # below this, "time left" would be a guess
TRUST_MEASURED_AT = 0.5  # from this fraction done on, the time left is the measured rate's alone


def duration(seconds: float) -> str:
    """'45 s', '3 min 20 s', '1 h 05 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def eta_text(fraction: float, elapsed: float, estimate_s: float | None = None) -> str:
    """'about 40 s left' once enough is done to extrapolate (see :func:`time_left`), else 'estimating time left'."""
    left = time_left(fraction, elapsed, estimate_s)
    return "estimating time left" if left is None else f"about {duration(left)} left"


def time_left(done: float, elapsed: float, estimate_s: float | None = None) -> float | None:
    """Seconds left of a job ``done`` (0–1) through after ``elapsed`` seconds; None when unknown.

    The measured rate (elapsed / done × (1 − done)) once enough is done to extrapolate; with an
    up-front ``estimate_s``, blended with the estimate's own view of the remaining work (estimate ×
    (1 − done)) — the estimate's weight falls linearly to 0 at :data:`TRUST_MEASURED_AT` done. Before
    any rate is measured, what the estimate leaves (estimate − elapsed), if anything."""
    done = max(0.0, min(1.0, done))
    measured = (elapsed * (1.0 - done) / done if done >= MIN_FRACTION_FOR_ETA and elapsed >= 1.0 else None)
    if not estimate_s:
        return measured
    if measured is None:
        left = estimate_s - elapsed
        return left if left > 0 else None
    trust = min(1.0, done / TRUST_MEASURED_AT)
    return trust * measured + (1.0 - trust) * estimate_s * (1.0 - done)


def engine_bars() -> bool:
    """Whether the engine's tqdm bars have somewhere to go: True inside a Gradio event whose handler
    follows them (a ``gr.Progress(track_tqdm=True)``, which sends them to the page and their text to
    /dev/null). Services pass this as the engine's ``progress`` flag, so an engine call from any other
    handler, a worker without that context, a test or a benchmark draws no bar in the server's log."""
    tracker = LocalContext.progress.get(None)
    return tracker is not None and tracker._progress_callback() is not None


class JobProgress:
    """Progress of a job made of ``stages`` parts (e.g. one per model or per criterion).

    ``weights``: each stage's share of the work, e.g. its estimated seconds (then ``stages`` is their
    number); without them the stages are equal. A stage weighted by its cost moves the bar as evenly as
    the work does — a cached scoring pass weighs nothing, an adaptive search most of a Prune.
    ``progress`` is the handler's ``gr.Progress`` (created with ``track_tqdm=True`` so the engine's
    tqdm bars reach it); outside a Gradio event every call here does nothing. ``estimate_s``: the
    up-front estimate shown before the job started (see :func:`time_left`); ``clock``: seconds
    (``time.monotonic``; tests pass a fake). Safe to call from the handler and a worker thread."""

    def __init__(self, progress: gr.Progress | None, title: str, stages: int = 1, unit: str = "model",
                 estimate_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 weights: Sequence[float] | None = None) -> None:
        self.progress, self.title, self.unit = progress, title, unit
        self._weigh(weights if weights is not None and len(weights) else [1.0] * max(1, int(stages)), 0.0)
        self.stage_index, self.stage_label = 0, ""
        self.detail: tuple[str, float] | None = None  # (what, fraction of the current stage) set by hand
        self.estimate_s, self.clock = estimate_s, clock
        self.started = clock()
        self.reached = 0.0  # the furthest fraction shown: the bar never goes back
        self._lock = threading.Lock()
        if progress is not None:
            progress._progress_callback = self._callback  # type: ignore[method-assign]  # see module docstring

    def _weigh(self, weights: Sequence[float], base: float) -> None:
        """Stage k spans [starts[k], starts[k + 1]) of the bar: ``base`` plus its share of what is left."""
        self.weights = [max(0.0, float(w)) for w in weights] or [1.0]
        if not sum(self.weights):
            self.weights = [1.0] * len(self.weights)
        self.stages, total = len(self.weights), sum(self.weights)
        self._starts = [base + (1.0 - base) * sum(self.weights[:k]) / total for k in range(self.stages)] + [1.0]

    # -- what the handler says --------------------------------------------------------------------
    def replan(self, weights: Sequence[float], estimate_s: float | None = None) -> None:
        """From here on the job is ``weights``' stages (e.g. their estimated seconds, known once the model
        is loaded and probed): the bar keeps the point it reached and they share the rest, starting at
        stage 0; ``estimate_s``: the seconds they should take (the time left blends it in)."""
        with self._lock:
            base = self.reached
        self._weigh(weights, base)
        self.stage_index, self.stage_label, self.detail = 0, "", None
        if estimate_s is not None:
            self.estimate_s = (self.clock() - self.started) + estimate_s

    def stage(self, index: int, label: str = "") -> None:
        """Start stage ``index`` (0-based) called ``label``; pushes an update."""
        self.stage_index, self.stage_label, self.detail = min(index, self.stages - 1), label, None
        self._push([])

    def step(self, what: str, done: float, total: float, fraction: float | None = None) -> None:
        """Report progress inside the current stage by hand (for work without a tqdm bar): ``what
        done/total``, at ``fraction`` of the stage when given (else done / total)."""
        share = fraction if fraction is not None else (done / total if total else 0.0)
        self.detail = (f"{what} {int(done)} of {int(total)}", share)
        self._push([])

    def report(self, what: str, fraction: float) -> None:
        """What the current stage is doing now, in words, with ``fraction`` of it done (an engine callback
        that is not a tqdm bar); pushes an update."""
        self.detail = (what, fraction)
        self._push([])

    def fraction(self, inner: float = 0.0) -> float:
        """Done over the whole job with ``inner`` of the current stage done — never less than before."""
        k = self.stage_index
        share = self._starts[k + 1] - self._starts[k]
        now = min(1.0, self._starts[k] + share * max(0.0, min(1.0, inner)))
        with self._lock:
            self.reached = max(self.reached, now)
            return self.reached

    def time_left(self, done: float) -> float | None:
        """Seconds left at ``done`` (see :func:`time_left`)."""
        return time_left(done, self.clock() - self.started, self.estimate_s)

    def line(self, inner: float, what: str) -> str:
        """The text shown above the bar."""
        parts = [self.title]
        if self.stages > 1:
            parts.append(f"{self.unit} {self.stage_index + 1} of {self.stages}"
                         + (f" ({self.stage_label})" if self.stage_label else ""))
        elif self.stage_label:
            parts.append(self.stage_label)
        if what:
            parts.append(what)
        done = self.fraction(inner)
        parts.append(f"{100 * done:.0f} %")
        parts.append(eta_text(done, self.clock() - self.started, self.estimate_s))
        return " · ".join(parts)

    # -- plumbing -----------------------------------------------------------------------------------
    def _callback(self):
        """Stands in for ``gr.Progress._progress_callback``: None outside an event, else our sender."""
        if gr.Progress._progress_callback() is None:
            return None
        return self._push

    def _push(self, iterables: Sequence[TrackedIterable]) -> None:
        send = gr.Progress._progress_callback() if self.progress is not None else None
        if send is None:
            return
        inner, what = self._inner(iterables)
        text = self.line(inner, what)
        send([TrackedIterable(None, None, None, text, None, progress=self.reached)])

    def _inner(self, iterables: Sequence[TrackedIterable]) -> tuple[float, str]:
        """Fraction of the current stage and its description, from the innermost bar with a length."""
        for item in reversed(list(iterables)):
            if item.length and item.index is not None:
                return float(item.index) / float(item.length), bar_words(item)
            if item.progress is not None:
                return float(item.progress), item.desc or ""
        if self.detail is not None:
            return self.detail[1], self.detail[0]
        return 0.0, ""


def bar_words(item: TrackedIterable) -> str:
    """An engine bar in words: 'scoring: 3 of 8 windows'; a bar of one item is just its name."""
    what, done, total = item.desc or "working", int(item.index or 0), int(item.length or 0)
    if total <= 1:
        return what
    unit = item.unit if item.unit and item.unit not in ("it", "steps") else "step"
    return f"{what}: {done} of {total} {unit}s"


def stream_worker(work: Callable[[Callable[[Any], None]], Any], draw: Callable[[list, bool], Any],
                  stop: threading.Event, redraw_s: float = 1.0,
                  name: str = "hfprune-worker") -> Generator[Any, None, Any]:
    """Run ``work(emit)`` in a daemon thread and stream what it emits; use as ``result = yield from ...``.

    ``work`` calls ``emit(record)`` for each step record (any object) and returns the outcome; it takes
    ``Services.model_lock`` itself if it needs it — this generator never holds a lock across a ``yield``.
    The worker runs in a copy of the handler's context, so the engine's tqdm bars and a
    :class:`JobProgress` reach the event's progress bar from the worker too.
    Yields ``draw(new_records, finished)``: the records emitted since the previous yield (in order), at
    most every ``redraw_s`` seconds while the worker runs and once more with ``finished=True`` when it
    has ended. Then returns ``work``'s return value, or raises its exception (``Stopped`` included).
    Closed early (the page went away, the event was cancelled) while the worker runs, it sets ``stop``
    so the engine ends too."""
    records: queue.Queue = queue.Queue()
    outcome: dict = {}
    done, nothing = object(), object()  # the sentinel the worker puts last; "no record this time"

    context = contextvars.copy_context()  # Gradio's event, blocks and progress are context variables

    def run() -> None:
        try:
            outcome["value"] = context.run(work, records.put)
        except Exception as exc:  # noqa: BLE001 - handed to the generator, which re-raises it
            outcome["error"] = exc
        finally:
            records.put(done)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    pending: list = []
    drawn = 0.0
    try:
        finished = False
        while not finished:
            try:
                item = records.get(timeout=redraw_s)
            except queue.Empty:
                item = nothing
            while item is not nothing:  # drain whatever has arrived, up to the sentinel
                if item is done:
                    finished = True
                    break
                pending.append(item)
                try:
                    item = records.get_nowait()
                except queue.Empty:
                    item = nothing
            if finished or time.monotonic() - drawn >= redraw_s:
                drawn = time.monotonic()
                batch, pending = pending, []
                yield draw(batch, finished)
    finally:
        if worker.is_alive():  # the page went away or the event was cancelled: end the work too
            stop.set()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
