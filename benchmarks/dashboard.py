"""Dashboard timings, measured on the real app in a subprocess (targets from issues 3 and 10):

1. responsiveness: launch → page served (≤ 20 s); press Score with the default settings → first
   histogram (≤ 60 s with the model converted, ≤ 120 s on a fresh cache that converts the GGUF);
   redraw from cached scores (≤ 2 s);
2. the Tour: its five one-click steps end to end on a fresh app (≤ 2 min), step 6 "Heal the cut"
   (the least-squares refit and a one-minute recovery, live), and step 1's "Recompute" (scoring on
   this machine instead of the shipped scores);
3. the adaptive allocation with the dashboard's default (quick) settings: Prune → done (≤ 3 min),
   beside the estimate the dashboard shows before it starts; ``--thorough`` also times the
   thorough preset (the command line's default) one click away;
4. the criteria × ratio sweep with the Prune tab's defaults, after the Tour's scores;
5. Measure (Quantize & measure) with its defaults on the Tour's two cuts: the original and two
   variants, each within its time budget.

Each estimate the dashboard shows (Recompute's, step 6's, the adaptive search's, the sweep's,
Measure's) is recorded beside the time the job took, with whether the progress bar ever went back.
``--burners N`` runs N busy-loop processes beside the app (a machine busy with other work); its rows
are kept beside the quiet ones, and a table sets each job alone beside the same job under load.

    python benchmarks/dashboard.py                       # everything
    python benchmarks/dashboard.py --only tour,adaptive  # keep the stored responsiveness rows
    python benchmarks/dashboard.py --write-tour-scores   # (re)make assets/tour's precomputed scores
    python benchmarks/dashboard.py --only tour,adaptive --burners 2  # the same beside two CPU burners
    python benchmarks/dashboard.py --only tour,adaptive,sweep,measure --burners 1  # issue 20's "under load"
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _common  # noqa: F401
from _common import RESULTS, ROOT, machine, markdown_table, write_result

from core.importance.criteria import parameter_knobs
from core.prune.allocate import ADAPTIVE_PRESETS
from hfprune_ui.tabs.importance import DEFAULT_CRITERIA
from hfprune_ui.tabs.model_data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from hfprune_ui.tabs.quantize_measure import MAX_REPEATS

MODEL = "smollm2-135m"
CRIT = [cls.ui(field)["value"] for _c, cls, field in parameter_knobs()]  # every criterion knob at its default
DATA = ("wiki", None, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, 0)
TOUR_STEPS = (("1 · score (precomputed)", "/tour_score"), ("2 · histograms", "/tour_histograms"),
              ("3 · disagreements", "/tour_disagreements"), ("4 · prune 30 % both ways", "/tour_prune"),
              ("5 · next-token menus", "/tour_menus"))
ADAPTIVE_RATIO = 0.3
# the sweep's and Measure's form defaults (hfprune_ui/tabs/prune.py, quantize_measure.py), in their API order
SWEEP = {"ratios": "0.2, 0.3, 0.4", "allocation": "uniform", "round_to": "1", "windows": 4, "seq_len": 64,
         "metric": "kl_to_dense", "compensate_windows": 64, "baseline": True, "draws": 1}
MEASURE = {"prefill": 512, "decode": 32, "repeats": 5, "budget": 5.0}
ZEROSHOT_ITEMS = 100  # the zero-shot slider's default; the estimate endpoint also answers for it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_served(url: str, process: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} was not served within {limit} s")


@contextlib.contextmanager
def running_app(env: dict[str, str]):
    """Launch ``python app.py`` with ``env``; yields (url, seconds until the page was served)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_served(url, process)
        yield url, time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=30)


def load() -> float:
    """The machine's 1-minute load average when a scenario ends (2 = both cores busy): other work on
    the machine slows every timing, so the tables show it."""
    return round(os.getloadavg()[0], 2)


def seconds_of(text: str) -> float | None:
    """'about 2 min 19 s' / '45 s' / '1 h 05 min' (hfprune_ui.progress.duration's words) → seconds."""
    match = re.search(r"(?:(\d+) h )?(?:(\d+) min)?\s*(?:(\d+) s)?", text.split("about", 1)[-1].strip())
    if not match or not any(match.groups()):
        return None
    h, m, sec = (int(g or 0) for g in match.groups())
    return 3600 * h + 60 * m + sec


def watched(c, *args, api_name: str, first: list | None = None) -> tuple[float, object, bool]:
    """(seconds, result, whether the progress fraction the page was sent never went back); a generator's
    first output is appended to ``first`` when given (where step 6 shows its estimate)."""
    started = time.perf_counter()
    job = c.submit(*args, api_name=api_name)
    fractions: list[float] = []
    while not job.done():
        units = job.status().progress_data or []
        if units and units[0].progress is not None:
            fractions.append(float(units[0].progress))
        time.sleep(0.1)
    out = job.result()
    if first is not None and job.outputs():
        first.append(job.outputs()[0])
    return time.perf_counter() - started, out, fractions == sorted(fractions)


@contextlib.contextmanager
def burning(count: int):
    """``count`` processes spinning on a CPU core each while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - started, out


def responsiveness(name: str, env: dict[str, str]) -> dict:
    """Launch, score with the defaults, redraw; the timings in seconds."""
    with running_app(env) as (url, launch):
        c = client(url)
        started = time.perf_counter()
        job = c.submit(DEFAULT_CRITERIA, MODEL, *DATA, *CRIT, [], [], True, None, api_name="/score")
        first = None
        while first is None:
            if job.outputs():
                first = time.perf_counter() - started
            elif job.done():
                job.result()  # raises the app's error
                first = time.perf_counter() - started
            else:
                time.sleep(0.05)
        hist = job.outputs()[0][1]
        assert json.loads(hist["plot"])["data"], "the first histogram came back empty"
        job.result()
        total = time.perf_counter() - started
        redraws = [timed(c.predict, layers, DEFAULT_CRITERIA, True, DEFAULT_CRITERIA[0], api_name="/redraw")[0]
                   for layers in (["0", "29"], ["5"], ["10", "20"])]
        rescore, out = timed(c.predict, DEFAULT_CRITERIA, MODEL, *DATA, *CRIT, [], [], True, None, api_name="/score")
        assert "cached" in out[0], out[0]
    result = {"kind": "responsiveness", "scenario": name, "launch_s": launch, "first_histogram_s": first,
              "all_criteria_s": total, "redraw_s": max(redraws), "rescore_cached_s": rescore, "load": load()}
    print(json.dumps(result), flush=True)
    return result


def tour(env: dict[str, str]) -> dict:
    """A fresh app: the five Tour clicks one after the other, then step 1's Recompute."""
    with running_app(env) as (url, launch):
        c = client(url)
        steps = {}
        for label, api in TOUR_STEPS:
            steps[label], out = timed(c.predict, api_name=api)
        text, estimate = c.predict(api_name="/tour_score")
        assert "precomputed" in text, "the shipped scores were not used"
        recompute, (out, _), monotone = watched(c, api_name="/tour_recompute")
        assert "computed on this machine" in out, out
        first: list = []
        heal, (text, table, _plot), heal_monotone = watched(c, api_name="/tour_heal", first=first)
        assert "Measured on the same" in text and len(table["data"]) == 4, text
    result = {"kind": "tour", "scenario": "fresh app, model converted", "launch_s": launch, "steps_s": steps,
              "five_clicks_s": sum(steps.values()), "with_launch_s": launch + sum(steps.values()),
              "recompute_s": recompute, "recompute_estimate_s": seconds_of(estimate), "monotone": monotone,
              "heal_s": heal, "heal_estimate_s": seconds_of(first[0][0].split("**")[1]), "heal_monotone": heal_monotone,
              "heal_kl": [row[2] for row in table["data"]], "load": load()}
    print(json.dumps(result), flush=True)
    return result


def adaptive(env: dict[str, str], presets: list[str]) -> list[dict]:
    """Prune with the adaptive allocation at each preset (quick = the dashboard default), after the
    Tour's scores; the estimate the dashboard showed beforehand beside the measured time."""
    results = []
    with running_app(env) as (url, _launch):
        c = client(url)
        c.predict(api_name="/tour_score")
        for preset in presets:
            knobs = ADAPTIVE_PRESETS[preset]
            *_, estimate = c.predict(preset, "adaptive", MODEL, api_name="/adaptive_preset")
            seconds, out, monotone = watched(c, "entropy", ADAPTIVE_RATIO, "adaptive", "1", False, 64,
                                             f"ad-{preset}", MODEL, *DATA, *CRIT, knobs["halvings"],
                                             knobs["heldout_samples"], knobs["heldout_seq_len"], knobs["fidelity"],
                                             api_name="/prune")
            status = out[0]
            assert f"ad-{preset}" in status, status
            glance = status.split("Quality at a glance")
            quality = glance[1].split("top-1")[0] if len(glance) > 1 else ""
            result = {"kind": "adaptive", "preset": preset, **knobs, "ratio": ADAPTIVE_RATIO, "criterion": "entropy",
                      "seconds": seconds, "estimate": estimate.split("**")[1] if "**" in estimate else estimate,
                      "estimate_s": seconds_of(estimate.split("**")[1] if "**" in estimate else estimate),
                      "monotone": monotone, "quality": quality.strip(" :."), "load": load()}
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def sweep(env: dict[str, str]) -> dict:
    """The sweep with the Prune tab's defaults (the Tour's two criteria and the random baseline × three
    ratios = 9 rows), after the Tour's scores; the estimate the tab showed beside the time it took."""
    with running_app(env) as (url, _launch):
        c = client(url)
        c.predict(api_name="/tour_score")
        names = ["entropy", "cross_entropy"]
        estimate = c.predict(names, SWEEP["ratios"], SWEEP["allocation"], SWEEP["windows"], SWEEP["seq_len"],
                             SWEEP["compensate_windows"], SWEEP["baseline"], SWEEP["draws"], api_name="/sweep_estimate")
        seconds, (table, _plot, note), monotone = watched(c, names, *SWEEP.values(), api_name="/sweep")
        assert "9 of 9 rows" in note, note
    shown = estimate.split("**")[1]
    result = {"kind": "sweep", "rows": len(table["data"]), "eval": f"{SWEEP['windows']} × {SWEEP['seq_len']}",
              "seconds": seconds, "estimate": shown, "estimate_s": seconds_of(shown), "monotone": monotone,
              "load": load()}
    print(json.dumps(result), flush=True)
    return result


def measure(env: dict[str, str]) -> dict:
    """Measure with its defaults after the Tour's step 4: the original and the two cuts, each within its
    time budget; the estimate the tab showed beside the time it took."""
    with running_app(env) as (url, _launch):
        c = client(url)
        c.predict(api_name="/tour_score")
        c.predict(api_name="/tour_prune")
        _zeroshot, estimate = c.predict([], ZEROSHOT_ITEMS, *MEASURE.values(), api_name="/measure_estimates")
        seconds, (table, _bars, _pareto, note), monotone = watched(c, [], *MEASURE.values(), api_name="/bench")
        rows = table["data"]
        repeats = [row[table["headers"].index("repeats")] for row in rows]
        assert "3 of 3 models measured" in note, note
    shown = estimate.split("**")[1]
    result = {"kind": "measure", "models": len(rows), "budget_s": MEASURE["budget"], "seconds": seconds,
              "estimate": shown, "estimate_s": seconds_of(shown), "monotone": monotone, "repeats": repeats,
              "most_repeats": MAX_REPEATS, "note": note, "load": load()}
    print(json.dumps(result), flush=True)
    return result


def write_tour_scores() -> None:
    """Compute the Tour's shipped scores with the dashboard's own code path and settings."""
    from hfprune_ui.services import Services, tour_file
    from hfprune_ui.tabs.tour import ASSETS, CRITERIA, DEFAULT_DATA

    with tempfile.TemporaryDirectory(prefix="hfprune-tour-") as tmp:
        services = Services(runs_root=Path(tmp) / "runs")
        session = services.sessions.get("tour-scores")
        ASSETS.mkdir(parents=True, exist_ok=True)
        for criterion in CRITERIA:
            result, _run, origin = services.score(session, MODEL, DEFAULT_DATA, criterion)
            result.config = {**result.config, "source_path": None, "session": None}
            path = result.save(ASSETS / tour_file(MODEL, DEFAULT_DATA, criterion))
            print(f"{criterion}: {origin} in {result.seconds:.1f} s → {path.relative_to(ROOT)}")


def tables(results: list[dict]) -> str:
    """The markdown written to benchmarks/results/dashboard.md."""
    parts = [(f"Measured on {machine()}; each scenario launches `python app.py` in a subprocess and drives it "
             "with gradio_client.")]
    rows = []
    for r in (r for r in results if r.get("kind", "responsiveness") == "responsiveness"):
        first_target = 120 if r["scenario"].startswith("fresh") else 60
        rows.append([r["scenario"], f"{r['launch_s']:.1f} (≤ 20)", f"{r['first_histogram_s']:.1f} (≤ {first_target})",
                     f"{r['all_criteria_s']:.1f}", f"{r['redraw_s']:.2f} (≤ 2)", f"{r['rescore_cached_s']:.2f}",
                     r.get("load", "—")])
    if rows:
        parts += [(f"#### Responsiveness (Score defaults: {', '.join(DEFAULT_CRITERIA)} on {DEFAULT_SAMPLES} × "
                  f"{DEFAULT_SEQ_LEN} wiki windows)"),
                  markdown_table(["scenario", "launch → page (s)", "Score → first histogram (s)",
                                  "all criteria done (s)", "redraw from cache (s)", "Score again, cached (s)",
                                  "load avg"], rows)]
    for r in (r for r in results if r.get("kind") == "tour"):
        step_rows = [[label, f"{seconds:.2f}"] for label, seconds in r["steps_s"].items()]
        step_rows += [["**five clicks**", f"**{r['five_clicks_s']:.1f}** (≤ 120)"],
                      ["launch + five clicks", f"{r['with_launch_s']:.1f}"],
                      ["step 1 *Recompute* (scores on this machine instead of the shipped ones)",
                       f"{r['recompute_s']:.1f}"]]
        if r.get("recompute_estimate_s") is not None:
            step_rows += [["… its estimate, shown after step 1 (probe timed then)",
                           f"{r['recompute_estimate_s']:.0f} ({vs(r['recompute_s'], r['recompute_estimate_s'])})"],
                          ["… its progress bar never went back", "yes" if r.get("monotone") else "**no**"]]
        if r.get("heal_s") is not None:
            step_rows += [["6 · heal the cut (least-squares refit + one-minute recovery, live)", f"{r['heal_s']:.1f}"],
                          ["… its estimate, shown when it starts",
                           f"{r['heal_estimate_s']:.0f} ({vs(r['heal_s'], r['heal_estimate_s'])})"],
                          ["… its progress bar never went back", "yes" if r.get("heal_monotone") else "**no**"],
                          ["… KL to the original: cut → refit → recovered",
                           " → ".join(f"{kl:.3f}" for kl in r["heal_kl"][1:])]]
        step_rows += [["machine load average at the end", f"{r.get('load', '—')}"]]
        parts += [f"#### Tour end to end ({r['scenario']}{beside(r)})", markdown_table(["step", "seconds"], step_rows)]
    rows = [[r["preset"], f"{r['halvings']}", f"{r['heldout_samples']} × {r['heldout_seq_len']}", r["fidelity"],
             f"**{r['seconds']:.0f}**" + (" (≤ 180)" if r["preset"] == "quick" and not r.get("burners") else ""),
             r["estimate"] + (f" ({vs(r['seconds'], r['estimate_s'])})" if r.get("estimate_s") else ""),
             {True: "yes", False: "**no**"}.get(r.get("monotone"), "—"), r["quality"], r.get("burners", 0),
             r.get("load", "—")]
            for r in results if r.get("kind") == "adaptive"]
    if rows:
        parts += [(f"#### Adaptive allocation from the dashboard (entropy scores of the Tour, ratio {ADAPTIVE_RATIO}, "
                  "independent mode; Prune → done, quality check included)"),
                  markdown_table(["preset", "halvings", "held-out windows × tokens", "fidelity", "seconds",
                                  "estimate shown before (took ÷ estimate)", "bar never went back",
                                  "quality at a glance", "CPU burners beside", "load avg"], rows)]
    rows = [[f"{r['rows']}", r["eval"], f"**{r['seconds']:.0f}**",
             f"{r['estimate']} ({vs(r['seconds'], r['estimate_s'])})", yes_no(r), r.get("burners", 0),
             r.get("load", "—")] for r in results if r.get("kind") == "sweep"]
    if rows:
        parts += [("#### Criteria × ratio sweep from the Prune tab (its defaults: entropy, cross-entropy and the "
                   f"random baseline × {SWEEP['ratios']}, uniform, after the Tour's scores)"),
                  markdown_table(["rows", "held-out windows × tokens", "seconds", "estimate shown before (took ÷ "
                                  "estimate)", "bar never went back", "CPU burners beside", "load avg"], rows)]
    rows = [[f"{r['models']}", f"{r['budget_s']:g}", f"**{r['seconds']:.0f}**",
             f"{r['estimate']} ({vs(r['seconds'], r['estimate_s'])})", ", ".join(str(n) for n in r["repeats"]),
             yes_no(r), r.get("burners", 0), r.get("load", "—")] for r in results if r.get("kind") == "measure"]
    if rows:
        parts += [(f"#### Measure from the Quantize & measure tab (its defaults: prefill {MEASURE['prefill']}, "
                   f"decode {MEASURE['decode']}, at least {MEASURE['repeats']} repeats, a {MEASURE['budget']:g} s "
                   "budget per model; the original and the Tour's two 30 % cuts; Measure → last row and the "
                   "size-vs-quality plot)"),
                  markdown_table(["models", "budget per model (s)", "seconds", "estimate shown before (took ÷ "
                                  "estimate)", "repeats per model", "bar never went back", "CPU burners beside",
                                  "load avg"], rows)]
    parts += alone_vs_load(results)
    return "\n\n".join(parts) + "\n"


def yes_no(r: dict, key: str = "monotone") -> str:
    return {True: "yes", False: "**no**"}.get(r.get(key), "—")


def jobs(r: dict) -> list[tuple[str, float, float | None, bool | None]]:
    """(job, seconds, estimate shown, bar never went back) for each timed job of a result row."""
    kind = r.get("kind")
    if kind == "tour":
        out = [("Tour: five clicks", r["five_clicks_s"], None, None)]
        if r.get("heal_s") is not None:
            out.append(("Tour: step 6, heal the cut", r["heal_s"], r.get("heal_estimate_s"), r.get("heal_monotone")))
        return out + [("Tour: step 1 Recompute", r["recompute_s"], r.get("recompute_estimate_s"), r.get("monotone"))]
    if kind == "adaptive":
        return [(f"adaptive prune ({r['preset']})", r["seconds"], r.get("estimate_s"), r.get("monotone"))]
    if kind in ("sweep", "measure"):
        label = "sweep (9 rows)" if kind == "sweep" else f"Measure ({r['models']} models)"
        return [(label, r["seconds"], r.get("estimate_s"), r.get("monotone"))]
    return []


def alone_vs_load(results: list[dict]) -> list[str]:
    """One table: each job alone and beside CPU burners, the estimate shown before it beside the time taken."""
    quiet = {job: (s, e, m) for r in results if not r.get("burners") for job, s, e, m in jobs(r)}
    loaded = {job: (s, e, m, r["burners"], r.get("load")) for r in results if r.get("burners")
              for job, s, e, m in jobs(r)}
    if not loaded:
        return []

    def cell(seconds: float, estimate: float | None) -> str:
        return f"{seconds:.0f}" + (f" / {estimate:.0f} ({seconds / estimate:.1f}×)" if estimate else " / —")

    rows = [[job, cell(*quiet[job][:2]) if job in quiet else "—", cell(*loaded[job][:2]), f"{loaded[job][3]}",
             f"{loaded[job][4]}", "yes" if all(v is not False for v in (quiet.get(job, (0, 0, None))[2],
                                                                         loaded[job][2])) else "**no**"]
            for job in loaded]
    return ["#### Alone and under load: seconds taken / the estimate shown before (taken ÷ estimate; the "
            "dashboard's promise is within 2×)",
            markdown_table(["job", "alone", "beside CPU burners", "burners", "load avg", "bar never went back"], rows)]


def vs(actual: float, estimate: float | None) -> str:
    """'took 1.3× the estimate'."""
    return f"took {actual / estimate:.1f}× the estimate" if estimate else "no estimate"


def beside(r: dict) -> str:
    return f", {r['burners']} CPU burners beside" if r.get("burners") else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="responsiveness,tour,adaptive,sweep,measure",
                        help="comma-separated scenarios: responsiveness, tour, adaptive, sweep, measure (the others "
                             "keep their stored rows)")
    parser.add_argument("--skip-fresh", action="store_true", help="skip the fresh-cache scenario (GGUF conversion)")
    parser.add_argument("--thorough", action="store_true", help="also time the thorough adaptive preset")
    parser.add_argument("--write-tour-scores", action="store_true", help="(re)make assets/tour and exit")
    parser.add_argument("--burners", type=int, default=0,
                        help="run the scenarios beside this many busy-loop processes (a loaded machine)")
    args = parser.parse_args()
    if args.write_tour_scores:
        write_tour_scores()
        return
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    stored = RESULTS / "dashboard.json"
    previous = json.loads(stored.read_text()) if stored.exists() else []
    presets = ["quick", "thorough"] if args.thorough else ["quick"]
    results = [r for r in previous if r.get("kind", "responsiveness") not in only
               or r.get("burners", 0) != args.burners  # the rows measured beside another number of burners stay
               or (r.get("kind") == "adaptive" and r.get("preset") not in presets)]  # a preset not re-run stays
    fresh_rows = len(results)
    with tempfile.TemporaryDirectory(prefix="hfprune-bench-") as tmp, burning(args.burners):
        def env(tag: str) -> dict[str, str]:  # the user's converted model, a fresh run store
            return {**base, "HFPRUNE_RUNS": str(Path(tmp) / tag)}

        if "responsiveness" in only:
            results.append(responsiveness("model converted, fresh run store", env("r1")))
            if not args.skip_fresh:
                fresh = {**env("r2"), "HFPRUNE_CACHE": str(Path(tmp) / "cache")}
                results.append(responsiveness("fresh cache (converts the GGUF)", fresh))
        if "tour" in only:
            results.append(tour(env("tour")))
        if "adaptive" in only:
            results += adaptive(env("adaptive"), presets)
        if "sweep" in only:
            results.append(sweep(env("sweep")))
        if "measure" in only:
            results.append(measure(env("measure")))
    for r in results[fresh_rows:]:
        r["burners"] = args.burners
    order = {"responsiveness": 0, "tour": 1, "adaptive": 2, "sweep": 3, "measure": 4}
    results.sort(key=lambda r: (order.get(r.get("kind", "responsiveness"), 3), r.get("burners", 0),
                                r.get("preset") != "quick"))
    text = tables(results)
    print(text)
    write_result("dashboard.md", text)
    write_result("dashboard.json", json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
