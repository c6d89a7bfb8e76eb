"""Layer 8 — measure: what a model is worth — perplexity and fidelity to a dense reference, what it says
(generation, next-token menus), measured speed and memory, lm-eval zero-shot on the shipped tasks,
encoder metrics, and wall-time estimates of long jobs. Imports the layers below.
"""

from core.measure.evaluate import Reference, evaluate
from core.measure.speed import measure_speed
from core.measure.zeroshot import run_zeroshot

__all__ = ["Reference", "evaluate", "measure_speed", "run_zeroshot"]
