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
# transformers' Auto* names used by the reference's own examples.
_ALIASES = {"AutoProcessor": "MllamaProcessor"}

__all__ = sorted([*_EXPORTS, *_ALIASES])


def __getattr__(name: str) -> Any:
    target = _ALIASES.get(name, name)
    if target not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[target]}", __name__), target)
    globals()[name] = value
    return value
