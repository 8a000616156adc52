"""Caches for decoding: self-attention K/V per layer, cross-attention K/V per image set.

Self-attention buffers are preallocated to a given length (and grow if a caller goes past it);
cross-attention K/V are computed once from the image states at prefill and reused by every
decode step, stored with the model's KV heads (not repeated per query head).
"""
from __future__ import annotations

import torch


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
    """Everything a decode step needs from earlier steps.

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

    @property
    def has_images(self) -> bool:
        return bool(self.cross_keys)

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if layer.keys is None and self.capacity:
            layer.allocate(keys, max(self.capacity, keys.shape[2]))
        return layer.update(keys, values, self.seen)

    def reorder(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows in `keep` (e.g. when requests leave a batch)."""
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
        for i in self.cross_keys:
            self.cross_keys[i], self.cross_values[i] = self.cross_keys[i][keep], self.cross_values[i][keep]
        if self.cross_mask_row is not None:
            self.cross_mask_row = self.cross_mask_row[keep]
