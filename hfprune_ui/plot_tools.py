"""The page script every dashboard chart shares (``assets/plot_tools.js``), given to ``launch(head=...)``.

It gives each plotly chart a PNG (camera, 2×) and an SVG (disk) download named after the chart's
title — both drawn by plotly.js in the browser, so exports work offline and cost the server nothing
(kaleido 1.5 also works here, with Debian's chromium, but starts a browser per image: ~7 s each) —
and turns clicks on the rank scatter and the heatmap into neuron picks for the inspector.
"""
from __future__ import annotations

from core import paths

SCRIPT = paths.ASSETS / "plot_tools.js"
HIDDEN = "<style>#neuron-pick { display: none !important; }</style>"


def head() -> str:
    """HTML for the page's <head>: the script inline (no extra request) and the hidden pick box."""
    return f"<script>{SCRIPT.read_text()}</script>{HIDDEN}"
