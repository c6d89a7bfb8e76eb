"""Layer 3 — importance: how much each MLP neuron matters. The Taylor hook machinery (a loss → per-neuron
|a·g| scores), every criterion behind one interface in one registry (decoder LMs and encoders), structured
OBS selection on gradient-weighted Grams, and the statistics of score sets (ranks, overlaps, the top-k kept
set). Imports ground, models, data.
"""

from core.importance.criteria import REGISTRY, Criterion, ScoreOptions, get_criterion

__all__ = ["Criterion", "REGISTRY", "ScoreOptions", "get_criterion"]
