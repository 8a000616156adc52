"""What a request can fail with; every message says what to do."""
from __future__ import annotations


class EngineError(Exception):
    """A request could not be served; the message says what to do."""


class EngineBusy(EngineError):
    """The wait queue is full."""


class PromptTooLong(EngineError):
    """The conversation does not fit the context budget."""


class EngineClosed(EngineError):
    """The engine has been shut down (or is not serving yet)."""
