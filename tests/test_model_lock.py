"""The shared model lock is never held across a ``yield``: Gradio advances a sync generator with one
worker-thread call per step, so a lock taken in one step and released in another (or by the garbage
collector after Stop) would raise "cannot release un-acquired lock" and stay held for ever."""
from __future__ import annotations

import gc
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from hfprune_ui.services import Services


def _step_in_new_thread(generator):
    """One ``next()`` on a fresh thread, the way Gradio's worker pool advances a sync generator."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(next, generator).result(timeout=120)


def _model_job_finishes(services, session, timeout: float = 60.0) -> bool:
    """Run a model job (evaluate the original) on yet another thread; False if it hangs on the lock."""
    done = threading.Event()

    def job():
        services.evaluate_variants(session, [], windows=1, seq_len=16)
        done.set()

    threading.Thread(target=job, daemon=True).start()
    return done.wait(timeout)


@pytest.fixture
def scored(tiny_services):
    services, session, _folder = tiny_services
    return services, session


@pytest.mark.parametrize("ending", ["close", "abandon"])
def test_sweep_stepped_from_threads_then_stopped_leaves_the_lock_free(scored, ending):
    services, session = scored
    rows = services.sweep(session, ["entropy"], [0.1, 0.2, 0.3, 0.4], "uniform", 1, windows=1, seq_len=16)
    first = _step_in_new_thread(rows)
    second = _step_in_new_thread(rows)
    assert (first["ratio"], second["ratio"]) == (0.1, 0.2)
    if ending == "close":  # Stop / cancel: Gradio closes the generator, again from some other thread
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(rows.close).result(timeout=60)
    else:  # the client went away: the generator is simply dropped and collected
        del rows
        gc.collect()
    assert _model_job_finishes(services, session), "a model job hung on the lock after a stopped sweep"
    assert services.model_lock.acquire(timeout=1)
    services.model_lock.release()


def test_no_service_generator_holds_the_lock_between_steps(scored):
    """Every generator of the service layer: while it is suspended at a yield, another thread can lock."""
    services, session = scored
    generators = [name for name, fn in inspect.getmembers(Services, inspect.isfunction)
                  if inspect.isgeneratorfunction(fn)]
    assert "sweep" in generators
    rows = services.sweep(session, ["entropy"], [0.1, 0.2], "uniform", 1, windows=1, seq_len=16)
    _step_in_new_thread(rows)

    def probe() -> bool:
        if not services.model_lock.acquire(timeout=5):
            return False
        services.model_lock.release()
        return True

    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(probe).result(), "the lock is held while the sweep waits at a yield"
    rows.close()
