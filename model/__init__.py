"""Mllama (Llama 3.2 Vision) in plain PyTorch, with the public names of transformers.

Names are resolved lazily so that `import model` stays cheap and each module can be
imported on its own.
"""
from importlib import import_module
from typing import Any

_EXPORTS = {
    "MllamaConfig": "config",
    "MllamaVisionConfig": "config",
    "MllamaTextConfig": "config",
    "MllamaImageProcessor": "image_processing",
    "MllamaImageProcessorFast": "image_processing_fast",
    "MllamaProcessor": "processing",
    "MllamaVisionModel": "vision",
    "MllamaTextModel": "text",
    "MllamaForCausalLM": "text",
    "MllamaModel": "mllama",
    "MllamaForConditionalGeneration": "mllama",
    "TextIteratorStreamer": "streamer",
    "pipeline": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
