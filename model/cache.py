"""Caches for decoding: self-attention K/V per layer, cross-attention K/V per image set.

Two kinds share one small protocol that the text model uses (`update`, `self_attention_mask`,
`cross_keys`/`cross_values`, `cross_masks`, `advance`):
- `MllamaCache`: one request (or a batch that moves in lock step), as `generate` uses it.
- `SlotCache`: a fixed number of slots with their own lengths, for continuous batching; requests
  join and leave between decode steps.
Cross-attention K/V are computed once from the image states at prefill and stored with the
model's KV heads (not repeated per query head).
"""
from __future__ import annotations

import torch


def causal_mask(
    attention_mask: torch.Tensor | None, q_len: int, past: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Additive (B|1, 1, q, past+q) mask: causal, and hiding padded keys. None = plain causal."""
    kv_len = past + q_len
    zero = torch.zeros((), dtype=dtype, device=device)
    if q_len == 1:  # decode: causality is automatic; only padding (if any) is hidden, without a host sync
        if attention_mask is None:
            return None
        return torch.where(attention_mask[:, None, None, :kv_len].bool(), zero, torch.finfo(dtype).min)
    if attention_mask is None or bool(attention_mask[:, :kv_len].all()):
        if past == 0:
            return None  # SDPA's is_causal is exact here
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(past)[None, None]
    else:
        rows = torch.arange(past, kv_len, device=device)[:, None]
        cols = torch.arange(kv_len, device=device)[None, :]
        allowed = (cols <= rows)[None, None] & attention_mask[:, None, None, :kv_len].bool()
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def prepare_cross_attention_mask(
    cross_attention_mask: torch.Tensor, num_vision_tokens: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, q, N, T) 0/1 -> additive mask (B, 1, q, N*T*P) and row mask (B, 1, q, 1).

    Rows that see no tile get an all-zero additive row (uniform attention, no NaN) and row mask 0.
    """
    allowed = cross_attention_mask.bool()
    row = allowed.flatten(2).any(-1)[:, None, :, None]
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    additive = torch.where(allowed, zero, torch.finfo(dtype).min)
    additive = additive.repeat_interleave(num_vision_tokens, dim=-1).flatten(2)[:, None]
    return additive * row.to(dtype), row.to(dtype)


class SelfAttentionCache:
    """K/V of one self-attention layer: (B, n_kv_heads, capacity, head_dim) buffers."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, q, D) at positions [start, start+q); return K/V of positions [0, start+q)."""
        end = start + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, max(end, 2 * (0 if self.keys is None else self.keys.shape[2])), start)
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]

    def allocate(self, like: torch.Tensor, capacity: int) -> None:
        b, h, _, d = like.shape
        self.keys = like.new_zeros(b, h, capacity, d)
        self.values = like.new_zeros(b, h, capacity, d)

    def _grow(self, like: torch.Tensor, capacity: int, keep: int) -> None:
        old_k, old_v = self.keys, self.values
        self.allocate(like, capacity)
        if old_k is not None and keep:
            self.keys[:, :, :keep] = old_k[:, :, :keep]
            self.values[:, :, :keep] = old_v[:, :, :keep]


class MllamaCache:
    """Everything a decode step needs from earlier steps, for sequences that move together.

    `seen` counts the text positions already written. `cross_keys`/`cross_values` map a
    cross-attention layer index to its (B, n_kv_heads, N*T*P, head_dim) K/V.
    `cross_mask_row` is the integer cross-attention mask row (B, 1, N, T) of the last token:
    every new token sees what the last prompt token saw.
    """

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.layers = [SelfAttentionCache() for _ in range(num_layers)]
        self.capacity = capacity
        self.seen = 0
        self.cross_keys: dict[int, torch.Tensor] = {}
        self.cross_values: dict[int, torch.Tensor] = {}
        self.cross_mask_row: torch.Tensor | None = None

    def get_seq_length(self) -> int:
        return self.seen

    def preload(self, self_kv: list, length: int) -> None:
        """Start from stored K/V of the first `length` positions (batch of one); they are copied
        on the first write, so the stored tensors stay untouched."""
        for layer, kv in zip(self.layers, self_kv):
            if kv is not None:
                layer.keys, layer.values = kv[0][:, :, :length], kv[1][:, :, :length]
        self.seen = length

    @property
    def has_images(self) -> bool:
        return bool(self.cross_keys)

    def store_cross(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.cross_keys[layer_idx], self.cross_values[layer_idx] = keys, values

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if layer.keys is None and self.capacity:
            layer.allocate(keys, max(self.capacity, keys.shape[2]))
        return layer.update(keys, values, self.seen)

    def self_attention_mask(self, attention_mask, q_len, dtype, device) -> torch.Tensor | None:
        return causal_mask(attention_mask, q_len, self.seen, dtype, device)

    def set_cross_mask_row(self, row: torch.Tensor, num_vision_tokens: int, dtype: torch.dtype) -> None:
        """Remember the last prompt row's (B, 1, N, T) mask: decode rows see what it saw."""
        self.cross_mask_row = row

    def cross_masks(self, q_len: int, num_vision_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for new rows that see what the last prompt row saw."""
        return prepare_cross_attention_mask(self.cross_mask_row.expand(-1, q_len, -1, -1), num_vision_tokens, dtype)

    def advance(self, q_len: int) -> None:
        self.seen += q_len


class StaticCache(MllamaCache):
    """Fixed shapes for decoding: every step attends over all `capacity` positions (the unused
    ones masked) and writes at a device-side index, so a decode step has the same shapes and
    no host synchronisation from the first step to the last. That is what CUDA graphs and
    torch.compile need.

    `padding` (B, capacity) marks real tokens (0 for left padding). `write_index` (a 1-element
    device tensor) is the next position to write; the text model advances it in place.

    A cache can serve request after request (`reset`): every tensor a decode step reads keeps its
    address, since new values are copied in, so a CUDA graph captured on it stays valid.
    """

    def __init__(self, num_layers: int, capacity: int, padding: torch.Tensor) -> None:
        super().__init__(num_layers, capacity)
        self.padding = padding.bool()
        self.write_index = torch.zeros(1, dtype=torch.long, device=padding.device)
        self.key_positions = torch.arange(capacity, device=padding.device)
        self.decode_graphs: dict = {}  # captured decode steps over these tensors (model/compiled_step.py)

    def checkpoint(self) -> tuple[torch.Tensor, int]:
        return self.write_index.clone(), self.seen

    def rewind(self, state: tuple[torch.Tensor, int]) -> None:
        """Back to a checkpoint: K/V written since then stay, masked until overwritten."""
        self.write_index.copy_(state[0])
        self.seen = state[1]

    def reset(self, padding: torch.Tensor) -> None:
        """Start a new request of the same shapes; the buffers are kept and overwritten."""
        self.padding.copy_(padding.bool())
        self.write_index.zero_()
        self.seen = 0

    def store_cross(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        old = self.cross_keys.get(layer_idx)
        if old is None or old.shape != keys.shape:
            super().store_cross(layer_idx, keys, values)
            return
        old.copy_(keys)
        self.cross_values[layer_idx].copy_(values)

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if layer.keys is None:
            layer.allocate(keys, self.capacity)
        index = self.write_index + self.key_positions[: keys.shape[2]]
        layer.keys.index_copy_(2, index, keys)
        layer.values.index_copy_(2, index, values)
        return layer.keys, layer.values

    def self_attention_mask(self, attention_mask, q_len, dtype, device) -> torch.Tensor:
        rows = self.write_index + self.key_positions[:q_len, None]  # (q, 1) positions of the new tokens
        allowed = (self.key_positions[None, :] <= rows)[None, None] & self.padding[:, None, None, :]
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def set_cross_mask_row(self, row: torch.Tensor, num_vision_tokens: int, dtype: torch.dtype) -> None:
        super().set_cross_mask_row(row, num_vision_tokens, dtype)
        masks = super().cross_masks(1, num_vision_tokens, dtype)  # the same at every step
        old = getattr(self, "_decode_cross_masks", None)
        if old is not None and all(a.shape == b.shape for a, b in zip(old, masks)):
            for a, b in zip(old, masks):
                a.copy_(b)
        else:
            self._decode_cross_masks = masks

    def cross_masks(self, q_len: int, num_vision_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if q_len != 1:
            return super().cross_masks(q_len, num_vision_tokens, dtype)
        return self._decode_cross_masks

    def advance(self, q_len: int) -> None:
        if not torch.compiler.is_compiling():
            super().advance(q_len)  # a host counter; compiled steps must not guard on a changing int
        self.write_index += q_len


class SlotCache:
    """Preallocated caches for `num_slots` independent sequences of up to `capacity` tokens.

    Each slot holds one request: its self-attention K/V rows, its own length, and its image's
    cross-attention K/V (zero values and a closed row mask for text-only requests, which makes
    the cross layer an identity). Decode steps run all slots at once; `active` rows are the only
    ones whose results are used.

    `static=True` gives every step fixed shapes, for torch.compile and CUDA graphs: a step runs a
    power-of-two bucket of slots, attends over the whole capacity (unused positions masked),
    always runs the cross layers, and reads its write positions from a buffer that never moves.
    """

    def __init__(self, model, num_slots: int, capacity: int, static: bool = False) -> None:
        text = model.language_model.model
        cfg = model.config.text_config
        vcfg = model.config.vision_config
        weight = text.embed_tokens.weight
        dtype = weight.dtype
        self.num_slots, self.capacity = num_slots, capacity
        self.cross_layers = list(cfg.cross_attention_layers)
        self.vision_tokens = vcfg.max_num_tiles * vcfg.num_patches  # one image per request
        kv = (num_slots, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.layers = []
        for i, layer in enumerate(text.layers):
            device = _layer_device(layer, weight.device)
            cache = SelfAttentionCache()
            if i not in self.cross_layers:
                cache.keys = torch.zeros(kv, dtype=dtype, device=device)
                cache.values = torch.zeros(kv, dtype=dtype, device=device)
            self.layers.append(cache)
        xkv = (num_slots, cfg.num_key_value_heads, self.vision_tokens, cfg.head_dim)
        self.all_cross_keys = {i: torch.zeros(xkv, dtype=dtype, device=_layer_device(text.layers[i], weight.device)) for i in self.cross_layers}
        self.all_cross_values = {i: torch.zeros_like(t) for i, t in self.all_cross_keys.items()}
        self.cross_keys, self.cross_values = self.all_cross_keys, self.all_cross_values  # views of the step's slots
        self.cross_additive = torch.zeros(num_slots, 1, 1, self.vision_tokens, dtype=dtype, device=weight.device)
        self.cross_rows = torch.zeros(num_slots, 1, 1, 1, dtype=dtype, device=weight.device)
        self.lengths = [0] * num_slots  # host mirror: no device sync to size a step
        self.active: set[int] = set()
        self.image_slots: set[int] = set()
        self.static = static
        self.slot_ids = torch.arange(num_slots, device=weight.device)
        self.write_positions = torch.zeros(num_slots, dtype=torch.long, device=weight.device)
        self.decode_graphs: dict = {}  # per bucket (model/compiled_step.py)

    @property
    def has_images(self) -> bool:
        return self.static or any(slot < self.step_slots for slot in self.image_slots)

    @property
    def seen(self) -> int:
        return max(self.lengths)

    def load(self, slot: int, prefilled: MllamaCache, length: int, num_vision_tokens: int) -> None:
        """Copy a request's prefill cache (batch of one) into `slot`."""
        for mine, theirs in zip(self.layers, prefilled.layers):
            if theirs.keys is not None:
                mine.keys[slot, :, :length] = theirs.keys[0, :, :length]
                mine.values[slot, :, :length] = theirs.values[0, :, :length]
        self.lengths[slot] = length
        self.active.add(slot)
        if prefilled.has_images:
            for i in self.cross_layers:
                n = prefilled.cross_keys[i].shape[2]
                self.all_cross_keys[i][slot, :, :n] = prefilled.cross_keys[i][0]
                self.all_cross_values[i][slot, :, :n] = prefilled.cross_values[i][0]
            additive, rows = prepare_cross_attention_mask(prefilled.cross_mask_row[:1], num_vision_tokens, self.cross_additive.dtype)
            self.cross_additive[slot] = additive[0].to(self.cross_additive.device)
            self.cross_rows[slot] = rows[0].to(self.cross_rows.device)
            self.image_slots.add(slot)
        else:
            for values in self.all_cross_values.values():
                values[slot] = 0  # a stale picture must not leak in when the cross layers run anyway
            self.cross_additive[slot] = 0
            self.cross_rows[slot] = 0
            self.image_slots.discard(slot)

    def export(self, slot: int, length: int) -> list:
        """Copies of one slot's self-attention K/V for positions [0, length), per layer."""
        return [
            None if layer.keys is None or i in self.cross_layers
            else (layer.keys[slot : slot + 1, :, :length].clone(), layer.values[slot : slot + 1, :, :length].clone())
            for i, layer in enumerate(self.layers)
        ]

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.active.discard(slot)
        self.image_slots.discard(slot)
        self.cross_rows[slot] = 0

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys (S, H, 1, D): write each slot's new token at its own length."""
        layer = self.layers[layer_idx]
        rows, index = self._slots.to(layer.keys.device), self._write_index.to(layer.keys.device)
        layer.keys[rows, :, index] = keys[:, :, 0]
        layer.values[rows, :, index] = values[:, :, 0]
        n = len(self._slots)
        return layer.keys[:n, :, : self._span], layer.values[:n, :, : self._span]

    @property
    def step_slots(self) -> int:
        """A step runs slots [0, n): up to the highest busy one (requests take the lowest free
        slot); with static shapes, the next power of two."""
        n = max(self.active) + 1 if self.active else 0
        if self.static and n:
            n = min(1 << (n - 1).bit_length(), self.num_slots)
        return n

    def buckets(self) -> list[int]:
        """The step sizes static decoding uses: powers of two, then `num_slots`."""
        sizes = [1 << i for i in range(self.num_slots.bit_length()) if 1 << i < self.num_slots]
        return sizes + [self.num_slots]

    def begin_step(self, device: torch.device) -> torch.Tensor:
        """Prepare a decode step over slots [0, step_slots); returns the positions (n, 1) of the new tokens."""
        n = self.step_slots
        self._slots = self.slot_ids[:n]
        self._write_index = self.write_positions[:n]
        self._write_index.copy_(torch.tensor(self.lengths[:n]))
        self._span = self.capacity if self.static else max(self.lengths[:n]) + 1
        self.cross_keys = {i: t[:n] for i, t in self.all_cross_keys.items()}
        self.cross_values = {i: t[:n] for i, t in self.all_cross_values.items()}
        return self._write_index[:, None]

    def self_attention_mask(self, attention_mask, q_len, dtype, device) -> torch.Tensor:
        keys = torch.arange(self._span, device=device)[None, :]
        allowed = keys <= self._write_index.to(device)[:, None]
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None, None, :]

    def cross_masks(self, q_len: int, num_vision_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self._slots)
        return self.cross_additive[:n], self.cross_rows[:n]

    def advance(self, q_len: int) -> None:
        """Nothing here: a compiled or captured step must not touch host state; the scheduler
        calls `end_step` after each step."""

    def end_step(self) -> None:
        for slot in self.active:
            self.lengths[slot] += 1

    def checkpoint(self) -> None:
        return None  # a step's write positions come from the host lengths, which it leaves alone

    def rewind(self, state: None) -> None:
        pass  # repeating a step rewrites the same K/V rows


def _layer_device(layer: torch.nn.Module, default: torch.device) -> torch.device:
    param = next(layer.parameters(), None)
    return param.device if param is not None else default
