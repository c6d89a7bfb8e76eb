"""HFPrune Studio engine: entropy-Taylor structured pruning of transformer MLPs (no gradio here).

Layers, bottom to top; each imports only the ones below it (tests/test_layout.py checks it), every
import sits at the top of its file, and the only imports inside functions are optional or heavy
third-party backends. docs/architecture.md describes every module.

    ground       errors, paths, files, options, progress, metrics, distributed, runs (flat modules)
    models/      loading, adapters, encoders, placement, counts, remote_code, slicing, forward, gguf_read
    data/        text windows, images
    importance/  Taylor hooks, criteria (one registry: decoder LMs and encoders), score statistics
    prune/       allocate, adaptive, compensate
    train/       the one training loop
    export/      Hugging Face folders, GGUF
    quantize/    backends, fake quantization (QAT), quantized folders
    measure/     evaluate, outputs, speed, zero-shot, encoder metrics, timing
    methods/     oneshot, gates (DDP), encoders (AMP), recover, pipeline
    studies/     sweep, stability, neuron, report
    cli/         python -m core
"""
from core.progress import quiet_third_party

__version__ = "0.1.0"

# Quiet as a library too: transformers imports torchao whenever it is installed (even to load a plain
# model), and that import logs lines nobody can act on; silence just those loggers, below errors.
quiet_third_party()
