"""Continuous batching: one thread owns the model and serves every request.

Each turn of the loop: drop requests whose cancel flag is set, prefill the newcomers that fit in
free slots (together), then decode one token for every running request at once. A request leaves
as soon as it hits a stop token, its token budget or its cancel flag, and its slot is free for
the next one. The policy decides, the runner computes, this loop streams and keeps the figures.
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from .errors import EngineError
from .policy import Policy, Request
from .runner import ModelRunner

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, runner: ModelRunner, slots: int, queue_size: int) -> None:
        self.runner = runner
        self.policy = Policy(slots, queue_size)
        self.steps = 0  # decode steps run so far
        self._thread = threading.Thread(target=self._serve, name="mllama-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        self.policy.submit(request)

    def close(self) -> None:
        """Stop serving; requests still running or waiting end with an error."""
        left = self.policy.close()
        self._thread.join(timeout=10)
        gone = EngineError("the engine was shut down before this request finished")
        for request in left:
            request.streamer.put_error(gone)
            request.done.set()

    # --- the serving loop --------------------------------------------------------------------

    @torch.inference_mode()
    def _serve(self) -> None:
        while not self.policy.closed:
            try:
                self._turn()
            except Exception as error:  # never let the serving thread die silently
                log.exception("scheduler step failed")
                self._fail(self.policy.running(), error)

    def _turn(self) -> None:
        for request in self.policy.take_cancelled():
            self._finish(request)
        admitted, dropped = self.policy.admit()
        for request in dropped:
            self._finish(request)
        if admitted:
            try:
                for batch in self.runner.prefill(admitted):
                    for request, token in batch:
                        self._accept(request, token)
            except Exception as error:
                self._fail([r for r in admitted if r.first_token_at is None], error)
        running = self.policy.running()
        if not running:
            self.policy.wait_for_work(timeout=0.1)
            return
        try:
            tokens = self.runner.decode(running)
        except Exception as error:
            self._fail(running, error)
            return
        self.steps += 1
        for request, token in zip(running, tokens):
            self._accept(request, token)

    def _accept(self, request: Request, token: int) -> None:
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.streamer.put([token])
        if self.policy.record(request, token):
            self._finish(request)

    def _finish(self, request: Request) -> None:
        request.stats = request.finished_stats()
        if request.slot >= 0:
            self.runner.release(request)
        request.streamer.end()
        request.done.set()

    def _fail(self, requests: list[Request], error: Exception) -> None:
        recover_memory(error)
        message = explain_failure(error)
        for request in requests:
            self.policy.end(request, "error")
            self.runner.release(request, keep=False)
            request.streamer.put_error(message)
            request.done.set()


def _is_oom(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def recover_memory(error: Exception) -> None:
    if _is_oom(error) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def explain_failure(error: Exception) -> Exception:
    if _is_oom(error):
        return EngineError(
            "The device ran out of memory for this request. The server recovered; try a shorter "
            "conversation, a smaller picture or fewer new tokens."
        )
    return error
