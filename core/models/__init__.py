"""Layer 1 — models: everything about a model object that does not judge it. Loading (embedded alias,
hub id, folder, GGUF), per-architecture MLP / attention handles, encoders, device placement and memory
estimates, analytic parameter / FLOP / byte counts, the hf-remote-code modeling file, slicing (pruning a
model to given widths, the zero-padded copy), the shared forward helpers, the dense reference computed
once (``reference``: fp32 log-probs per batch within a byte budget, KL / entropy in row chunks) and GGUF
reading.

Imports only the ground modules (errors, paths, files, options, progress, metrics, distributed, runs).
"""

from core.models.adapters import mlp_handles, mlp_widths
from core.models.counts import count_params
from core.models.encoders import LoadedEncoder, load_encoder
from core.models.loading import LoadedModel, load_model
from core.models.slicing import prune_mlp_neurons

__all__ = ["LoadedEncoder", "LoadedModel", "count_params", "load_encoder", "load_model", "mlp_handles", "mlp_widths",
           "prune_mlp_neurons"]
