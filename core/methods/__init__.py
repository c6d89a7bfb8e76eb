"""Layer 9 — methods: the pruning methods end to end. One-shot (score → allocate → prune → refit),
gates (deterministic differentiable pruning, DDP), encoders (AMP for vision / text encoders), recovery
(distil a pruned model back) and the prune → quantize → distil pipeline. Imports the layers below.
"""

from core.methods.oneshot import ScoreResult, prune_with_scores, score_model
from core.methods.pipeline import run_pipeline
from core.methods.recover import recover

__all__ = ["ScoreResult", "prune_with_scores", "recover", "run_pipeline", "score_model"]
