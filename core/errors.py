"""Errors the engine raises for input a user can fix; each carries one clear sentence."""


class HFPruneError(Exception):
    """Base class: the message is meant to be shown to the user as is."""


class ModelLoadError(HFPruneError):
    """The model spec could not be resolved or loaded."""


class UnsupportedArchitectureError(HFPruneError):
    """The model loaded but its MLPs are not of a kind the engine knows how to prune."""


class DataError(HFPruneError):
    """Calibration/evaluation text is missing, empty, too short or malformed."""


class PruneConfigError(HFPruneError):
    """Ratio, widths or export options are invalid for this model."""


class SelectionError(HFPruneError):
    """A layer, neuron, criterion or draw count that does not fit the model or its scores."""


class VisionConfigError(PruneConfigError):
    """An option of the encoder path that cannot work."""


class Stopped(HFPruneError):
    """A long job ended because its stop check said so (the user pressed Stop); nothing was stored.

    Deliberately not the built-in ``InterruptedError``: that is an ``OSError``, and handlers that
    report disk problems would misread a stop as one."""
