"""Layer 6 — export: writing pruned models — Hugging Face folders (hf-native / hf-remote-code / hf-padded),
zips, and one GGUF file for llama.cpp / Ollama. Imports the layers below.
"""

from core.export.gguf import save_gguf
from core.export.hf import save_pruned

__all__ = ["save_gguf", "save_pruned"]
