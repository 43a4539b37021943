"""Engines that run one ladder variant: our ORT loop and onnxruntime-genai, one interface."""

from models.runtime.engine.base import (
    Chunk,
    ContextOverflowError,
    Engine,
    EngineError,
    GenerationParams,
    GenerationResult,
    VariantLoadError,
)

__all__ = [
    "Chunk",
    "ContextOverflowError",
    "Engine",
    "EngineError",
    "GenerationParams",
    "GenerationResult",
    "VariantLoadError",
]
