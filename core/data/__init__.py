"""Layer 2 — data: the text sources and their calibration / evaluation / training windows, and the
encoders' offline images. Imports ground and models only.
"""

from core.data.text import (
    CalibrationOptions,
    HeldoutWindows,
    TextSource,
    TextWindows,
    TrainingText,
    calibration_windows,
    evaluation_windows,
    training_windows,
)

__all__ = ["CalibrationOptions", "HeldoutWindows", "TextSource", "TextWindows", "TrainingText", "calibration_windows",
           "evaluation_windows", "training_windows"]
