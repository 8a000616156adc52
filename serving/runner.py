"""The model side of serving: batched prefill, decode steps and sampling, on the device.

The runner owns one `MllamaCache` whose rows are the engine's slots, each an independent
conversation at its own length, and decodes them with the same `decode_step` (and the same
compiled, CUDA-graphed wrapper) as `generate`. Newcomers are prefilled together in a small cache
of their own (left-padded, each row continuing from the K/V its conversation already had), then
copied into their slots without the padding. It knows no queue: the scheduler tells it which
requests to run.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.cache import MllamaCache
from model.compiled_step import on_one_device
from model.generation import position_ids_from_mask, step_function
from model.sampling import process_logits, select_next_tokens

from .policy import Request
from .prefix_store import PrefixStore, StoredPrefix, image_key

NEW_PICTURE, CACHED_PICTURE, TEXT = "new picture", "cached picture", "text"
# Prefill batches grow until the device runs at full speed; past that, batching more requests
# only makes the first of them wait for the last. A CPU is saturated by a few hundred tokens (on
# 2 cores, batches of 2 and 8 requests of 324 tokens took 1.7x and 6.9x one), a GPU by thousands.
PREFILL_TOKENS = {"cpu": 768, "cuda": 16384}


@dataclass
class _Admission:
    request: Request
    kind: str
    stored: StoredPrefix | None
    reused: int  # prompt tokens whose self-attention K/V come from `stored`


class ModelRunner:
    def __init__(self, model, slots: int, capacity: int, *, compile: bool = False, sessions: int = 16) -> None:
        """`compile`: decode with fixed shapes through torch.compile (CUDA graphs on one GPU); a
        step then runs a power-of-two bucket of slots over the whole capacity."""
        self.model = model
        self.capacity = capacity
        self.device = model.get_input_embeddings().weight.device
        self.static = compile and on_one_device(model)
        self.prefill_tokens = PREFILL_TOKENS.get(self.device.type, PREFILL_TOKENS["cuda"])
        vision = model.config.vision_config
        self.picture_tokens = vision.max_num_tiles * vision.num_patches
        self.cache = MllamaCache.for_model(model, slots, capacity, static=self.static)
        self.step = step_function(model, self.static)
        self.prefixes = PrefixStore(sessions, max_tokens=sessions * capacity // 4)
        self.vision_runs = 0
        self._history: list[torch.Tensor | None] = [None] * slots  # ids per slot, for the repetition penalty

    # --- decode ------------------------------------------------------------------------------

    def step_rows(self, busy: int) -> int:
        """Rows a step over slots [0, busy) runs: exactly those, or with static shapes the next
        bucket (a power of two, at most the number of slots)."""
        if not self.static:
            return busy
        return min(1 << (busy - 1).bit_length(), self.cache.batch)

    def buckets(self) -> list[int]:
        slots = self.cache.batch
        return sorted({self.step_rows(n) for n in range(1, slots + 1)})

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run one step of every bucket, so that compiling (and capturing CUDA graphs) happens
        before the first user arrives. Rows are overwritten when requests take them."""
        for n in self.buckets():
            self._run_step([1] * n, [0] * n)

    @torch.inference_mode()
    def decode(self, requests: list[Request]) -> list[int]:
        """One token for each running request (one host sync for all)."""
        n = self.step_rows(max(r.slot for r in requests) + 1)
        lengths, tokens = [0] * n, [0] * n  # free rows inside the step write into row position 0
        for r in requests:
            lengths[r.slot], tokens[r.slot] = r.read_tokens, r.tokens[-1]
        logits = self._run_step(lengths, tokens)
        picked = [self._sample(r, logits[r.slot : r.slot + 1]) for r in requests]
        return torch.cat(picked).tolist()

    def _run_step(self, lengths: list[int], tokens: list[int]) -> torch.Tensor:
        self.cache.set_lengths(lengths)
        positions = self.cache.lengths[: len(lengths)].clone()  # the step advances the lengths in place
        return self.step(self.model, self.cache, torch.tensor(tokens, device=self.device), positions)

    # --- prefill -----------------------------------------------------------------------------

    def prefill(self, requests: list[Request]) -> Iterator[list[tuple[Request, int]]]:
        """Run the newcomers' prompts (already in their slots) and sample their first tokens;
        yields each batch's (request, first token) as soon as that batch has run. A batch holds
        requests of one kind (new picture, picture kept from the last turn, text only), in
        arrival order, up to `prefill_tokens` tokens."""
        admissions = [self._admission(r) for r in requests]
        for kind in (NEW_PICTURE, CACHED_PICTURE, TEXT):
            group = [a for a in admissions if a.kind == kind]
            for batch in self._batches(group):
                with torch.inference_mode():
                    logits = self._prefill_group(batch)
                    picked = [self._sample(a.request, logits[i : i + 1]) for i, a in enumerate(batch)]
                    tokens = torch.cat(picked).tolist()
                yield [(a.request, token) for a, token in zip(batch, tokens)]

    def _batches(self, group: list[_Admission]) -> Iterator[list[_Admission]]:
        """Consecutive batches of at most `prefill_tokens` tokens (text to prefill and picture
        patches to encode); a request larger than that runs alone."""
        batch, size = [], 0
        for a in group:
            cost = a.request.prompt_len - a.reused + (self.picture_tokens if a.kind == NEW_PICTURE else 0)
            if batch and size + cost > self.prefill_tokens:
                yield batch
                batch, size = [], 0
            batch.append(a)
            size += cost
        if batch:
            yield batch

    def _admission(self, request: Request) -> _Admission:
        key = request.image_key = request.image_key or image_key(request.inputs)
        stored = self.prefixes.take(request.session_id)
        if key is not None and stored is not None and stored.image_key == key:
            kind = CACHED_PICTURE
        elif key is not None:
            kind = NEW_PICTURE
            self.vision_runs += 1
        else:
            kind = TEXT
        reused = stored.reusable_prefix(request.prompt_ids, key) if stored is not None else 0
        request.cached_tokens = reused
        return _Admission(request, kind, stored, reused)

    def _prefill_group(self, group: list[_Admission]) -> torch.Tensor:
        """Left-padded batch of the new part of each prompt; returns last-token logits (k, V)."""
        kind = group[0].kind
        new = [a.request.prompt_ids[a.reused :] for a in group]
        q = max(len(ids) for ids in new)
        cache = MllamaCache.for_model(self.model, len(group), max(a.reused for a in group) + q,
                                      with_pictures=kind == CACHED_PICTURE)
        ids = torch.zeros(len(group), q, dtype=torch.long)
        mask = torch.zeros(len(group), q, dtype=torch.long)
        reused = torch.tensor([[a.reused] for a in group])
        for row, (a, tokens) in enumerate(zip(group, new)):
            ids[row, q - len(tokens) :] = torch.tensor(tokens)
            mask[row, q - len(tokens) :] = 1
            if a.reused:
                cache.load_row(row, a.stored.self_kv, a.reused)
            if kind == CACHED_PICTURE:
                cache.load_cross(row, a.stored.cross_keys, a.stored.cross_values)
        images = {}
        if kind != TEXT:
            tiles = group[0].request.inputs["cross_attention_mask"].shape[2:]
            cross = torch.zeros(len(group), q, *tiles, dtype=torch.long)
            for row, (a, tokens) in enumerate(zip(group, new)):
                cross[row, q - len(tokens) :] = a.request.inputs["cross_attention_mask"][0, a.reused :]
            images["cross_attention_mask"] = cross.to(self.device)
        if kind == NEW_PICTURE:
            for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
                images[name] = torch.cat([a.request.inputs[name] for a in group]).to(self.device)
        mask = mask.to(self.device)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask,
                         position_ids=position_ids_from_mask(mask) + reused.to(self.device),
                         past_key_values=cache, use_cache=True, logits_to_keep=1, **images)
        for row, a in enumerate(group):
            slot = a.request.slot
            self.cache.copy_row(slot, cache, row)
            history = torch.zeros(1, self.capacity, dtype=torch.long, device=self.device)
            history[0, : a.request.prompt_len] = torch.tensor(a.request.prompt_ids, device=self.device)
            self._history[slot] = history
        return out.logits[:, -1]

    # --- sampling and leaving ---------------------------------------------------------------

    def _sample(self, request: Request, logits: torch.Tensor) -> torch.Tensor:
        history = self._history[request.slot]
        length = request.prompt_len + len(request.tokens)
        if request.tokens:
            history[0, length - 1] = request.tokens[-1]
        scores = process_logits(logits, history[:, :length], request.sampling, new_tokens=len(request.tokens),
                                 eos_token_ids=sorted(request.eos))
        return select_next_tokens(scores, request.sampling, request.generator)

    def release(self, request: Request, keep: bool = True) -> None:
        """The request left its slot: with `keep`, store what its conversation's next turn can
        reuse."""
        slot = request.slot
        history = self._history[slot]
        if history is None:
            return  # its prefill never reached the slot
        if keep and request.session_id:
            read = request.read_tokens
            cache = self.cache
            picture = cache.image_rows[slot]
            self.prefixes.put(request.session_id, StoredPrefix(
                image_key=request.image_key,
                cross_keys={i: k[slot : slot + 1].clone() for i, k in cache.cross_keys.items()} if picture else {},
                cross_values={i: v[slot : slot + 1].clone() for i, v in cache.cross_values.items()} if picture else {},
                token_ids=history[0, :read].tolist(),
                self_kv=cache.export_row(slot, read),
            ))
        self.cache.image_rows[slot] = False  # eager steps skip the cross layers when no row has a picture
        self._history[slot] = None
