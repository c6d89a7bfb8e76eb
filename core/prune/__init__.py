"""Layer 4 — prune: from scores to a smaller model's shape and weights. Width allocation (uniform /
global / adaptive search), and compensation (the least-squares down_proj refit; the layer-by-layer whole-MLP
reconstruction). Imports the layers below.
"""

from core.prune.allocate import AllocationOptions
from core.prune.compensate import CompensationOptions

__all__ = ["AllocationOptions", "CompensationOptions"]
