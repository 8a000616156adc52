"""Turning chat requests into streamed replies: continuous batching over one model.

`policy` decides (queue, admission, finishing; no torch), `runner` computes (batched prefill,
decode steps, sampling, on the device), `prefix_store` keeps conversations' K/V for follow-ups,
`scheduler` runs the loop that joins them on one thread, and `engine` is what the app talks to.
"""
from .engine import ChatEngine, EngineInfo, GenerationSettings, ImageInfo
from .errors import EngineBusy, EngineError, PromptTooLong
from .policy import ReplyStats

__all__ = ["ChatEngine", "EngineBusy", "EngineError", "EngineInfo", "GenerationSettings", "ImageInfo",
           "PromptTooLong", "ReplyStats"]
