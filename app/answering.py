"""Running answers: engine settings from the page's values, and real cancellation per session.

Stop, Clear and a closed tab must stop the computation, not only the display. Each running answer
registers a cancel event under its browser session; `RunningAnswers.stop` sets it (the engine
checks it every decode step) and waits until the answer has written its last state.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from model.image_io import ImageLoadError, load_image
from serving import EngineError, GenerationSettings, ReplyStats

log = logging.getLogger(__name__)

RANDOM_SEED = -1  # the seed field's value for "a new random seed every time"


@dataclass
class _Running:
    cancel: threading.Event
    done: threading.Event


class RunningAnswers:
    """The cancel handles of the answers being generated, one per browser session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}

    def start(self, session: str) -> threading.Event:
        """Register a new answer for `session` and return its cancel event."""
        running = _Running(threading.Event(), threading.Event())
        with self._lock:
            previous = self._running.get(session)
            self._running[session] = running
        if previous is not None:  # one answer per session: a new one ends the old
            previous.cancel.set()
        return running.cancel

    def end(self, session: str, cancel: threading.Event) -> None:
        """Mark the answer owning `cancel` as finished (its last state is written)."""
        with self._lock:
            running = self._running.get(session)
            if running is not None and running.cancel is cancel:
                del self._running[session]
        if running is not None and running.cancel is cancel:
            running.done.set()

    def stop(self, session: str, wait_s: float = 10.0) -> bool:
        """Cancel the session's answer, if any, and wait for it to end. True if one was running."""
        with self._lock:
            running = self._running.get(session)
        if running is None:
            return False
        running.cancel.set()
        running.done.wait(wait_s)
        return True


def settings_from(max_new_tokens: float, temperature: float, top_p: float, top_k: float = 0,
                  repetition_penalty: float = 1.0, seed: float | None = None, *,
                  limit: int) -> GenerationSettings:
    """Engine settings from slider and number values (floats from the page); a seed that is None,
    blank or negative (RANDOM_SEED) means a fresh random seed for each answer."""
    return GenerationSettings(
        max_new_tokens=max(1, min(int(max_new_tokens), limit)),
        temperature=max(0.0, float(temperature)),
        top_p=min(1.0, max(0.0, float(top_p))) or 1.0,
        top_k=max(0, int(top_k)),
        repetition_penalty=max(1.0, float(repetition_penalty)),
        seed=None if seed is None or seed == "" or int(seed) < 0 else int(seed),
    )


def drain(pieces: Iterator[str | ReplyStats]) -> ReplyStats | None:
    """After `cancel` was set: read what the engine still sends (one decode step at most) and return
    its final ReplyStats, so a stopped answer still gets its figures."""
    try:
        for item in pieces:
            if isinstance(item, ReplyStats):
                return item
    except EngineError as error:
        log.info("engine error after cancel: %s", error)
    return None


# A picture is decoded at full size before it is shrunk (PNG has no reduced-scale decoding), and a
# large one takes hundreds of MB while it is: at most this many at once, whatever the traffic.
FULL_SIZE_DECODES = threading.BoundedSemaphore(2)


def read_picture(path: str, max_side: int | None = None) -> Any:
    """`load_image` of a file path (or a data or http(s) URL), shrunk to fit `max_side` (the model
    sees no more), with every failure as an ImageLoadError that says what to do."""
    try:
        with FULL_SIZE_DECODES:
            picture = load_image(path, max_side=max_side)
            if "original_size" in picture.info:
                _return_freed_memory()
            return picture
    except ImageLoadError as error:  # name a file as the user knows it, not by its upload path
        if str(path).startswith(("data:", "http://", "https://")):
            raise
        raise ImageLoadError(str(error).replace(str(path), Path(path).name)) from None
    except Exception as error:  # noqa: BLE001 - a damaged file can fail deep inside PIL
        raise ImageLoadError(f"The picture could not be read ({type(error).__name__}: {error}); the file is "
                             "probably damaged or not an image. Try another PNG, JPEG or WebP file.") from None


def _return_freed_memory() -> None:
    """Hand the freed pages of a full-size decode back to the system: glibc keeps freed heap
    memory for reuse, so each thread that decoded a large picture would otherwise stay hundreds
    of MB larger."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def failure_message(error: Exception) -> str:
    """What to tell the user about an error raised while answering."""
    if isinstance(error, (EngineError, ImageLoadError)):
        return str(error)  # these messages already say what to do
    return (f"The model failed ({type(error).__name__}: {error}). Press Retry; if it happens again, "
            "restart the app and report the message above.")
