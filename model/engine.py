"""The one object the UI talks to: load a checkpoint once, stream chat replies to many users.

`ChatEngine.chat(messages, settings)` turns a conversation (transformers' chat format, images
inline) into a request for the `Scheduler`, which batches all users' decode steps together, and
yields the reply's text pieces, then its `ReplyStats`.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .hub import CHECKPOINT_FILES, resolve_checkpoint
from .image_processing import get_optimal_tiled_canvas
from .mllama import MllamaForConditionalGeneration
from .processing import MllamaProcessor
from .sampling import SamplingConfig
from .scheduler import EngineBusy, EngineError, ReplyStats, Request, Scheduler
from .streamer import TextIteratorStreamer

__all__ = [
    "ChatEngine",
    "EngineBusy",
    "EngineError",
    "EngineInfo",
    "GenerationSettings",
    "ImageInfo",
    "PromptTooLong",
    "ReplyStats",
]

log = logging.getLogger(__name__)

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-mllama")


class PromptTooLong(EngineError):
    """The conversation does not fit the context budget."""


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
    is_demo_model: bool
    tile_size: int
    max_tiles: int
    context_tokens: int
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    has_chat_template: bool = True


class ChatEngine:
    def __init__(self, model, processor, model_id: str, *, max_batch: int, queue_size: int, context_tokens: int,
                 generation_config: dict | None = None, compile: bool | None = None) -> None:
        """`compile`: decode with fixed shapes through torch.compile (and CUDA graphs on one GPU);
        None means MLLAMA_COMPILE=1 in the environment. Every batch bucket (1, 2, 4, ...,
        max_batch) is compiled here, before serving: loading then takes longer (minutes for the 11B)."""
        self.model = model
        self.processor = processor
        generation_config = generation_config or {}
        self.eos = _as_list(generation_config.get("eos_token_id", model.config.text_config.eos_token_id))
        limit = model.config.text_config.max_position_embeddings
        self.context_tokens = min(context_tokens, limit)
        if compile is None:
            compile = os.environ.get("MLLAMA_COMPILE") == "1"
        # With compile, every batch bucket is compiled before the first user arrives.
        warm_up_prompt = [model.config.text_config.bos_token_id or 0] * 8
        self.scheduler = Scheduler(model, max_batch=max_batch, capacity=self.context_tokens, queue_size=queue_size,
                                   compile=compile, warm_up_prompt=warm_up_prompt)
        image = processor.image_processor
        self.info = EngineInfo(
            model_id=model_id,
            is_demo_model=os.path.abspath(model_id) == os.path.abspath(DEMO_MODEL),
            tile_size=image.settings.tile_size,
            max_tiles=image.max_image_tiles,
            context_tokens=self.context_tokens,
            defaults=_defaults(generation_config),
            has_chat_template=bool(getattr(processor, "chat_template", None)),
        )

    @classmethod
    def load(cls, model: str = DEMO_MODEL, *, dtype: str | torch.dtype = "auto", device_map: Any = None,
             max_batch: int = 8, queue_size: int = 32, context_tokens: int = 4096,
             compile: bool | None = None) -> "ChatEngine":
        """Load a checkpoint folder or hub id (blocking; progress goes to the log)."""
        start = time.perf_counter()
        folder = resolve_checkpoint(model, allow_patterns=CHECKPOINT_FILES)
        log.info("loading %s", model)
        processor = MllamaProcessor.from_pretrained(folder)
        network = MllamaForConditionalGeneration.from_pretrained(folder, dtype=dtype, device_map=device_map)
        generation_config = _read_json(os.path.join(folder, "generation_config.json"))
        engine = cls(network, processor, model, max_batch=max_batch, queue_size=queue_size,
                     context_tokens=context_tokens, generation_config=generation_config, compile=compile)
        log.info("loaded %s in %.1f s", model, time.perf_counter() - start)
        return engine

    def describe_image(self, image) -> ImageInfo:
        """Size and tiling of a picture as the model will see it."""
        size = self.info.tile_size
        canvas_h, canvas_w = get_optimal_tiled_canvas(image.height, image.width, self.info.max_tiles, size)
        grid = (canvas_h // size, canvas_w // size)
        return ImageInfo(width=image.width, height=image.height, tiles=grid[0] * grid[1], grid=grid)

    def chat(self, messages: list[dict], settings: GenerationSettings | None = None,
             cancel: threading.Event | None = None, session_id: str | None = None) -> Iterator[str | ReplyStats]:
        """Stream one reply: text pieces, then one ReplyStats. Closing the generator or setting
        `cancel` stops the computation within one decode step."""
        settings = settings or self.info.defaults
        request = self._request(messages, settings, cancel or threading.Event(), session_id)
        self.scheduler.submit(request)
        try:
            yield from request.streamer
            yield request.stats
        finally:
            request.cancel.set()  # no-op when finished; stops the work when the consumer left

    def _request(self, messages, settings: GenerationSettings, cancel: threading.Event, session_id) -> Request:
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
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        inputs = {k: v for k, v in dict(inputs).items() if torch.is_tensor(v)}
        inputs.pop("attention_mask", None)  # a single prompt has no padding
        prompt_len = inputs["input_ids"].shape[1]
        room = self.context_tokens - prompt_len
        if room < 1:
            raise PromptTooLong(
                f"The conversation is {prompt_len} tokens long and this server keeps at most {self.context_tokens}. "
                "Undo a few turns or clear the chat."
            )
        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=self.scheduler.device).manual_seed(int(settings.seed))
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_special_tokens=True)
        return Request(
            inputs=inputs,
            sampling=sampling,
            max_new_tokens=min(settings.max_new_tokens, room),
            eos=self.eos,
            streamer=streamer,
            cancel=cancel,
            generator=generator,
            session_id=session_id,
        )

    def close(self) -> None:
        self.scheduler.close()


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
