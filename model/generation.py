"""generate(): prefill once, then decode one token per step from the cache.

Three plain pieces, like gpt-fast: `prefill` runs the prompt (and the pictures, once) and fills
the cache; `decode_step` feeds one token per row; `generate` loops, samples, streams and stops.
The serving engine decodes with the same `MllamaCache`, the same `decode_step` and the same
compiled wrapper (`step_function`); only its rows are independent conversations instead of rows
that move together. The vision tower and the cross-attention K/V projections run only in
prefill; decode steps read the cached K/V and the cross-attention mask of the last prompt token.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Protocol

import torch

from .cache import MllamaCache
from .compiled_step import accelerated, on_one_device
from .outputs import GenerateDecoderOnlyOutput
from .sampling import SamplingConfig, process_logits, select_next_tokens

log = logging.getLogger(__name__)

CAPACITY_BUCKET = 256
KEPT_DECODE_CACHES = 2  # compiled decoding keeps this many caches (and their CUDA graphs) for reuse
IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


class Streamer(Protocol):
    def put(self, value: torch.Tensor) -> None: ...
    def end(self) -> None: ...


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample positions that skip left padding (pads get a dummy 1, as transformers does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def eos_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


@torch.inference_mode()
def prefill(model, cache: MllamaCache, input_ids, attention_mask, position_ids, images: dict) -> torch.Tensor:
    """Run the prompt; returns the last position's logits (B, V)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        **images,
    )
    return out.logits[:, -1]


def decode_step(model, cache: MllamaCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One new token for each of the cache's rows [0, B): tokens (B,), rotary positions (B,) ->
    logits (B, V). Each row writes at its own length. With a static cache every step has the
    same shapes, so it can be compiled and captured in a CUDA graph."""
    out = model(
        input_ids=tokens[:, None],
        position_ids=positions[:, None],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


StepFunction = Callable[[Any, MllamaCache, torch.Tensor, torch.Tensor], torch.Tensor]


def step_function(model, compile: bool) -> StepFunction:
    """`decode_step`, or with `compile` its compiled form (replayed from CUDA graphs on a GPU),
    kept on the model so that every caller shares one compilation. Compiled steps need a static
    cache and the whole model on one device; elsewhere the plain step is returned."""
    if not compile or not on_one_device(model):
        return decode_step
    device = model.get_input_embeddings().weight.device
    steps = model.__dict__.setdefault("_compiled_decode_steps", {})
    if device.type not in steps:
        steps[device.type] = accelerated(decode_step, device)
    return steps[device.type]


def _stopped(stop: threading.Event | None, streamer: Streamer | None) -> bool:
    return (stop is not None and stop.is_set()) or bool(getattr(streamer, "cancelled", False))


class GenerationMixin:
    """`generate` for MllamaForConditionalGeneration and MllamaForCausalLM."""

    generation_config: dict | None = None  # the checkpoint's generation_config.json, set on load

    def _generation_defaults(self) -> dict:
        defaults = dict(self.generation_config or {})
        text_config = getattr(self.config, "text_config", self.config)
        defaults.setdefault("eos_token_id", text_config.eos_token_id)
        defaults.setdefault("pad_token_id", text_config.pad_token_id)
        return defaults

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self._text_model().embed_tokens

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Streamer | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        stop: threading.Event | None = None,
        compile: bool = False,
        return_dict_in_generate: bool = False,
        output_scores: bool = False,
        output_logits: bool = False,
        **image_inputs: torch.Tensor,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        """Prompt + new tokens, (B, L + n), like transformers. Rows that finished early are
        filled with `pad_token_id`. Unset options come from the checkpoint's
        generation_config.json, then transformers' defaults (20 tokens in all, greedy).

        `compile`: run decode steps through torch.compile, on a GPU replayed from a CUDA graph,
        when the whole model sits on one device. The first call of a shape compiles (seconds to
        minutes); its static cache and graph are kept for later calls of the same shapes.

        `return_dict_in_generate`: a GenerateDecoderOnlyOutput with `sequences` and, when asked,
        `scores` (the processed scores each token was chosen from) and `logits` (raw), one (B, V)
        tensor per new token, as transformers gives them.

        `stop`: a threading.Event; when set (or when the streamer's consumer calls
        `streamer.cancel()`), generation ends before the next decode step. An exception raised
        here reaches the streamer's consumer too.
        """
        unknown = sorted(set(image_inputs) - set(IMAGE_INPUTS))
        if unknown:
            raise TypeError(f"generate() got unexpected arguments {unknown}; inputs are input_ids, attention_mask and {list(IMAGE_INPUTS)}")
        images = {k: v for k, v in image_inputs.items() if v is not None}
        if images and not hasattr(self, "vision_model"):
            raise ValueError("this model has no vision tower: use MllamaForConditionalGeneration for images")

        defaults = self._generation_defaults()
        cfg = SamplingConfig.from_generation_config(
            defaults,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            min_new_tokens=min_new_tokens,
        )
        eos = eos_ids(eos_token_id if eos_token_id is not None else defaults.get("eos_token_id"))
        pad = pad_token_id if pad_token_id is not None else defaults.get("pad_token_id")
        pad = pad if pad is not None else (eos[0] if eos else 0)
        batch, prompt_len = input_ids.shape
        if max_new_tokens is None:
            max_new_tokens = defaults.get("max_new_tokens") or max(defaults.get("max_length", 20) - prompt_len, 0)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if streamer is not None and batch != 1:
            raise ValueError("a streamer streams one sequence: pass a batch of one prompt")

        device = self.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)

        total = prompt_len + max_new_tokens
        step_fn = step_function(self, compile)
        compiled = step_fn is not decode_step
        # A compiled step is specialised to the cache length: round it up so that prompts of
        # other lengths reuse the compiled code (and the cache with its CUDA graph).
        capacity = -(-total // CAPACITY_BUCKET) * CAPACITY_BUCKET if compiled else total
        ids = torch.full((batch, total), pad, dtype=torch.long, device=device)
        ids[:, :prompt_len] = input_ids
        mask = torch.ones(batch, total, dtype=torch.long, device=device)
        if attention_mask is not None:
            mask[:, :prompt_len] = attention_mask.to(device)
        padded = attention_mask is not None and not bool(attention_mask.all())
        positions = position_ids_from_mask(mask[:, :prompt_len])
        eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        if compiled:
            cache_key = (batch, capacity, tuple(images["pixel_values"].shape[1:3]) if "pixel_values" in images else None)
            cache = self._take_decode_cache(cache_key)
        else:
            cache = MllamaCache(len(self._text_model().layers), batch, capacity)
        scores_out: list[torch.Tensor] = []
        logits_out: list[torch.Tensor] = []

        if streamer is not None:
            streamer.put(input_ids.cpu())
        try:
            logits = prefill(self, cache, input_ids, mask[:, :prompt_len] if padded else None, positions, images)
            last_pos = positions[:, -1]
            length = prompt_len
            for step in range(max_new_tokens):
                scores = process_logits(
                    logits, ids[:, :length], cfg, new_tokens=step, eos_token_ids=eos,
                    attention_mask=mask[:, :length] if padded else None,
                )
                if output_scores:
                    scores_out.append(scores)
                if output_logits:
                    logits_out.append(logits.float().clone())  # a graph overwrites its output buffer
                tokens = select_next_tokens(scores, cfg, generator)
                tokens = torch.where(unfinished, tokens, pad)
                ids[:, length] = tokens
                length += 1
                if streamer is not None:
                    streamer.put(tokens.cpu())
                if eos:
                    unfinished &= ~torch.isin(tokens, eos_tensor)
                if not bool(unfinished.any()) or step + 1 == max_new_tokens or _stopped(stop, streamer):
                    break
                last_pos = last_pos + 1
                logits = step_fn(self, cache, tokens, last_pos)
        except BaseException as error:
            if streamer is not None and hasattr(streamer, "put_error"):
                streamer.put_error(error)  # the consumer raises it instead of waiting forever
                streamer = None
            raise
        finally:
            if streamer is not None:
                streamer.end()
            if compiled:
                self._return_decode_cache(cache_key, cache)
        if not return_dict_in_generate:
            return ids[:, :length]
        return GenerateDecoderOnlyOutput(
            sequences=ids[:, :length],
            scores=tuple(scores_out) if output_scores else None,
            logits=tuple(logits_out) if output_logits else None,
            past_key_values=None if compiled else cache,
        )

    def _take_decode_cache(self, key: tuple) -> MllamaCache:
        """A kept static cache of these shapes (with its CUDA graph), or a new one. A cache is taken
        out of the pool while a generation uses it, so concurrent calls never share one."""
        pool = self.__dict__.setdefault("_decode_caches", OrderedDict())
        lock = self.__dict__.setdefault("_decode_caches_lock", threading.Lock())
        with lock:
            cache = pool.pop(key, None)
        if cache is None:
            return MllamaCache(len(self._text_model().layers), key[0], key[1], static=True)
        cache.reset()
        return cache

    def _return_decode_cache(self, key: tuple, cache: MllamaCache) -> None:
        with self._decode_caches_lock:
            self._decode_caches[key] = cache
            while len(self._decode_caches) > KEPT_DECODE_CACHES:
                self._decode_caches.popitem(last=False)

    def _text_model(self) -> torch.nn.Module:
        return self.language_model.model if hasattr(self, "vision_model") else self.model
