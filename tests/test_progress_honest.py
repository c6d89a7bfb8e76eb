"""Estimates and progress under load (issue §3): the shown fraction never goes back, the time left is
corrected from the measured rate of the work done (blended away from the up-front estimate), and the
estimates come from a probe timed on the spot, so a slower machine shows a longer estimate."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from hfprune_ui.progress import JobProgress, time_left


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_fraction_never_goes_back():
    job = JobProgress(None, "Prune", stages=3, unit="step")
    job.stage(1, "adaptive search")
    job.step("adaptive search: masked forwards", 98, 100)  # the search's first bar nearly full …
    assert job.fraction(0.98) == pytest.approx(0.66)
    job.step("adaptive search: refining", 1, 8)  # … then its estimate runs out and a fresh bar starts at 0
    assert job.fraction(1 / 8) == pytest.approx(0.66)
    assert " 66 % " in job.line(1 / 8, "adaptive search: refining 1/8")
    job.stage(0, "scores")  # a stage reported out of order
    assert job.fraction(0.0) == pytest.approx(0.66)
    job.stage(2, "quality")
    assert job.fraction(0.5) == pytest.approx(2.5 / 3)


def test_time_left_follows_the_measured_rate():
    clock = FakeClock()
    job = JobProgress(None, "Sweep", stages=4, unit="step", estimate_s=20.0, clock=clock)
    assert job.time_left(job.fraction()) == pytest.approx(20.0)  # nothing done: the up-front estimate
    clock.now += 5.0
    assert job.time_left(job.fraction()) == pytest.approx(15.0)  # what the estimate leaves
    job.stage(2)  # half the work done in 60 s: the machine is 3× slower than the estimate assumed
    clock.now += 55.0
    assert job.time_left(job.fraction()) == pytest.approx(60.0)  # the measured remainder, not 20 − 60
    assert job.line(0.0, "").endswith("50 % · about 1 min 00 s left")
    # early on the estimate still counts, fading as work completes
    early = time_left(0.1, 30.0, estimate_s=20.0)  # measured 270 s left, the estimate's view 18 s
    assert 18.0 < early < 270.0 and early == pytest.approx(0.2 * 270.0 + 0.8 * 18.0)
    assert time_left(0.5, 30.0) == pytest.approx(30.0) and time_left(0.01, 30.0) is None


def test_the_issue_case_a_progress_that_drops_does_not_claim_ten_minutes():
    """Adaptive quick: 66 % reached, then a bar restarting reported 34 %, with ~380 s spent; the old line
    said '10 min 31 s left' 10 s before the end."""
    clock = FakeClock()
    job = JobProgress(None, "Prune", stages=3, unit="step", clock=clock)
    job.stage(1)
    job.fraction(0.98)
    clock.now += 380.0
    assert job.fraction(0.02) == pytest.approx(0.66)
    assert job.time_left(job.fraction(0.02)) < 200.0  # 380 × 0.34 / 0.66 ≈ 196 s, not 740 s


def test_job_progress_is_safe_from_a_worker_thread():
    """The Measure tab's worker thread and its handler both report: the furthest point wins."""
    job = JobProgress(None, "Measure", stages=4)
    threads = [threading.Thread(target=lambda k=k: [job.fraction(k / 4 + i / 4000) for i in range(1000)])
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert job.reached == pytest.approx((3 / 4 + 999 / 4000) / 4) == job.fraction(0.0)


def slow_down(model, seconds: float):
    """Make every forward of ``model`` wait ``seconds`` first: a machine busy with other work."""
    forward = model.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)
    model.forward = slow


def test_estimates_come_from_a_probe_timed_now(tiny_services):
    services, session, folder = tiny_services
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine make the unslowed probe itself noisy
    try:
        check_probe(services, session.model_spec)
    finally:
        torch.set_num_threads(threads)


def check_probe(services, spec: str) -> None:
    quick = services.seconds_per_token(spec)
    quick_adaptive = services.adaptive_seconds(spec, 4, 2, 64)
    assert services.seconds_per_token(spec) == quick  # within PROBE_MAX_AGE_S the last probe is reused
    slow_down(services.model(spec).model, 0.1)  # each forward of 2 × 64 tokens now takes 100 ms longer
    services.PROBE_MAX_AGE_S = 0.0
    assert services.adaptive_seconds(spec, 4, 2, 64) > 3 * quick_adaptive
    loaded = services.seconds_per_token(spec)
    assert loaded >= 0.1 / 128 and loaded > 3 * quick, (quick, loaded)
    # while a job holds the model, an estimate uses the last probe instead of waiting for the job
    held, release = threading.Event(), threading.Event()

    def job():
        with services.model_lock:
            held.set()
            release.wait(10)
    worker = threading.Thread(target=job)
    worker.start()
    held.wait(10)
    began = time.monotonic()
    try:
        assert services.seconds_per_token(spec) == loaded and time.monotonic() - began < 0.05
    finally:
        release.set()
        worker.join()
