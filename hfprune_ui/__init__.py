"""HFPrune Studio dashboard (Gradio 6 + plotly): layout, handlers and figures; the math lives in core."""
from .layout import build_demo, launch_options, queue

__all__ = ["build_demo", "launch_options", "queue"]
