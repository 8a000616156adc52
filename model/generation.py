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

from .beam_search import BeamSearch, SearchConfig
from .cache import MllamaCache
from .compiled_step import accelerated, on_one_device
from .outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from .sampling import SamplingConfig, process_logits, select_next_tokens

log = logging.getLogger(__name__)

CAPACITY_BUCKET = 256
KEPT_DECODE_CACHES = 2  # compiled decoding keeps this many caches (and their CUDA graphs) for reuse
IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
UNSET: Any = object()  # an argument not passed (passing None means "none", as in transformers)


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


def forward_without_cache(model, ids: torch.Tensor, mask: torch.Tensor, padded: bool, images: dict) -> torch.Tensor:
    """A step of `use_cache=False`: the whole sequence so far (rows, length), pictures included,
    through the model again; returns the last position's logits (rows, V)."""
    length = ids.shape[1]
    images = {k: v[:, :length] if k == "cross_attention_mask" else v for k, v in images.items()}
    out = model(
        input_ids=ids,
        attention_mask=mask if padded else None,
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
        logits_to_keep=1,
        **images,
    )
    return out.logits[:, -1]


def expand_images(images: dict, copies: int, total: int) -> dict:
    """Image inputs for rows that repeat each prompt `copies` times, with a cross-attention mask
    over `total` tokens: new tokens see what the last prompt token saw (as transformers extends it)."""
    rows = {k: v.repeat_interleave(copies, dim=0) for k, v in images.items()}
    cross = rows.get("cross_attention_mask")
    if cross is not None:
        rows["cross_attention_mask"] = torch.cat(
            [cross, cross[:, -1:].expand(-1, total - cross.shape[1], -1, -1)], dim=1)
    return rows


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
        num_beams: int | None = None,
        num_return_sequences: int | None = None,
        length_penalty: float | None = None,
        early_stopping: bool | str | None = None,
        eos_token_id: int | list[int] | None = UNSET,
        pad_token_id: int | None = None,
        use_cache: bool | None = None,
        streamer: Streamer | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        stop: threading.Event | None = None,
        compile: bool = False,
        return_dict_in_generate: bool = False,
        output_scores: bool = False,
        output_logits: bool = False,
        **image_inputs: torch.Tensor,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """Prompt + new tokens, (B * num_return_sequences, L + n), like transformers. Rows that
        finished early are filled with `pad_token_id`. Unset options come from the checkpoint's
        generation_config.json, then transformers' defaults (20 tokens in all, greedy);
        `eos_token_id=None` means no end token, as in transformers.

        `num_beams` > 1: beam search as transformers 5.x does it (with `do_sample`, beam
        sampling), scored with `length_penalty` and stopped by `early_stopping` (True, False or
        "never"); the best `num_return_sequences` <= num_beams hypotheses of each prompt are
        returned, best first. Without beams, `num_return_sequences` > 1 needs `do_sample`: each
        prompt is sampled that many times.

        `use_cache=False` recomputes the whole sequence at every step (same tokens, slower).

        `compile`: run decode steps through torch.compile, on a GPU replayed from a CUDA graph,
        when the whole model sits on one device. The first call of a shape compiles (seconds to
        minutes); its static cache and graph are kept for later calls of the same shapes.

        `return_dict_in_generate`: a GenerateDecoderOnlyOutput (GenerateBeamDecoderOnlyOutput
        with beams) with `sequences`, `cache` and, when asked, `scores` (the processed scores each
        token was chosen from; with beams the processed log-probabilities) and `logits` (raw), one
        (rows, V) tensor per step, as transformers gives them; with beams also `beam_indices` and,
        with `output_scores`, `sequences_scores`.

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
        search = SearchConfig.from_generation_config(
            defaults,
            do_sample=cfg.do_sample,
            num_beams=num_beams,
            num_return_sequences=num_return_sequences,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
        use_cache = defaults.get("use_cache", True) if use_cache is None else use_cache
        if not isinstance(use_cache, bool):
            raise ValueError(f"use_cache={use_cache!r}: must be true or false")
        eos = eos_ids(defaults.get("eos_token_id") if eos_token_id is UNSET else eos_token_id)
        pad = pad_token_id if pad_token_id is not None else defaults.get("pad_token_id")
        pad = pad if pad is not None else (eos[0] if eos else 0)
        batch, prompt_len = input_ids.shape
        if max_new_tokens is None:
            max_new_tokens = defaults.get("max_new_tokens") or max(defaults.get("max_length", 20) - prompt_len, 0)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if streamer is not None and search.num_beams > 1:
            raise ValueError("a streamer cannot follow beam search (the best beam is known only at the end): "
                             "pass num_beams=1 or no streamer")
        if streamer is not None and batch * search.expand != 1:
            raise ValueError("a streamer streams one sequence: pass a batch of one prompt and num_return_sequences=1")

        device = self.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)

        # Each prompt becomes `expand` rows (its beams or its samples), next to each other.
        rows = batch * search.expand
        total = prompt_len + max_new_tokens
        step_fn = step_function(self, compile and use_cache)
        compiled = step_fn is not decode_step
        # A compiled step is specialised to the cache length: round it up so that prompts of
        # other lengths reuse the compiled code (and the cache with its CUDA graph).
        capacity = -(-total // CAPACITY_BUCKET) * CAPACITY_BUCKET if compiled else total
        prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        padded = not bool(prompt_mask.all())
        prompt_positions = position_ids_from_mask(prompt_mask)
        ids = torch.full((rows, total), pad, dtype=torch.long, device=device)
        ids[:, :prompt_len] = input_ids.repeat_interleave(search.expand, dim=0)
        mask = torch.ones(rows, total, dtype=torch.long, device=device)
        mask[:, :prompt_len] = prompt_mask.repeat_interleave(search.expand, dim=0)
        eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
        unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        beams = None
        if search.num_beams > 1:
            beams = BeamSearch(ids[:, :prompt_len], num_beams=search.num_beams, max_length=total, eos_token_ids=eos,
                               pad_token_id=pad, length_penalty=search.length_penalty, early_stopping=search.early_stopping,
                               do_sample=cfg.do_sample, generator=generator)
            ids = beams.ids
        cache = None
        if not use_cache:
            row_images = expand_images(images, search.expand, total)
        elif compiled:
            cache_key = (rows, capacity, tuple(images["pixel_values"].shape[1:3]) if "pixel_values" in images else None)
            cache = self._take_decode_cache(cache_key)
        else:
            cache = MllamaCache(len(self._text_model().layers), rows, capacity)
        scores_out: list[torch.Tensor] = []
        logits_out: list[torch.Tensor] = []

        if streamer is not None:
            streamer.put(input_ids.cpu())
        try:
            if cache is None:
                logits = forward_without_cache(self, ids[:, :prompt_len], mask[:, :prompt_len], padded, row_images)
            else:
                logits = prefill(self, cache, input_ids, prompt_mask if padded else None, prompt_positions, images)
                if search.expand > 1:  # each prompt ran once; its rows are copied into its beams or samples
                    copies = torch.arange(batch, device=device).repeat_interleave(search.expand)
                    cache.reorder_rows(copies)
                    logits = logits.index_select(0, copies)
            last_pos = prompt_positions[:, -1].repeat_interleave(search.expand)
            length = prompt_len
            for step in range(max_new_tokens):
                last = step + 1 == max_new_tokens or _stopped(stop, streamer)
                if output_logits:
                    logits_out.append(logits.float().clone())  # a graph overwrites its output buffer
                scores = process_logits(
                    torch.log_softmax(logits.float(), dim=-1) if beams else logits,
                    ids[:, :length], cfg, new_tokens=step, eos_token_ids=eos,
                    attention_mask=mask[:, :length] if padded else None,
                    min_tokens_to_keep=max(2, len(eos) + 1) if beams else 1,
                )
                if output_scores:
                    scores_out.append(scores.clone())  # without processing, the scores are the logits buffer
                if beams:
                    tokens, source = beams.step(scores, length, last)
                    ids = beams.ids
                    last_pos = last_pos.index_select(0, source)
                    done = beams.done
                    if cache is not None:
                        cache.reorder_rows(source, pictures=False)  # the beams of a prompt share its picture
                else:
                    tokens = select_next_tokens(scores, cfg, generator)
                    tokens = torch.where(unfinished, tokens, pad)
                    ids[:, length] = tokens
                    if streamer is not None:
                        streamer.put(tokens.cpu())
                    if eos:
                        unfinished &= ~torch.isin(tokens, eos_tensor)
                    done = not bool(unfinished.any())
                length += 1
                if done or last:
                    break
                last_pos = last_pos + 1
                if cache is None:
                    logits = forward_without_cache(self, ids[:, :length], mask[:, :length], padded, row_images)
                else:
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
        returned_cache = None if compiled else cache
        if beams:
            sequences, sequence_scores, beam_indices = beams.result(search.num_return_sequences)
            if not return_dict_in_generate:
                return sequences
            return GenerateBeamDecoderOnlyOutput(
                sequences=sequences,
                sequences_scores=sequence_scores if output_scores else None,
                scores=tuple(scores_out) if output_scores else None,
                logits=tuple(logits_out) if output_logits else None,
                beam_indices=beam_indices,
                cache=returned_cache,
            )
        if not return_dict_in_generate:
            return ids[:, :length]
        return GenerateDecoderOnlyOutput(
            sequences=ids[:, :length],
            scores=tuple(scores_out) if output_scores else None,
            logits=tuple(logits_out) if output_logits else None,
            cache=returned_cache,
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
