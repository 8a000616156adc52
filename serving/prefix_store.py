"""What a finished turn leaves for the conversation's next one, by session id.

A follow-up question re-sends the whole conversation; the K/V of its unchanged start (the
previous prompt and reply) and of its picture are taken from here instead of being recomputed.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class StoredPrefix:
    """The picture's cross-attention K/V (per layer, (1, H, N*T*P, D); empty without a picture)
    and the self-attention K/V of every token the model has read (prompt + reply)."""

    image_key: str | None
    cross_keys: dict = field(default_factory=dict)
    cross_values: dict = field(default_factory=dict)
    cross_mask: torch.Tensor | None = None  # (1, 1, 1, N*T*P) additive, and the row mask
    cross_rows: torch.Tensor | None = None
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


class PrefixStore:
    """Recent conversations (LRU), bounded by a number of sessions and of stored tokens."""

    def __init__(self, max_sessions: int, max_tokens: int) -> None:
        self.max_sessions, self.max_tokens = max_sessions, max_tokens
        self._items: OrderedDict[str, StoredPrefix] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def take(self, session_id: str | None) -> StoredPrefix | None:
        """Remove and return the session's entry: the turn being served owns it now, and a turn
        with a new picture thereby drops the old picture's K/V at once."""
        if not session_id:
            return None
        return self._items.pop(session_id, None)

    def put(self, session_id: str | None, prefix: StoredPrefix) -> None:
        if not session_id or self.max_sessions <= 0:
            return
        self._items[session_id] = prefix
        self._items.move_to_end(session_id)
        while len(self._items) > self.max_sessions or (
            len(self._items) > 1 and sum(len(p.token_ids) for p in self._items.values()) > self.max_tokens
        ):
            self._items.popitem(last=False)


def image_key(inputs: dict) -> str | None:
    """A fingerprint of the picture as the model sees it (pixels and tiling), or None."""
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return None
    digest = hashlib.sha1(pixels.detach().cpu().contiguous().numpy().tobytes())
    digest.update(inputs["aspect_ratio_ids"].cpu().numpy().tobytes())
    return digest.hexdigest()
