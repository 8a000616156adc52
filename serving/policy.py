"""Which requests run: a bounded wait queue, a fixed number of slots, and when a request ends.

Plain Python, no torch: the scheduler asks the policy what to run and tells it what each step
produced; the model runner does the computing. A request takes the lowest free slot, so a decode
step can run rows [0, highest busy slot] and a lone user never pays for the whole batch.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .errors import EngineBusy, EngineClosed


@dataclass
class ReplyStats:
    time_to_first_token_s: float
    tokens: int
    tokens_per_s: float
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V came from the conversation's last turn


@dataclass(eq=False)
class Request:
    """One reply to produce. `inputs`, `sampling`, `generator` and `streamer` are the runner's and
    the scheduler's business; the policy reads only token counts, stop tokens and the cancel flag."""

    prompt_ids: list[int]
    max_new_tokens: int
    eos: frozenset[int]
    streamer: Any
    inputs: Any = None
    sampling: Any = None
    generator: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)
    session_id: str | None = None
    image_key: str | None = None  # a fingerprint of the picture, when the caller has computed it
    # set while serving
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    stats: ReplyStats | None = None
    done: threading.Event = field(default_factory=threading.Event)  # set when it has left for good

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def read_tokens(self) -> int:
        """Tokens whose K/V are in the cache: the prompt and every reply token but the newest."""
        return self.prompt_len + max(len(self.tokens) - 1, 0)

    def finished_stats(self) -> ReplyStats:
        """The figures of this reply, now that it has ended (`finish_reason` set)."""
        now = time.perf_counter()
        first = self.first_token_at or now
        n = len(self.tokens)
        return ReplyStats(
            time_to_first_token_s=first - self.submitted,
            tokens=n,
            tokens_per_s=(n - 1) / (now - first) if n > 1 and now > first else 0.0,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_len,
            cached_prompt_tokens=self.cached_tokens,
        )


class Policy:
    def __init__(self, slots: int, queue_size: int) -> None:
        self.slots: list[Request | None] = [None] * slots
        self.queue_size = queue_size
        self._waiting: deque[Request] = deque()
        self._changed = threading.Condition()
        self.closed = False

    def submit(self, request: Request) -> None:
        with self._changed:
            if self.closed:
                raise EngineClosed("The engine has been shut down: the server is stopping or restarting. Try again in a moment.")
            if len(self._waiting) >= self.queue_size:
                raise EngineBusy(f"The server is busy: {self.queue_size} requests are already waiting. "
                                 "Try again in a moment.")
            self._waiting.append(request)
            self._changed.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def wait_for_work(self, timeout: float) -> None:
        with self._changed:
            if not self._waiting and not self.closed:
                self._changed.wait(timeout)

    def admit(self) -> tuple[list[Request], list[Request]]:
        """Waiting requests into free slots, in arrival order: (admitted, cancelled while waiting)."""
        admitted, dropped = [], []
        with self._changed:
            while self._waiting and None in self.slots:
                request = self._waiting.popleft()
                if request.cancel.is_set():
                    request.finish_reason = "cancelled"
                    dropped.append(request)
                    continue
                request.slot = self.slots.index(None)
                self.slots[request.slot] = request
                admitted.append(request)
        return admitted, dropped

    def take_cancelled(self) -> list[Request]:
        """Running requests whose cancel flag is set; they are finished and their slots free."""
        gone = [r for r in self.running() if r.cancel.is_set()]
        for request in gone:
            self.end(request, "cancelled")
        return gone

    def record(self, request: Request, token: int) -> bool:
        """Book a sampled token; True if the request has finished (its slot is then free)."""
        request.tokens.append(token)
        if token in request.eos:
            self.end(request, "stop")
        elif len(request.tokens) >= request.max_new_tokens:
            self.end(request, "length")
        elif request.cancel.is_set():
            self.end(request, "cancelled")
        return request.finish_reason is not None

    def end(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        if 0 <= request.slot < len(self.slots) and self.slots[request.slot] is request:
            self.slots[request.slot] = None

    def close(self) -> list[Request]:
        """Stop taking requests; returns every running and waiting one (to be failed)."""
        with self._changed:
            self.closed = True
            left = self.running() + list(self._waiting)
            self._waiting.clear()
            self.slots = [None] * len(self.slots)
            self._changed.notify_all()
        return left
