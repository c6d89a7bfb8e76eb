"""Layer 7 — quantize: quantization backends (imported only when quantizing), fake quantization for
QAT, and quantized folders (recipe files, save_quantized, load_any). Imports the layers below.
"""

from core.quantize.backends import quantize_model
from core.quantize.store import load_any, save_quantized

__all__ = ["load_any", "quantize_model", "save_quantized"]
