"""Serving time: load a built ladder and run its variants (onnxruntime, tokenizers, numpy; no
torch). Nothing here imports ``models.build``."""
