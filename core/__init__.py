"""HFPrune Studio engine: entropy-Taylor structured pruning of transformer MLPs (no gradio here)."""
__version__ = "0.1.0"
