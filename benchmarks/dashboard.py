"""Dashboard responsiveness, measured on the real app in a subprocess (issue #3 targets):

1. launch → page served (HTTP 200 on /), target ≤ 20 s;
2. press Score with the default settings → first histogram back, target ≤ 60 s with the model
   already converted (fresh run store), ≤ 120 s on a fresh cache (GGUF conversion included);
3. redraw from cached scores, target ≤ 2 s.

    python benchmarks/dashboard.py            # both scenarios
    python benchmarks/dashboard.py --skip-fresh
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _common  # noqa: F401
from _common import ROOT, machine, markdown_table, write_result

from hfprune_ui.tabs.importance import DEFAULT_CRITERIA  # noqa: E402  (the defaults the UI shows)
from hfprune_ui.tabs.model_data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN  # noqa: E402

MODEL = "smollm2-135m"


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


def scenario(name: str, env: dict[str, str]) -> dict:
    """Launch the app with ``env``, score with the defaults, redraw; return the timings in seconds."""
    from gradio_client import Client

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_served(url, process)
        launch = time.perf_counter() - started
        client = Client(url, verbose=False)
        started = time.perf_counter()
        job = client.submit(DEFAULT_CRITERIA, MODEL, "wiki", None, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, 0, 0.5, 0.5, 0.5, [], [], True,
                            None, api_name="/score")
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
        redraws = []
        for layers in (["0", "29"], ["5"], ["10", "20"]):
            t0 = time.perf_counter()
            client.predict(layers, DEFAULT_CRITERIA, True, DEFAULT_CRITERIA[0], api_name="/redraw")
            redraws.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        status = client.predict(DEFAULT_CRITERIA, MODEL, "wiki", None, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, 0, 0.5, 0.5, 0.5, [], [],
                                True, None, api_name="/score")[0]
        rescore = time.perf_counter() - t0
        assert "cached" in status, status
    finally:
        process.terminate()
        process.wait(timeout=30)
    result = {"scenario": name, "launch_s": launch, "first_histogram_s": first, "all_criteria_s": total,
              "redraw_s": max(redraws), "rescore_cached_s": rescore}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-fresh", action="store_true", help="skip the fresh-cache scenario (GGUF conversion)")
    args = parser.parse_args()
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    with tempfile.TemporaryDirectory(prefix="hfprune-bench-") as tmp:
        # Converted model (the user's normal cache) but a fresh run store: nothing scored yet.
        results.append(scenario("model converted, fresh run store", {**base, "HFPRUNE_RUNS": str(Path(tmp) / "r1")}))
        if not args.skip_fresh:
            fresh = {**base, "HFPRUNE_CACHE": str(Path(tmp) / "cache"), "HFPRUNE_RUNS": str(Path(tmp) / "r2")}
            results.append(scenario("fresh cache (converts the GGUF)", fresh))
    targets = {"launch_s": 20, "redraw_s": 2}
    rows = []
    for r in results:
        first_target = 120 if r["scenario"].startswith("fresh") else 60
        rows.append([r["scenario"], f"{r['launch_s']:.1f} (≤ {targets['launch_s']})",
                     f"{r['first_histogram_s']:.1f} (≤ {first_target})", f"{r['all_criteria_s']:.1f}",
                     f"{r['redraw_s']:.2f} (≤ {targets['redraw_s']})", f"{r['rescore_cached_s']:.2f}"])
    header = (f"Score defaults: {', '.join(DEFAULT_CRITERIA)} on {DEFAULT_SAMPLES} × {DEFAULT_SEQ_LEN} wiki windows; "
              f"{machine()}")
    table = markdown_table(["scenario", "launch → page (s)", "Score → first histogram (s)", "all criteria done (s)",
                            "redraw from cache (s)", "Score again, cached (s)"], rows)
    print(header)
    print(table)
    write_result("dashboard.md", header + "\n\n" + table + "\n")
    write_result("dashboard.json", json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
