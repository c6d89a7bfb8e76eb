"""Measured speed and memory: prefill latency, KV-cached greedy decode, peak memory, size.

    from core.speed import measure_speed
    result = measure_speed(loaded.model, loaded.tokenizer)        # SpeedResult; .to_dict()

Nothing here is estimated except ``flops_per_token`` (the analytic count from ``core.counts``),
which is reported *beside* the measured numbers so the ideal (FLOP-ratio) speed-up of a pruned
model can be compared with the measured one. On CUDA, times come from CUDA events and memory from
``torch.cuda.max_memory_allocated`` (weights included); on the CPU, times from ``perf_counter``
and memory from the process RSS sampled every 2 ms by a background thread.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import psutil
import torch
from torch import nn

from core.data.text import token_stream
from core.errors import HFPruneError
from core.models.counts import count_params, forward_flops_per_token, mlp_widths_any, weight_bytes
from core.options import Options, knob
from core.progress import check_stop
from core.quantize.backends import quantization_of


class SpeedError(HFPruneError):
    """Invalid benchmark settings (lengths, repeats, device)."""


# ----------------------------------------------------------------------------------------------
# repeats and their spread: a speed-up is reported as a median with an interval, never one number
# ----------------------------------------------------------------------------------------------
TARGET_SPREAD = 0.05  # keep repeating while the inter-quartile range exceeds 5 % of the median


@dataclass(frozen=True)
class Spread:
    """Repeated timings of one thing: median and quartiles (same unit as the samples), n repeats."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def relative(self) -> float:
        """IQR / median (0 when n < 2 or the median is 0)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 and self.n > 1 else 0.0


def spread(samples: list[float]) -> Spread:
    """Median and quartiles of ``samples`` (inclusive quartiles, so 3 samples give min / max)."""
    if not samples:
        raise SpeedError("No measurement to summarise (0 repeats).")
    values = sorted(float(x) for x in samples)
    if len(values) == 1:
        return Spread(values[0], values[0], values[0], 1)
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Spread(median, q1, q3, len(values))


MIN_SPREAD_REPEATS = 3  # three timings give min / median / max: the fewest that show a spread


@dataclass
class SpeedBudget(Options):
    """How long measuring one model may take: the dashboard's Measure and ``bench --budget``."""

    error = SpeedError

    budget_s: float = knob(5.0, "wall-clock seconds per model: the repeats stop once the spread is known or "
                           "this is spent (each timing still runs 3 times; 0 = no limit)", low=0, ui_high=60,
                           step=1, flag="budget")


@dataclass(frozen=True)
class Repeats:
    """The timings of one thing and why they stopped: ``'spread'`` (IQR within the target), ``'most'``
    (the most repeats allowed) or ``'budget'`` (the next repeat would have ended past the deadline)."""

    samples: list[float]
    ended: str


# Our own loop rather than torch.utils.benchmark.Timer.adaptive_autorange (same stopping rule, IQR /
# median under a threshold, or max_run_time): its max_run_time counts only the timed blocks, not its
# block-size probe and warm-up runs, and is checked after a block has ended, so it never declines a repeat
# that would overrun the wall budget; it cannot be stopped between repeats; and its setup runs once, so a
# decode repeat (an untimed prompt forward, then the timed cached steps) cannot be expressed. Here one repeat
# is one prefill or one decode loop, checked against the stop flag and the deadline before the next.
def repeat_within(measure: Callable[[], float], *, min_repeats: int = 5, max_repeats: int | None = None,
                  target: float = TARGET_SPREAD, stop: Callable[[], bool] | None = None,
                  on_repeat: Callable[[int, int], None] | None = None, deadline: float | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Repeats:
    """Call ``measure()`` (one timing) until the spread is known: at least ``min_repeats`` times and
    then until the inter-quartile range is within ``target`` × median, or ``max_repeats`` (default
    min_repeats) are done, or — with a ``deadline`` (a ``clock()`` value) — the next repeat would end
    past it, once :data:`MIN_SPREAD_REPEATS` (or ``min_repeats`` if fewer) are done. ``on_repeat(done,
    most)`` reports progress; ``stop()`` true ends the measurement with :class:`~core.errors.Stopped`."""
    most = max(min_repeats, max_repeats or min_repeats)
    floor = min(min_repeats, MIN_SPREAD_REPEATS)
    samples: list[float] = []
    while True:
        check_stop(stop, "The speed measurement was stopped.")
        began = clock()
        samples.append(float(measure()))
        took = clock() - began
        if on_repeat is not None:
            on_repeat(len(samples), most)
        if len(samples) >= min_repeats and spread(samples).relative <= target:
            return Repeats(samples, "spread")
        if len(samples) >= most:
            return Repeats(samples, "most")
        if deadline is not None and len(samples) >= floor and clock() + took > deadline:
            return Repeats(samples, "budget")


def repeat_until_known(measure: Callable[[], float], *, min_repeats: int = 5, max_repeats: int | None = None,
                       target: float = TARGET_SPREAD, stop: Callable[[], bool] | None = None,
                       on_repeat: Callable[[int, int], None] | None = None) -> list[float]:
    """The timings of :func:`repeat_within` without a deadline (up to ``max_repeats``)."""
    return repeat_within(measure, min_repeats=min_repeats, max_repeats=max_repeats, target=target, stop=stop,
                         on_repeat=on_repeat).samples


@dataclass(frozen=True)
class SpeedUp:
    """Baseline time / this time: the median ratio and a conservative interval from the quartiles
    (baseline q1 / this q3 … baseline q3 / this q1), beside the FLOP ideal."""

    median: float
    low: float
    high: float
    ideal: float | None = None

    def verdict(self) -> str:
        """'' when the number can be read as is, else why not (one phrase)."""
        if self.ideal is not None and self.median > self.ideal * 1.005:
            if self.low <= self.ideal:
                return f"above the FLOP ideal {self.ideal:.2f}× but within the spread: noise"
            return (f"above the FLOP ideal {self.ideal:.2f}× beyond the spread: not a gain the cut can give "
                    "(load or cache effects); measure again")
        if self.low <= 1.0 <= self.high:
            return "1.00× lies within the spread: no measurable change"
        return ""

    def text(self) -> str:
        """'1.14× (1.10–1.18)'."""
        return f"{self.median:.2f}× ({self.low:.2f}–{self.high:.2f})"

    def to_dict(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "ideal": self.ideal,
                "verdict": self.verdict()}


def speedup(baseline: Spread, this: Spread, ideal: float | None = None) -> SpeedUp:
    """Speed-up of ``this`` over ``baseline`` from two spreads of *times* (lower is faster)."""
    if min(baseline.median, this.median, baseline.q1, this.q1) <= 0:
        raise SpeedError("Timings must be positive to form a speed-up.")
    return SpeedUp(baseline.median / this.median, baseline.q1 / this.q3, baseline.q3 / this.q1, ideal)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def release_memory() -> None:
    """gc + glibc ``malloc_trim`` so freed tensors leave the RSS before a memory measurement."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakRSS:
    """Samples the process RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


@dataclass
class SpeedResult:
    """One measurement. Times in ms, memory and sizes in bytes."""

    device: str  # e.g. "cpu (2 threads)" or "cuda:0 NVIDIA H100"
    dtype: str
    method: str  # "fp32"/"bf16" or the quantization method
    prefill_tokens: int
    prefill_ms: float  # median over repeats of one 1 × prefill_tokens forward
    prefill_ms_all: list[float]
    prefill_tokens_per_s: float
    decode_prompt_tokens: int
    decode_tokens: int
    decode_tokens_per_s: float  # greedy, KV cache, median over repeats
    decode_ms_per_token: float
    peak_memory_bytes: int
    memory_scope: str  # what peak_memory_bytes covers
    weight_bytes: int  # in-memory bytes of the weights (quantized storage and scales included)
    params: int
    mlp_params: int
    flops_per_token: int  # analytic, at context prefill_tokens
    disk_bytes: int | None = None
    repeats: int = 0  # prefill repeats actually run (decode: len(decode_ms_all))
    decode_ms_all: list[float] = field(default_factory=list)  # ms per decoded token, one per repeat
    timer: str = ""
    extra: dict = field(default_factory=dict)
    decode_repeats: int = 0
    prefill_spread: float = 0.0  # IQR / median of the prefill timings reached (0.03 = 3 %)
    decode_spread: float = 0.0
    spread_known: bool = True  # both within target_spread (False: the budget or the most repeats ended them)
    budget_s: float | None = None  # the wall-clock budget of this measurement (None: no limit)
    budget_ended: bool = False  # the budget stopped a timing before its spread was known
    seconds: float = 0.0  # wall time of the whole measurement: set-up, warm-up and repeats

    def to_dict(self) -> dict:
        return asdict(self)


def _timer(device: torch.device):
    """Returns a function that runs ``fn`` and gives its wall time in ms (CUDA events on GPU)."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end), out
        return run, "cuda events"

    def run(fn):
        start = time.perf_counter()
        out = fn()
        return (time.perf_counter() - start) * 1000.0, out
    return run, "time.perf_counter"


def _input_ids(tokenizer, length: int, vocab: int) -> torch.Tensor:
    """Real evaluation text when a tokenizer is given (random ids otherwise), shape (1, length)."""
    if tokenizer is not None:
        try:
            stream = token_stream(tokenizer, "wiki", "evaluation")
            if len(stream) >= length and int(stream[:length].max()) < vocab:
                return stream[:length].view(1, length).clone()
        except HFPruneError:
            pass
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, length), generator=generator)


def _wall(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (for sharing a budget, not a measurement)."""
    began = time.monotonic()
    fn()
    return time.monotonic() - began


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def _deadlines(budget_s: float | None, started: float, warm: tuple[float, float] | None,
               clock: Callable[[], float] = time.monotonic) -> tuple[float | None, float | None]:
    """(prefill deadline, decode deadline) of a ``budget_s`` measurement that began at ``started``: what
    is left after the warm-up is shared in proportion to the warm-up's prefill and decode times (half
    each without a warm-up), so both timings get about as many repeats; each gets at least a quarter,
    as a first call's one-off costs can make one warm-up time misleading."""
    if not budget_s:
        return None, None
    end = started + budget_s
    share = warm[0] / (warm[0] + warm[1]) if warm and warm[0] + warm[1] > 0 else 0.5
    share = min(0.75, max(0.25, share))
    return clock() + max(0.0, end - clock()) * share, end


def _relative(samples: list[float]) -> float:
    return round(spread(samples).relative, 4)


@torch.no_grad()
def measure_speed(model: nn.Module, tokenizer=None, *, prefill_tokens: int = 512, decode_tokens: int = 64,
                  decode_prompt_tokens: int = 128, repeats: int = 5, warmup: int = 1, method: str | None = None,
                  max_repeats: int | None = None, target_spread: float = TARGET_SPREAD,
                  budget_s: float | None = None,
                  stop: Callable[[], bool] | None = None, on_progress: Callable[[str, int, int], None] | None = None,
                  disk_bytes: int | None = None) -> SpeedResult:
    """Measure the model where it already is (move it to CUDA/bf16 first for a GPU measurement).

    Prefill: median latency of ``repeats`` forwards of 1 × ``prefill_tokens`` (after ``warmup``);
    with ``max_repeats``, more repeats follow until the IQR is within ``target_spread`` of the median
    (:func:`repeat_within`; the same for decode). ``budget_s`` bounds the wall time of the warm-up and
    the repeats: each timing stops once its next repeat would end past its share of the budget (after
    :data:`MIN_SPREAD_REPEATS` repeats), and the result says the spread it reached (``prefill_spread``,
    ``decode_spread``), whether the budget ended it (``budget_ended``) and the whole wall time
    (``seconds``, the set-up's garbage collection included).
    ``on_progress(phase, done, most)`` reports each repeat.
    Decode: greedy, KV cache, ``decode_tokens`` steps after a ``decode_prompt_tokens`` prompt;
    tokens/s is the median over repeats of the decode loop alone. Peak memory: on CUDA
    ``max_memory_allocated`` (weights + activations + KV cache); on the CPU the bytes of the weight
    tensors actually in memory (quantized storage included) plus the peak process-RSS increase
    during the prefill and decode runs (activations, KV cache, kernel workspaces)."""
    if prefill_tokens < 1 or decode_tokens < 1 or decode_prompt_tokens < 1:
        raise SpeedError("Prefill, decode and prompt lengths must all be at least 1 token.")
    if repeats < 1 or warmup < 0:
        raise SpeedError(f"Repeats must be at least 1 and warm-up at least 0 (got {repeats}, {warmup}).")
    if budget_s is not None:
        budget_s = SpeedBudget(budget_s=budget_s).budget_s or None
    max_len = int(getattr(model.config, "max_position_embeddings", 10**9) or 10**9)
    if prefill_tokens > max_len or decode_prompt_tokens + decode_tokens > max_len:
        raise SpeedError(f"The benchmark lengths exceed the model's {max_len}-token context.")
    started = time.monotonic()
    model.eval()
    first = next(model.parameters())
    device = first.device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), first.dtype)
    vocab = int(model.config.vocab_size)
    timed, timer_name = _timer(device)
    prefill_ids = _input_ids(tokenizer, prefill_tokens, vocab).to(device)
    prompt_ids = prefill_ids[:, :decode_prompt_tokens] if decode_prompt_tokens <= prefill_tokens else \
        _input_ids(tokenizer, decode_prompt_tokens, vocab).to(device)

    def prefill():
        return model(input_ids=prefill_ids, use_cache=True).logits

    def decode() -> float:
        """Seconds for the ``decode_tokens`` cached steps after the prompt (the prompt is not timed)."""
        out = model(input_ids=prompt_ids, use_cache=True)
        state = [out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)]  # (KV cache, (1, 1) token)

        def steps() -> None:
            for _ in range(decode_tokens):
                step = model(input_ids=state[1], past_key_values=state[0], use_cache=True)
                state[0], state[1] = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)

        return timed(steps)[0] / 1000.0

    def report(phase: str):
        return None if on_progress is None else (lambda done, most: on_progress(phase, done, most))

    release_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start_rss = _rss()
    with _PeakRSS() as sampler:
        timing_from = time.monotonic()  # the budget covers warm-up and repeats, not the set-up (gc) before them
        warm = [0.0, 0.0]  # wall seconds of the warm-up's prefills and decodes: how to share the budget
        for _ in range(warmup):
            warm[0] += _wall(prefill)
            warm[1] += _wall(decode)
        prefill_deadline, decode_deadline = _deadlines(budget_s, timing_from, tuple(warm) if warmup else None)
        prefill_runs = repeat_within(lambda: timed(prefill)[0], min_repeats=repeats, max_repeats=max_repeats,
                                     target=target_spread, stop=stop, on_repeat=report("prefill"),
                                     deadline=prefill_deadline)
        decode_runs = repeat_within(decode, min_repeats=repeats, max_repeats=max_repeats, target=target_spread,
                                    stop=stop, on_repeat=report("decode"), deadline=decode_deadline)
    prefill_ms, decode_s = prefill_runs.samples, decode_runs.samples
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        scope = "torch.cuda.max_memory_allocated (weights + activations + KV cache)"
    else:
        run_peak = max(0, int(sampler.peak - start_rss))
        peak = weight_bytes(model) + run_peak
        scope = "weight tensors in memory + peak process-RSS increase during prefill/decode"
    median_prefill = statistics.median(prefill_ms)
    median_decode = statistics.median(decode_s)
    counts = count_params(model)
    flops = forward_flops_per_token(model, prefill_tokens, widths=mlp_widths_any(model))
    return SpeedResult(
        device=_device_name(device), dtype=str(dtype).replace("torch.", ""),
        method=method or quantization_of(model) or str(dtype).replace("torch.", "").replace("float32", "fp32"),
        prefill_tokens=prefill_tokens, prefill_ms=round(median_prefill, 3),
        prefill_ms_all=[round(x, 3) for x in prefill_ms],
        decode_ms_all=[round(1000.0 * x / decode_tokens, 3) for x in decode_s],
        prefill_tokens_per_s=round(prefill_tokens / (median_prefill / 1000.0), 2),
        decode_prompt_tokens=int(prompt_ids.shape[1]), decode_tokens=decode_tokens,
        decode_tokens_per_s=round(decode_tokens / median_decode, 3),
        decode_ms_per_token=round(1000.0 * median_decode / decode_tokens, 3),
        peak_memory_bytes=peak, memory_scope=scope, weight_bytes=weight_bytes(model),
        params=counts["params"], mlp_params=counts["mlp_params"], flops_per_token=int(flops),
        disk_bytes=disk_bytes, repeats=len(prefill_ms), timer=timer_name,
        extra={} if device.type == "cuda" else {"run_rss_increase_bytes": run_peak},
        decode_repeats=len(decode_s), prefill_spread=_relative(prefill_ms), decode_spread=_relative(decode_s),
        spread_known=prefill_runs.ended == decode_runs.ended == "spread", budget_s=budget_s,
        budget_ended="budget" in (prefill_runs.ended, decode_runs.ended),
        seconds=round(time.monotonic() - started, 3),
    )


def ideal_speedup(model: nn.Module, dense_widths: list[int] | None, seq_len: int = 512) -> float | None:
    """Dense FLOPs / this model's FLOPs per token at ``seq_len``: the FLOP-ratio speed-up a pruned
    model could reach at best. ``dense_widths`` = the original d_ff per layer (``pruning_meta.json``
    ``original_intermediate_sizes``); None when unknown."""
    if not dense_widths:
        return None
    mine = forward_flops_per_token(model, seq_len, widths=mlp_widths_any(model))
    return forward_flops_per_token(model, seq_len, widths=list(dense_widths)) / mine


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpeedError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto.")
    if not (name == "cpu" or name.startswith("cuda")):
        raise SpeedError(f"Unknown device '{name}'; use auto, cpu or cuda.")
    return torch.device(name)


def add_measured_speedups(rows: list[dict]) -> list[dict]:
    """Set ``measured_speedup`` = first row's prefill ms / each row's (rows from :class:`SpeedResult`
    ``to_dict()``; the first row is the baseline), and, where the per-repeat timings are there,
    ``prefill_speedup`` / ``decode_speedup`` = :meth:`SpeedUp.to_dict` (median, quartile interval,
    the row's ``ideal_speedup`` and a verdict); None on the baseline row. Returns the same rows."""
    base = rows[0]["prefill_ms"] if rows else None
    for index, row in enumerate(rows):
        row["measured_speedup"] = base / row["prefill_ms"] if base and row["prefill_ms"] else None
        for phase, key in (("prefill", "prefill_ms_all"), ("decode", "decode_ms_all")):
            ready = index > 0 and rows[0].get(key) and row.get(key)
            row[f"{phase}_speedup"] = (speedup(spread(rows[0][key]), spread(row[key]), row.get("ideal_speedup"))
                                       .to_dict() if ready else None)
    return rows

