"""Layer 10 — studies: looking into pruning rather than doing it — the criteria × allocation × ratio
fidelity sweep, rank stability over calibration draws, one neuron up close, and a stored run as one
self-contained HTML report. Imports the layers below; only core.cli and hfprune_ui sit above.
"""
