"""Time and memory of comparing several pruned variants with the dense model: the dense model re-run for
every variant (``evaluate(variant, windows, dense)``) vs one ``core.evaluate.Reference`` computed once.

    flock /tmp/heavy.lock python benchmarks/reference_memory.py --model smollm2-135m --windows 8 --seq-len 128

Variants: uniform widths at each ratio with random neuron scores (the comparison does not depend on
which neurons go). Peak memory = the largest process RSS sampled every 2 ms during each approach,
minus the RSS before it. Prints one JSON line and checks both approaches give identical metrics.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import psutil
import torch

import _common  # noqa: F401  (sys.path + environment)
from _common import machine

from core.data.text import evaluation_windows
from core.importance.stats import top_k_indices
from core.measure.evaluate import Reference, evaluate
from core.measure.speed import release_memory
from core.models.adapters import mlp_widths
from core.models.loading import load_model
from core.models.slicing import pruned_view
from core.prune.allocate import uniform_widths


class PeakRSS:
    """Largest RSS (bytes) seen by a 2 ms sampling thread while the block runs, relative to its start."""

    def __enter__(self):
        release_memory()
        self.process, self.start = psutil.Process(), psutil.Process().memory_info().rss
        self.peak, self.running = self.start, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    @property
    def mb(self) -> float:
        return round((self.peak - self.start) / 1e6, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratios", default="0.2,0.3,0.4")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    loaded = load_model(args.model)
    dense = loaded.model
    windows = evaluation_windows(loaded.tokenizer, "wiki", args.windows, args.seq_len, max_length=loaded.max_length)
    full = mlp_widths(dense)
    scores = [torch.rand(w) for w in full]
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = [pruned_view(dense, top_k_indices(scores, uniform_widths(full, r))) for r in ratios]

    with PeakRSS() as rerun_mem:
        t0 = time.perf_counter()
        rerun = [evaluate(v, windows, dense, batch_size=args.batch_size, progress=False).to_dict() for v in variants]
        rerun_s = time.perf_counter() - t0
    with PeakRSS() as once_mem:
        t0 = time.perf_counter()
        reference = Reference(dense, windows, args.batch_size)
        once = [evaluate(v, windows, reference, batch_size=args.batch_size, progress=False).to_dict()
                for v in variants]
        once_s = time.perf_counter() - t0
    print(json.dumps({
        "model": args.model, "windows": args.windows, "seq_len": args.seq_len, "vocab": dense.config.vocab_size,
        "variants": len(variants), "identical_metrics": rerun == once,
        "rerun_dense_s": round(rerun_s, 2), "reference_once_s": round(once_s, 2),
        "rerun_dense_peak_mb": rerun_mem.mb, "reference_once_peak_mb": once_mem.mb,
        "reference_cached_mb": round(reference.cached_bytes / 1e6, 1), "machine": machine(),
        "command": "python benchmarks/reference_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)}))
    return 0 if rerun == once else 1


if __name__ == "__main__":
    raise SystemExit(main())
