"""The one object the app talks to: load a checkpoint once, stream chat replies to many users.

`ChatEngine.chat(messages, settings)` turns a conversation (transformers' chat format, pictures
inline) into a request for the `Scheduler`, which batches all users' decode steps together, and
returns a `Reply`: the reply's text pieces, then its `ReplyStats`.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from model.hub import CHECKPOINT_FILES, resolve_checkpoint
from model.image_processing import get_optimal_tiled_canvas
from model.mllama import MllamaForConditionalGeneration
from model.processing import MllamaProcessor
from model.sampling import SamplingConfig
from model.streamer import TextIteratorStreamer

from .errors import EngineError, PromptTooLong
from .policy import ReplyStats, Request
from .prefix_store import image_key
from .prompt import PromptEncoder, message_texts
from .runner import ModelRunner
from .scheduler import Scheduler

log = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
# A token of ordinary text is 3-5 characters; runs of one character can pack 16 or more. A
# conversation above this many characters per context token cannot fit, and is refused before
# tokenizing it.
CHARACTERS_PER_TOKEN = 16


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = 0.6  # 0 means greedy
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            do_sample=self.temperature > 0,
            temperature=float(self.temperature),
            top_k=int(self.top_k),
            top_p=float(self.top_p),
            repetition_penalty=float(self.repetition_penalty),
        )


@dataclass
class ImageInfo:
    width: int
    height: int
    tiles: int
    grid: tuple[int, int]  # (rows, cols) of tiles


@dataclass
class EngineInfo:
    model_id: str
    tile_size: int
    max_tiles: int
    context_tokens: int
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    has_chat_template: bool = True
    quantization: str | None = None  # "int8" / "int4" weights in the text decoder


def describe_tiling(image, tile_size: int, max_tiles: int) -> ImageInfo:
    """Size and tiling of a picture as Mllama's processor cuts it."""
    canvas_h, canvas_w = get_optimal_tiled_canvas(image.height, image.width, max_tiles, tile_size)
    grid = (canvas_h // tile_size, canvas_w // tile_size)
    width, height = image.info.get("original_size", image.size)  # a picture shrunk on loading
    return ImageInfo(width=width, height=height, tiles=grid[0] * grid[1], grid=grid)


class Engine(Protocol):
    """What the app needs from an engine: `ChatEngine` here, or any other implementation of the
    same calls (one that forwards to a remote server, say)."""

    info: EngineInfo

    def describe_image(self, image) -> ImageInfo: ...

    def chat(self, messages: list[dict], settings: GenerationSettings | None = None,
             cancel: threading.Event | None = None, session_id: str | None = None) -> Iterator[str | ReplyStats]: ...

    def close(self) -> None: ...


class Reply:
    """A reply being generated: iterate for its text pieces and then its ReplyStats. `close()`
    (what Gradio does when the user presses Stop or leaves) stops the computation within one
    decode step; `stats` is set once the request has finished, `finished` tells when."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._items = self._stream()

    def _stream(self) -> Iterator[str | ReplyStats]:
        try:
            yield from self._request.streamer
            yield self._request.stats
        finally:
            self._request.cancel.set()  # no-op when finished; stops the work when the consumer left

    def __iter__(self) -> "Reply":
        return self

    def __next__(self) -> str | ReplyStats:
        return next(self._items)

    def close(self) -> None:
        self._request.cancel.set()
        try:
            self._items.close()
        except ValueError:  # being read in another thread right now: the cancel flag ends it
            pass

    def wait(self, timeout: float | None = None) -> ReplyStats | None:
        """The figures of the finished reply (None if it has not finished within `timeout`)."""
        self._request.done.wait(timeout)
        return self._request.stats

    @property
    def token_ids(self) -> list[int]:
        """The reply's tokens so far (the stop token included, once sampled)."""
        return list(self._request.tokens)


class RequestReader:
    """A conversation and its settings checked and encoded, on the caller's thread: what a local
    engine refuses (with the message that says what to do) and the Request it serves otherwise."""

    def __init__(self, processor: MllamaProcessor, eos: frozenset[int], context_tokens: int) -> None:
        self.processor = processor
        self.eos = eos
        self.context_tokens = context_tokens
        self.prompts = PromptEncoder(processor)

    def read(self, messages: list[dict], settings: GenerationSettings, cancel: threading.Event,
             session_id: str | None, device: torch.device | None) -> Request:
        """The request for `messages`, or an EngineError that says what to change. `device`: where
        a seeded request's random generator lives (None: the caller seeds where it samples)."""
        images = sum(
            1 for m in messages if isinstance(m.get("content"), list)
            for part in m["content"] if isinstance(part, dict) and part.get("type") == "image"
        )
        if images > 1:
            raise EngineError("Llama 3.2 Vision looks at one picture at a time: send at most one image per conversation.")
        try:
            sampling = settings.sampling()
        except ValueError as error:
            raise EngineError(str(error)) from None
        if settings.max_new_tokens < 1:
            raise EngineError("max_new_tokens must be at least 1")
        if settings.seed is not None and not 0 <= int(settings.seed) <= MAX_SEED:
            raise EngineError(f"The seed must be a whole number from 0 to {MAX_SEED}, or empty for a random one; "
                              f"got {settings.seed}.")
        self._check_texts(messages)
        inputs = self.prompts.encode(messages)
        prompt_ids = inputs["input_ids"][0].tolist()
        room = self.context_tokens - len(prompt_ids)
        if room < 1:
            raise PromptTooLong(_too_long(_user_turns(messages) == 1, f"{len(prompt_ids):,} tokens",
                                          f"{self.context_tokens:,}"))
        generator = None
        if settings.seed is not None and device is not None:
            generator = torch.Generator(device=device).manual_seed(int(settings.seed))
        return Request(
            prompt_ids=prompt_ids,
            max_new_tokens=min(settings.max_new_tokens, room),
            eos=self.eos,
            streamer=TextIteratorStreamer(self.processor.tokenizer, skip_special_tokens=True),
            inputs=inputs,
            sampling=sampling,
            generator=generator,
            cancel=cancel,
            session_id=session_id,
            image_key=image_key(inputs),  # hashed here, in the caller's thread, not in the serving loop
        )

    def _check_texts(self, messages: list[dict]) -> None:
        """Refuse what cannot be tokenized, before tokenizing: text that is not valid Unicode, and
        more characters than the context could hold (tokenizing megabytes costs gigabytes)."""
        texts = [text for _, text in message_texts(messages)]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise EngineError(f"The message has a character that is not valid Unicode (an unpaired surrogate, "
                                  f"U+{ord(text[error.start]):04X}, at character {error.start + 1}). Remove it "
                                  "and send the message again.") from None
        limit = self.context_tokens * CHARACTERS_PER_TOKEN
        length = sum(map(len, texts))
        if length > limit:
            alone = len(texts[-1]) > limit
            raise PromptTooLong(_too_long(alone, f"{len(texts[-1]) if alone else length:,} characters",
                                          f"{limit:,} ({self.context_tokens:,} tokens)"))


def _user_turns(messages: list[dict]) -> int:
    return sum(m.get("role") == "user" for m in messages)


def _too_long(message_alone: bool, size: str, most: str) -> str:
    """Why a prompt does not fit, in the terms of what the user can change: their message, or a
    conversation that has grown (whose remedy is to start again: Undo removes only the newest turn)."""
    if message_alone:
        return f"Your message is {size} long and this server takes at most {most}. Shorten it and send it again."
    return (f"The conversation is {size} long and this server takes at most {most}. Clear the chat to start a new "
            "one, or send a shorter message.")


class ChatEngine:
    def __init__(self, model, processor, model_id: str, *, max_batch: int, queue_size: int, context_tokens: int,
                 generation_config: dict | None = None, compile: bool = False) -> None:
        """`compile`: decode with fixed shapes through torch.compile (and CUDA graphs on one GPU).
        Every batch bucket (1, 2, 4, ..., max_batch) is compiled here, before serving: loading
        then takes longer (minutes for the 11B)."""
        self.model = model
        self.processor = processor
        generation_config = generation_config or {}
        self.eos = stop_tokens(model, generation_config)
        self.context_tokens = min(context_tokens, model.config.text_config.max_position_embeddings)
        self.requests = RequestReader(processor, self.eos, self.context_tokens)
        self.prompts = self.requests.prompts
        self.runner = ModelRunner(model, max_batch, self.context_tokens, compile=compile)
        if self.runner.static:
            started = time.perf_counter()
            self.runner.warm_up()
            log.info("decode steps for %s request(s) at once compiled in %.1f s", self.runner.buckets(),
                     time.perf_counter() - started)
        self.scheduler = Scheduler(self.runner, max_batch, queue_size)
        self.info = local_engine_info(model, processor, model_id, self.context_tokens, generation_config)

    @classmethod
    def load(cls, model: str, *, dtype: str | torch.dtype = "auto", device_map: Any = None,
             max_batch: int = 8, queue_size: int = 32, context_tokens: int = 4096,
             compile: bool = False, quantization: str | None = None) -> "ChatEngine":
        """Load a checkpoint folder or hub id (blocking; progress goes to the log). `quantization`:
        None, "int8" or "int4" (see MllamaPreTrainedModel.from_pretrained)."""
        start = time.perf_counter()
        network, processor, generation_config = load_checkpoint(model, dtype=dtype, device_map=device_map,
                                                                quantization=quantization)
        engine = cls(network, processor, model, max_batch=max_batch, queue_size=queue_size,
                     context_tokens=context_tokens, generation_config=generation_config, compile=compile)
        log.info("loaded %s in %.1f s", model, time.perf_counter() - start)
        return engine

    def describe_image(self, image) -> ImageInfo:
        """Size and tiling of a picture as the model will see it."""
        return describe_tiling(image, self.info.tile_size, self.info.max_tiles)

    def chat(self, messages: list[dict], settings: GenerationSettings | None = None,
             cancel: threading.Event | None = None, session_id: str | None = None) -> Reply:
        """Stream one reply. Closing it or setting `cancel` stops the computation within one
        decode step. `session_id` lets the next turn of the same conversation reuse this one's
        K/V (the picture's and the unchanged start of the conversation)."""
        request = self.requests.read(messages, settings or self.info.defaults, cancel or threading.Event(),
                                     session_id, device=self.runner.device)
        self.scheduler.submit(request)
        return Reply(request)

    def close(self) -> None:
        self.scheduler.close()


def load_checkpoint(model: str, *, dtype: str | torch.dtype = "auto", device_map: Any = None,
                    quantization: str | None = None) -> tuple[MllamaForConditionalGeneration, MllamaProcessor, dict]:
    """The network, the processor and the generation_config.json of a checkpoint folder or hub id."""
    folder = resolve_checkpoint(model, allow_patterns=CHECKPOINT_FILES)
    log.info("loading %s", model)
    processor = MllamaProcessor.from_pretrained(folder)
    network = MllamaForConditionalGeneration.from_pretrained(folder, dtype=dtype, device_map=device_map,
                                                             quantization=quantization)
    return network, processor, _read_json(os.path.join(folder, "generation_config.json"))


def stop_tokens(model, generation_config: dict) -> frozenset[int]:
    """The tokens that end an answer: the checkpoint's generation config's, else the model config's."""
    return frozenset(_as_list(generation_config.get("eos_token_id", model.config.text_config.eos_token_id)))


def local_engine_info(model, processor: MllamaProcessor, model_id: str, context_tokens: int,
                      generation_config: dict) -> EngineInfo:
    """What the app shows and defaults to for a model served here."""
    image = processor.image_processor
    return EngineInfo(
        model_id=model_id,
        tile_size=image.settings.tile_size,
        max_tiles=image.max_image_tiles,
        context_tokens=context_tokens,
        defaults=_defaults(generation_config),
        has_chat_template=bool(getattr(processor, "chat_template", None)),
        quantization=getattr(model, "quantization", None),
    )


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _defaults(generation_config: dict) -> GenerationSettings:
    sample = generation_config.get("do_sample", False)
    return GenerationSettings(
        temperature=float(generation_config.get("temperature", 0.6)) if sample else 0.0,
        top_p=float(generation_config.get("top_p", 0.9)) if sample else 1.0,
        top_k=int(generation_config.get("top_k", 0) or 0) if sample else 0,
        repetition_penalty=float(generation_config.get("repetition_penalty", 1.0)),
    )
