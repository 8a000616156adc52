"""Turning chat requests into streamed replies: continuous batching over one model.

`policy` decides (queue, admission, finishing; no torch), `runner` computes (batched prefill,
decode steps, sampling, on the device), `prefix_store` keeps conversations' K/V for follow-ups,
`scheduler` runs the loop that joins them on one thread, and `engine` is what the app talks to.
Names are resolved lazily, so that `serving.policy` can be imported without torch.
"""
from importlib import import_module
from typing import Any

_EXPORTS = {
    "ChatEngine": "engine",
    "Engine": "engine",
    "EngineInfo": "engine",
    "GenerationSettings": "engine",
    "ImageInfo": "engine",
    "Reply": "engine",
    "EngineBusy": "errors",
    "EngineError": "errors",
    "PromptTooLong": "errors",
    "ReplyStats": "policy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
