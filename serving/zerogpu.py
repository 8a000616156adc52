"""Serving on Hugging Face ZeroGPU: each request's GPU work in one `@spaces.GPU` call.

On ZeroGPU a Space holds a GPU only while a function decorated with `spaces.GPU` runs, for at
most the `duration` it asked for, and that function runs in a forked worker process: its
arguments and what it yields are pickled across, and nothing set later in the Space's process (a
threading.Event, say) reaches it. So a request is one call of a decorated generator that takes
the encoded prompt (tokenizing and cutting the picture into tiles stay on the CPU, outside),
runs `generate()` (picture encoding, prefill and every decode step) and yields each token id as
it is sampled; the text is decoded here, outside. Stop closes that generator, which is how
ZeroGPU stops a call: the worker closes it after its next token, and `generate()` ends before
its next step.

Every call prefills its whole conversation: K/V kept from a conversation's last turn would live
in a worker process that may be gone, or belong to another GPU, by the next turn.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from model.sampling import SamplingConfig

from .engine import (
    GenerationSettings,
    ImageInfo,
    RequestReader,
    describe_tiling,
    load_checkpoint,
    local_engine_info,
    stop_tokens,
)
from .errors import EngineClosed, EngineError
from .policy import ReplyStats, Request
from .scheduler import explain_failure, recover_memory

log = logging.getLogger(__name__)

# `spaces.GPU`: decorator(task, duration=callable taking the task's arguments) -> the task, run
# with a GPU attached (or as it is, off ZeroGPU)
GpuDecorator = Callable[..., Callable]


@dataclass(frozen=True)
class GpuTime:
    """The GPU time a request asks ZeroGPU for, from its size. ZeroGPU refuses a call whose time
    exceeds the user's quota left (the user sees why) and aborts one that runs past it, so the
    estimate errs long; an answer that could not finish within `most_s` gets fewer new tokens.

    The figures are for Llama 3.2 11B Vision in bfloat16 on ZeroGPU's slice of an H200, decoding
    eagerly one request at a time: a decode step reads the ~21 GB of weights (about 10 ms at the
    slice's memory bandwidth) and eager PyTorch adds its overhead; 50 ms leaves room. They are
    estimates, not measurements on ZeroGPU."""

    start_s: float = 5.0                 # attaching the GPU; a fresh worker also moves the weights onto it
    per_prompt_token_s: float = 0.0005   # prefill
    per_tile_s: float = 0.05             # the vision tower, per tile it encodes
    per_new_token_s: float = 0.05        # one decode step and sampling
    most_s: int = 120                    # the longest call to ask for

    def fixed_s(self, prompt_tokens: int, tiles: int) -> float:
        return self.start_s + prompt_tokens * self.per_prompt_token_s + tiles * self.per_tile_s

    def new_tokens_within(self, prompt_tokens: int, tiles: int) -> int:
        """The most new tokens a call of `most_s` has time for (at least 1)."""
        return max(1, int((self.most_s - self.fixed_s(prompt_tokens, tiles)) / self.per_new_token_s))

    def seconds(self, job: GpuJob) -> int:
        """The `duration` of the call that runs `job`, whole seconds."""
        estimate = self.fixed_s(job.prompt_tokens, job.tiles) + job.max_new_tokens * self.per_new_token_s
        return min(self.most_s, math.ceil(estimate))


@dataclass
class GpuJob:
    """One request's GPU work, as ZeroGPU pickles it into the worker process."""

    inputs: dict[str, torch.Tensor]  # input_ids (1, L) and the picture's tensors, on the CPU
    max_new_tokens: int
    sampling: SamplingConfig
    seed: int | None

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def tiles(self) -> int:
        """Tiles the vision tower encodes (every tile slot of every picture, padding included)."""
        pixels = self.inputs.get("pixel_values")
        return 0 if pixels is None else int(pixels.shape[1] * pixels.shape[2])


@dataclass
class GpuFailure:
    """What failed inside the GPU call, yielded instead of raised: ZeroGPU passes an exception
    out of its worker as its class name only, this keeps the message that says what to do."""

    error: BaseException

    @classmethod
    def of(cls, error: BaseException) -> GpuFailure:
        recover_memory(error)
        error = explain_failure(error) if isinstance(error, Exception) else error
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - an exception that cannot cross to the Space's process
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return cls(error)


_DONE = object()


class _TokenFeed:
    """generate()'s streamer inside the GPU call: the new token ids, then _DONE or the error."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()
        self.finished = False
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:  # generate() puts the prompt first
            self._prompt = False
            return
        self.items.put(int(value.reshape(-1)[0]))

    def end(self) -> None:
        self.finished = True
        self.items.put(_DONE)

    def put_error(self, error: BaseException) -> None:
        self.finished = True
        self.items.put(error)


class ZeroGPUEngine:
    """The `Engine` for ZeroGPU Spaces: one `gpu`-decorated call per request (see the module's
    notes). `gpu` is `spaces.GPU`; `gpu_time` sizes each call's `duration`."""

    def __init__(self, model, processor, model_id: str, *, context_tokens: int, gpu: GpuDecorator,
                 generation_config: dict | None = None, gpu_time: GpuTime = GpuTime()) -> None:
        self.model = model
        self.processor = processor
        generation_config = generation_config or {}
        self.eos = stop_tokens(model, generation_config)
        self.context_tokens = min(context_tokens, model.config.text_config.max_position_embeddings)
        self.requests = RequestReader(processor, self.eos, self.context_tokens)
        self.gpu_time = gpu_time
        self.info = local_engine_info(model, processor, model_id, self.context_tokens, generation_config)
        # Decorated here, before the app launches: ZeroGPU looks for its GPU functions at start-up.
        self._gpu_call = gpu(self._run_on_gpu, duration=gpu_time.seconds)
        self._lock = threading.Lock()
        self._running: set[threading.Event] = set()
        self._closed = False

    @classmethod
    def load(cls, model: str, *, gpu: GpuDecorator, dtype: str | torch.dtype = "auto", device: str = "cuda",
             context_tokens: int = 4096, gpu_time: GpuTime = GpuTime()) -> ZeroGPUEngine:
        """Load a checkpoint folder or hub id on the CPU, then move it to `device` (on ZeroGPU,
        'cuda' works at start-up without a GPU: the weights go onto one in each call)."""
        start = time.perf_counter()
        network, processor, generation_config = load_checkpoint(model, dtype=dtype)
        network.to(device)
        engine = cls(network, processor, model, context_tokens=context_tokens, gpu=gpu,
                     generation_config=generation_config, gpu_time=gpu_time)
        log.info("loaded %s in %.1f s", model, time.perf_counter() - start)
        return engine

    def describe_image(self, image) -> ImageInfo:
        return describe_tiling(image, self.info.tile_size, self.info.max_tiles)

    def chat(self, messages: list[dict], settings: GenerationSettings | None = None,
             cancel: threading.Event | None = None, session_id: str | None = None) -> GpuReply:
        """Check and encode the conversation here (errors are raised at once, before any GPU is
        asked for); the reply's first read starts its GPU call. Closing the reply or setting
        `cancel` ends the call after its next token. `session_id` is accepted and unused: each
        call prefills its whole conversation."""
        settings = settings or self.info.defaults
        request = self.requests.read(messages, settings, cancel or threading.Event(), session_id, device=None)
        with self._lock:
            if self._closed:
                raise EngineClosed("The engine has been shut down: the server is stopping or restarting. "
                                   "Try again in a moment.")
        job = GpuJob(inputs=request.inputs, max_new_tokens=request.max_new_tokens, sampling=request.sampling,
                     seed=None if settings.seed is None else int(settings.seed))
        # An answer the longest call has no time for ends early ("length") instead of being aborted.
        job.max_new_tokens = request.max_new_tokens = min(
            job.max_new_tokens, self.gpu_time.new_tokens_within(job.prompt_tokens, job.tiles))
        return GpuReply(request, lambda: self._gpu_call(job), self._track)

    def close(self) -> None:
        """Refuse new requests and stop the running ones (each after its next token)."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for cancel in running:
            cancel.set()

    def _track(self, cancel: threading.Event, running: bool) -> None:
        with self._lock:
            (self._running.add if running else self._running.discard)(cancel)

    # --- inside the GPU call (on ZeroGPU: in the worker process) ---------------------------------

    def _run_on_gpu(self, job: GpuJob) -> Iterator[int | GpuFailure]:
        """Run `generate()` on `job` and yield its token ids as they come; closing this generator
        ends `generate()` before its next decode step."""
        feed, stop = _TokenFeed(), threading.Event()

        def run() -> None:
            try:
                device = self.model.get_input_embeddings().weight.device
                inputs = {name: tensor.to(device) for name, tensor in job.inputs.items()}
                self.model.generate(**inputs, max_new_tokens=job.max_new_tokens, eos_token_id=sorted(self.eos),
                                    seed=job.seed, streamer=feed, stop=stop, **dataclasses.asdict(job.sampling))
            except BaseException as error:  # noqa: BLE001 - handed to the reader, which reports it
                if not feed.finished:
                    feed.put_error(error)

        thread = threading.Thread(target=run, name="mllama-gpu-call", daemon=True)
        thread.start()
        try:
            while (item := feed.items.get()) is not _DONE:
                if isinstance(item, BaseException):
                    log.error("the answer failed on the GPU", exc_info=item)
                    yield GpuFailure.of(item)
                    return
                yield item
        finally:
            stop.set()  # closed early (Stop): generate() ends before its next step
            thread.join()


class GpuReply:
    """A reply whose tokens come from one GPU call: its text pieces, then its ReplyStats (as
    `serving.Reply`)."""

    def __init__(self, request: Request, start_call: Callable[[], Iterator[Any]],
                 track: Callable[[threading.Event, bool], None]) -> None:
        self._request = request
        self._start_call = start_call
        self._track = track
        self._items = self._stream()

    def __iter__(self) -> GpuReply:
        return self

    def __next__(self) -> str | ReplyStats:
        return next(self._items)

    @property
    def token_ids(self) -> list[int]:
        return list(self._request.tokens)

    @property
    def stats(self) -> ReplyStats | None:
        return self._request.stats

    def wait(self, timeout: float | None = None) -> ReplyStats | None:
        self._request.done.wait(timeout)
        return self._request.stats

    def close(self) -> None:
        self._request.cancel.set()
        try:
            self._items.close()
        except ValueError:  # being read in another thread right now: the cancel flag ends it
            return
        self._request.done.set()  # also when it was closed before its first read

    def _stream(self) -> Iterator[str | ReplyStats]:
        request = self._request
        self._track(request.cancel, True)
        try:
            if request.cancel.is_set():  # stopped before it started: ask for no GPU
                request.finish_reason = "cancelled"
            else:
                yield from self._tokens()
            request.streamer.end()
            yield from request.streamer  # the text held back for a character still incomplete
            yield self._finish()
        finally:
            request.cancel.set()  # no-op when finished; stops the work when the consumer left
            request.done.set()
            self._track(request.cancel, False)

    def _tokens(self) -> Iterator[str]:
        request = self._request
        calls = self._start_call()
        try:
            while not request.cancel.is_set():
                try:
                    item = next(calls)
                except StopIteration:
                    break
                except Exception as error:  # noqa: BLE001 - ZeroGPU's own failures (quota, time up)
                    raise EngineError(_zerogpu_message(error)) from None
                if isinstance(item, GpuFailure):
                    raise item.error
                request.first_token_at = request.first_token_at or time.perf_counter()
                request.tokens.append(item)
                request.streamer.put([item])
                yield from _ready_pieces(request.streamer)
        finally:
            calls.close()  # ZeroGPU's way to stop a call: waits for the call to end (one step)

    def _finish(self) -> ReplyStats:
        request = self._request
        tokens = request.tokens
        if request.finish_reason is None:
            if tokens and tokens[-1] in request.eos:
                request.finish_reason = "stop"
            elif len(tokens) >= request.max_new_tokens:
                request.finish_reason = "length"
            else:
                request.finish_reason = "cancelled"
        request.stats = request.finished_stats()
        return request.stats


def _ready_pieces(streamer) -> Iterator[str]:
    """The text pieces the streamer has ready, without waiting for more."""
    while True:
        try:
            yield streamer.text_queue.get_nowait()
        except queue.Empty:
            return


def _zerogpu_message(error: Exception) -> str:
    """ZeroGPU's message for a call it refused or ended (its errors are gr.Error, whose text is
    in `message`): the quota left and when to come back, no GPU free, the time asked for used up."""
    message = str(getattr(error, "message", "") or error)
    if "aborted" in message.lower():
        return (f"The GPU was taken back before the answer finished ({message}). Try again, or ask for "
                "fewer new tokens.")
    return message
