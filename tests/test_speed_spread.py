"""Speed-ups come with their spread: repeats until the spread is known, quartile intervals, and a
measured speed-up above the FLOP ideal flagged as noise (issue 10 §2). No model needed except the
last test (a tiny one)."""
from __future__ import annotations

import pytest

from core.measure.speed import (
    SpeedError,
    SpeedUp,
    Spread,
    add_measured_speedups,
    repeat_until_known,
    speedup,
    spread,
)


def test_spread_median_and_quartiles():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.n) == (3.0, 2.0, 4.0, 5)
    assert s.relative == pytest.approx(2.0 / 3.0)
    assert spread([7.0]) == Spread(7.0, 7.0, 7.0, 1) and spread([7.0]).relative == 0.0
    with pytest.raises(SpeedError, match="0 repeats"):
        spread([])


def test_repeats_stop_as_soon_as_the_spread_is_known():
    calls = []

    def steady() -> float:
        calls.append(1)
        return 100.0 + 0.1 * len(calls)

    samples = repeat_until_known(steady, min_repeats=5, max_repeats=20, target=0.05)
    assert len(samples) == 5  # IQR 0.2 % of the median: known after the minimum


def test_noisy_timings_repeat_up_to_the_maximum_and_report_progress():
    values = iter([100.0, 150.0, 60.0, 140.0, 70.0, 130.0, 80.0, 120.0, 90.0, 110.0] * 3)
    seen = []
    samples = repeat_until_known(lambda: next(values), min_repeats=3, max_repeats=8, target=0.05,
                                 on_repeat=lambda done, most: seen.append((done, most)))
    assert len(samples) == 8 and seen[-1] == (8, 8) and [d for d, _ in seen] == list(range(1, 9))
    assert repeat_until_known(lambda: 1.0, min_repeats=3) == [1.0, 1.0, 1.0]  # max defaults to the minimum


def test_stop_ends_the_repeats():
    count = []

    def measure() -> float:
        count.append(1)
        return 1.0 + len(count)

    with pytest.raises(Exception, match="stopped"):
        repeat_until_known(measure, min_repeats=5, max_repeats=10, stop=lambda: len(count) >= 2)
    assert len(count) == 2


def test_speedup_interval_comes_from_the_quartiles():
    base, pruned = spread([100.0, 99.0, 101.0, 98.0, 102.0]), spread([80.0, 79.0, 81.0, 78.0, 82.0])
    s = speedup(base, pruned, ideal=1.3)
    assert s.median == pytest.approx(1.25)
    assert s.low == pytest.approx(99.0 / 81.0) and s.high == pytest.approx(101.0 / 79.0)
    assert s.text() == "1.25× (1.22–1.28)" and s.verdict() == ""  # below the ideal, clear of 1.0


def test_a_speedup_above_the_flop_ideal_is_flagged():
    within = SpeedUp(median=1.46, low=1.10, high=1.80, ideal=1.20)
    assert "above the FLOP ideal 1.20× but within the spread: noise" == within.verdict()
    beyond = SpeedUp(median=1.46, low=1.40, high=1.50, ideal=1.20)
    assert beyond.verdict().startswith("above the FLOP ideal 1.20× beyond the spread")
    unchanged = SpeedUp(median=1.02, low=0.95, high=1.08, ideal=1.1)
    assert unchanged.verdict() == "1.00× lies within the spread: no measurable change"
    assert SpeedUp(median=1.19, low=1.15, high=1.22, ideal=1.20).verdict() == ""


def test_rows_get_prefill_and_decode_speedups_side_by_side():
    rows = [{"prefill_ms": 100.0, "prefill_ms_all": [99.0, 100.0, 101.0], "decode_ms_all": [60.0, 61.0, 62.0],
             "ideal_speedup": 1.0},
            {"prefill_ms": 84.0, "prefill_ms_all": [83.0, 84.0, 85.0], "decode_ms_all": [240.0, 250.0, 260.0],
             "ideal_speedup": 1.0}]
    out = add_measured_speedups(rows)
    assert out[0]["prefill_speedup"] is None and out[0]["decode_speedup"] is None  # the baseline
    prefill, decode = out[1]["prefill_speedup"], out[1]["decode_speedup"]
    assert prefill["median"] == pytest.approx(100 / 84) and "above the FLOP ideal 1.00×" in prefill["verdict"]
    assert decode["median"] == pytest.approx(61 / 250) and decode["high"] < 0.3  # an int8 model can prefill faster and decode 4× slower
    assert out[1]["measured_speedup"] == pytest.approx(100 / 84)  # the prefill figure older callers read


def test_measure_speed_records_every_repeat(tiny_loaded):
    from core.measure.speed import measure_speed

    model = tiny_loaded("llama").model
    phases = []
    result = measure_speed(model, None, prefill_tokens=16, decode_tokens=2, decode_prompt_tokens=4, repeats=3,
                           max_repeats=4, warmup=0, on_progress=lambda phase, done, most: phases.append(phase))
    assert 3 <= len(result.prefill_ms_all) <= 4 and 3 <= len(result.decode_ms_all) <= 4
    assert result.repeats == len(result.prefill_ms_all)
    assert phases.count("prefill") == len(result.prefill_ms_all) and phases.count("decode") == len(result.decode_ms_all)
