"""Continuous batching: one thread owns the model and serves every request.

Requests wait in a bounded queue. Between decode steps the scheduler prefills newcomers (one at a
time, batch of one) into free slots of a `SlotCache`; every step then decodes one token for all
active slots at once. A request leaves as soon as it hits a stop token, its token budget, or its
cancel event, and its slot is free for the next one. Sampling settings, seeds, stop tokens and
streamers are per request.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .cache import MllamaCache, SlotCache
from .compiled_step import accelerated, on_one_device
from .sampling import SamplingConfig, process_logits, select_next_tokens

log = logging.getLogger(__name__)


class EngineError(Exception):
    """A request could not be served; the message says what to do."""


class EngineBusy(EngineError):
    """The wait queue is full."""


@dataclass
class ReplyStats:
    time_to_first_token_s: float
    tokens: int
    tokens_per_s: float
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int


@dataclass
class Request:
    """One reply to produce. `inputs` is the processor's output for a batch of one."""

    inputs: dict
    sampling: SamplingConfig
    max_new_tokens: int
    eos: list[int]
    streamer: object  # TextIteratorStreamer
    cancel: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    session_id: str | None = None
    # filled while serving
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    history: torch.Tensor | None = None  # prompt + generated ids (1, capacity) for the penalty
    conversation: Conversation | None = None  # what this turn leaves for the next one
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    stats: ReplyStats | None = None

    @property
    def prompt_len(self) -> int:
        return self.inputs["input_ids"].shape[1]


@dataclass
class Conversation:
    """What a finished turn leaves for the next one: the picture's cross-attention K/V and the
    self-attention K/V of every token the model has read (prompt + reply)."""

    image_key: str | None
    cross_keys: dict = field(default_factory=dict)
    cross_values: dict = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    self_kv: list = field(default_factory=list)  # per layer (keys, values) (1, H, n, D), or None

    def reusable_prefix(self, token_ids: list[int], image_key: str | None) -> int:
        """Tokens at the start of `token_ids` whose K/V are stored (0 if the picture changed)."""
        if image_key != self.image_key or not self.self_kv:
            return 0
        n = 0
        for a, b in zip(self.token_ids, token_ids):
            if a != b:
                break
            n += 1
        return min(n, len(token_ids) - 1)  # the last prompt token is always run: it gives the logits


class ConversationStore:
    """Recent conversations by session id (LRU), bounded by a number of stored tokens."""

    def __init__(self, max_sessions: int, max_tokens: int) -> None:
        self.max_sessions, self.max_tokens = max_sessions, max_tokens
        self._items: OrderedDict[str, Conversation] = OrderedDict()

    def get(self, session_id: str | None) -> Conversation | None:
        if not session_id or session_id not in self._items:
            return None
        self._items.move_to_end(session_id)
        return self._items[session_id]

    def put(self, session_id: str | None, conversation: Conversation) -> None:
        if not session_id or self.max_sessions <= 0:
            return
        self._items[session_id] = conversation
        self._items.move_to_end(session_id)
        while len(self._items) > self.max_sessions or (
            len(self._items) > 1 and sum(len(c.token_ids) for c in self._items.values()) > self.max_tokens
        ):
            self._items.popitem(last=False)


def image_key(inputs: dict) -> str | None:
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return None
    digest = hashlib.sha1(pixels.detach().cpu().contiguous().numpy().tobytes())
    digest.update(inputs["aspect_ratio_ids"].cpu().numpy().tobytes())
    return digest.hexdigest()


def batched_decode_step(model, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token for each slot of the step: tokens (n,), positions (n, 1) -> logits (n, V)."""
    out = model(input_ids=tokens[:, None], position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]




class _Discard:
    """The streamer of a warm-up request."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def put(self, value) -> None:
        pass

    def end(self) -> None:
        pass

    def put_error(self, error: Exception) -> None:
        self.error = error


class Scheduler:
    def __init__(self, model, max_batch: int, capacity: int, queue_size: int, sessions: int = 16,
                 compile: bool = False, warm_up_prompt: list[int] | None = None) -> None:
        """`warm_up_prompt`: with `compile`, token ids to run once in every bucket of slots before
        serving, so that compiling (and capturing CUDA graphs) never stalls a user."""
        self.model = model
        self.capacity = capacity
        self.device = model.language_model.model.embed_tokens.weight.device
        # compile: fixed shapes, one compilation per bucket of slots; on a GPU also CUDA graphs.
        compile = compile and on_one_device(model)
        self.cache = SlotCache(model, max_batch, capacity, static=compile)
        self._step = accelerated(batched_decode_step, self.device) if compile else batched_decode_step
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
        self.conversations = ConversationStore(sessions, max_tokens=sessions * capacity // 4)
        self.vision_runs = 0
        self.reused_tokens = 0
        self._closed = threading.Event()
        if compile and warm_up_prompt:
            self._warm_up(warm_up_prompt)
        self._thread = threading.Thread(target=self._serve, name="mllama-scheduler", daemon=True)
        self._thread.start()

    # --- public -------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        if self._closed.is_set():
            raise EngineError("the engine has been shut down")
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise EngineBusy(
                f"The server is busy: {self.waiting.maxsize} requests are already waiting. Try again in a moment."
            ) from None

    def close(self) -> None:
        """Stop serving; requests still running or waiting end with an error."""
        self._closed.set()
        self._thread.join(timeout=10)
        gone = EngineError("the engine was shut down before this request finished")
        self._fail_all(gone)
        while True:
            try:
                self.waiting.get_nowait().streamer.put_error(gone)
            except queue.Empty:
                return

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    # --- the serving loop ------------------------------------------------------------------------

    @torch.inference_mode()
    def _warm_up(self, prompt: list[int]) -> None:
        """Fill slots [0, n) for every bucket size n and decode two steps (before the serving thread starts)."""
        for n in self.cache.buckets():
            started = time.perf_counter()
            requests = [Request(inputs={"input_ids": torch.tensor([prompt])}, sampling=SamplingConfig(),
                                max_new_tokens=3, eos=[], streamer=_Discard()) for _ in range(n)]
            for request in requests:
                self._start(request)
            while self.active:
                self._decode_step()
            error = next((r.streamer.error for r in requests if r.streamer.error is not None), None)
            if error is not None:
                raise EngineError(f"warming up the decoder for {n} requests at once failed: {error}") from error
            log.info("decoding %d request(s) at once is ready (%.1f s)", n, time.perf_counter() - started)

    @torch.inference_mode()
    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                self._admit()
                if self.active == 0:
                    self._wait_for_work()
                    continue
                self._decode_step()
            except Exception as error:  # never let the serving thread die silently
                log.exception("scheduler step failed")
                self._fail_all(error)

    def _wait_for_work(self) -> None:
        try:
            request = self.waiting.get(timeout=0.1)
        except queue.Empty:
            return
        self._start(request)

    def _admit(self) -> None:
        while None in self.slots:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            self._start(request)

    def _start(self, request: Request) -> None:
        if request.cancel.is_set():
            self._finish(request, "cancelled")
            return
        try:
            logits = self._prefill(request)
        except Exception as error:
            _recover_memory(error)
            request.streamer.put_error(_explain(error))
            return
        slot = self.slots.index(None)
        request.slot = slot
        self.slots[slot] = request
        self._accept(request, self._sample(request, logits))

    def _prefill(self, request: Request) -> torch.Tensor:
        """Run the prompt (batch of one), reusing what the conversation's last turn computed:
        the picture's cross K/V when it is the same picture, and the self-attention K/V of the
        unchanged start of the prompt."""
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in request.inputs.items()}
        prompt_ids = inputs["input_ids"][0].tolist()
        cache = MllamaCache(len(self.cache.layers), capacity=request.prompt_len)
        key = image_key(inputs)
        previous = self.conversations.get(request.session_id)
        if previous is not None and key is not None and previous.image_key == key:
            cache.cross_keys, cache.cross_values = dict(previous.cross_keys), dict(previous.cross_values)
            for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
                inputs.pop(name)
        elif key is not None:
            self.vision_runs += 1
        prefix = previous.reusable_prefix(prompt_ids, key) if previous is not None else 0
        if prefix:
            cache.preload(previous.self_kv, prefix)
            inputs["input_ids"] = inputs["input_ids"][:, prefix:]
            self.reused_tokens += prefix
        out = self.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        request.conversation = Conversation(key, cache.cross_keys, cache.cross_values)
        request.history = torch.zeros(1, self.capacity, dtype=torch.long, device=self.device)
        request.history[0, : request.prompt_len] = torch.tensor(prompt_ids, device=self.device)
        request._prefill_cache = cache  # loaded into a slot once one is assigned
        return out.logits[:, -1]

    def _sample(self, request: Request, logits: torch.Tensor) -> torch.Tensor:
        length = request.prompt_len + len(request.tokens)
        scores = process_logits(
            logits, request.history[:, :length], request.sampling, new_tokens=len(request.tokens), eos_token_ids=request.eos
        )
        return select_next_tokens(scores, request.sampling, request.generator)

    def _accept(self, request: Request, token: torch.Tensor) -> None:
        """Record a sampled token (host int); finish or keep the request in its slot."""
        value = int(token.reshape(-1)[0])
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
            prefill_cache = request.__dict__.pop("_prefill_cache")
            self.cache.load(request.slot, prefill_cache, request.prompt_len, self.model.config.vision_config.num_patches)
        position = request.prompt_len + len(request.tokens)
        request.history[0, position] = value
        request.tokens.append(value)
        request.streamer.put([value])
        if value in request.eos:
            self._finish(request, "stop")
        elif len(request.tokens) >= request.max_new_tokens:
            self._finish(request, "length")
        elif request.cancel.is_set():
            self._finish(request, "cancelled")

    def _decode_step(self) -> None:
        for request in self.slots:
            if request is not None and request.cancel.is_set():
                self._finish(request, "cancelled")
        if self.active == 0:
            return
        positions = self.cache.begin_step(self.device)
        tokens = torch.zeros(positions.shape[0], dtype=torch.long)
        for request in self.slots:
            if request is not None:
                tokens[request.slot] = request.tokens[-1]
        try:
            logits = self._step(self.model, self.cache, tokens.to(self.device), positions)
        except Exception as error:
            _recover_memory(error)
            self._fail_all(_explain(error))
            return
        self.cache.end_step()
        picked = [(r, self._sample(r, logits[r.slot : r.slot + 1])) for r in self.slots if r is not None]
        chosen = torch.cat([t.reshape(1) for _, t in picked]).cpu()  # the step's one host sync
        for (request, _), token in zip(picked, chosen):
            self._accept(request, token)

    def _finish(self, request: Request, reason: str) -> None:
        now = time.perf_counter()
        first = request.first_token_at or now
        decode_time = now - first
        n = len(request.tokens)
        request.stats = ReplyStats(
            time_to_first_token_s=first - request.submitted,
            tokens=n,
            tokens_per_s=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            finish_reason=reason,
            prompt_tokens=request.prompt_len,
        )
        if request.slot >= 0 and self.slots[request.slot] is request:
            self._remember(request)
            self.slots[request.slot] = None
            self.cache.free(request.slot)
        request.__dict__.pop("_prefill_cache", None)
        request.streamer.end()

    def _remember(self, request: Request) -> None:
        """Keep the K/V of the tokens the model has read (all but the last reply token)."""
        if not request.session_id or request.conversation is None:
            return
        read = request.prompt_len + len(request.tokens) - 1
        conversation = request.conversation
        conversation.token_ids = request.history[0, :read].tolist()
        conversation.self_kv = self.cache.export(request.slot, read)
        self.conversations.put(request.session_id, conversation)

    def _fail_all(self, error: Exception) -> None:
        for request in self.slots:
            if request is not None:
                self.slots[request.slot] = None
                self.cache.free(request.slot)
                request.streamer.put_error(error if isinstance(error, EngineError) else EngineError(str(error)))


def _is_oom(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _recover_memory(error: Exception) -> None:
    if _is_oom(error) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _explain(error: Exception) -> Exception:
    if _is_oom(error):
        return EngineError(
            "The device ran out of memory for this request. The server recovered; try a shorter "
            "conversation, a smaller picture or fewer new tokens."
        )
    return error
