"""The decoding cache: self-attention K/V written at each row's own position, and each row's
picture K/V for the cross-attention layers.

One class serves every way the model decodes. `generate` uses it with rows that move together
(a left-padded batch leaves holes where the padding was, marked not `valid`); the serving engine
uses it with rows that are independent conversations joining and leaving between steps, each at
its own length. A forward over B rows uses rows [0, B) of the cache.

`static=True` gives every decode step the same shapes (keys over the whole capacity, padding
masked) and no host-side bookkeeping inside the step, which is what torch.compile and CUDA
graphs need. Buffers are overwritten in place, never replaced, so a captured graph stays valid.
"""
from __future__ import annotations

import torch


def causal_mask(attention_mask: torch.Tensor | None, q_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Additive (B|1, 1, q, q) mask for a forward without a cache: causal, hiding padded keys.
    None means plain causal attention (SDPA's is_causal is exact then)."""
    if attention_mask is None or bool(attention_mask[:, -q_len:].all()):
        return None
    rows = torch.arange(q_len, device=device)[:, None]
    allowed = (torch.arange(q_len, device=device)[None, :] <= rows)[None, None]
    allowed = allowed & attention_mask[:, None, None, -q_len:].bool()
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)


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


class MllamaCache:
    """K/V for `batch` rows of up to `capacity` positions each.

    Per row: `lengths` (device) counts the positions used, padding included; `valid` (device,
    (batch, capacity)) marks positions that hold a real token. `host_lengths` mirrors `lengths`
    on the host (the key span of an eager step) and is not kept up to date by static caches,
    whose steps may be replayed from a CUDA graph without running any Python.

    Cross-attention: `cross_keys[i]`/`cross_values[i]` (batch, n_kv_heads, N*T*P, head_dim) per
    cross-attention layer, computed once from the pictures; `cross_mask`/`cross_rows` are the
    additive and row masks of new tokens, which see what the last prompt token saw. A row without
    a picture has zero cross values and a zero row mask, which makes every cross-attention layer
    an exact identity for it.
    """

    def __init__(self, num_layers: int, batch: int, capacity: int, *, static: bool = False) -> None:
        self.num_layers, self.batch, self.capacity, self.static = num_layers, batch, capacity, static
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.host_lengths = [0] * batch
        self.cross_keys: dict[int, torch.Tensor] = {}
        self.cross_values: dict[int, torch.Tensor] = {}
        self.cross_mask: torch.Tensor | None = None
        self.cross_rows: torch.Tensor | None = None
        self.image_rows = [False] * batch  # host: which rows have a picture
        self.decode_graphs: dict = {}  # captured decode steps over these buffers, per batch size
        self._write_at: torch.Tensor | None = None  # (B, q) positions written by the running forward
        self._row_index: torch.Tensor | None = None  # (B, 1) rows of the running forward
        self._span = 0
        self._plain_causal = False

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, capacity: int, *, static: bool = False,
                  with_pictures: bool = True) -> "MllamaCache":
        """A cache with every buffer allocated up front, each on its layer's device (one picture
        per row when `with_pictures`)."""
        text = model.language_model.model
        cfg, vcfg = model.config.text_config, model.config.vision_config
        embed = text.embed_tokens.weight
        cache = cls(len(text.layers), batch, capacity, static=static)
        cache._allocate_rows(embed.device)
        kv = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        xkv = (batch, cfg.num_key_value_heads, vcfg.max_num_tiles * vcfg.num_patches, cfg.head_dim)
        for i, layer in enumerate(text.layers):
            device = next(layer.parameters()).device
            if i in cfg.cross_attention_layers:
                if with_pictures:
                    cache.cross_keys[i] = torch.zeros(xkv, dtype=embed.dtype, device=device)
                    cache.cross_values[i] = torch.zeros(xkv, dtype=embed.dtype, device=device)
            else:
                cache.keys[i] = torch.zeros(kv, dtype=embed.dtype, device=device)
                cache.values[i] = torch.zeros(kv, dtype=embed.dtype, device=device)
        if with_pictures:
            cache.cross_mask = torch.zeros(batch, 1, 1, xkv[2], dtype=embed.dtype, device=embed.device)
            cache.cross_rows = torch.zeros(batch, 1, 1, 1, dtype=embed.dtype, device=embed.device)
        return cache

    def get_seq_length(self) -> int:
        return max(self.host_lengths)

    # --- reading K/V per layer, as transformers 5's DynamicCache offers it ---------------------

    @property
    def layers(self) -> list["CacheLayer"]:
        """`cache.layers[i].keys` / `.values`: layer i's K/V (batch, kv_heads, seq, head_dim)."""
        return [CacheLayer(self, i) for i in range(self.num_layers)]

    def __len__(self) -> int:
        return self.num_layers

    def __iter__(self):
        """(keys, values, None) per layer; the third item is DynamicCache's sliding window."""
        for layer in self.layers:
            yield layer.keys, layer.values, None

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a decode step reads or writes (a CUDA graph replays against their addresses)."""
        out = [t for t in (*self.keys, *self.values, self.valid, self.lengths, self.cross_mask, self.cross_rows) if t is not None]
        return out + list(self.cross_keys.values()) + list(self.cross_values.values())

    # --- one forward: the text model calls begin, update (per layer), self_attention_mask, end ---

    def begin(self, rows: int, q_len: int, attention_mask: torch.Tensor | None, device: torch.device) -> None:
        """Plan a forward of `q_len` tokens for rows [0, rows): each row writes at its own length.
        `attention_mask` (rows, past+q or q) marks real tokens; 0 leaves a hole (left padding)."""
        if rows > self.batch:
            raise ValueError(f"the cache holds {self.batch} rows, the forward has {rows}")
        self._allocate_rows(device)
        if self.static:  # fixed shapes; the host mirror is not read (it may be stale under graphs)
            self._span, self._plain_causal = self.capacity, False
        else:
            past = max(self.host_lengths[:rows])
            self._span = past + q_len
            if self._span > self.capacity:
                self._grow(max(self._span, 2 * self.capacity))
            # A fresh prompt without padding: SDPA's own causal masking is exact and faster.
            self._plain_causal = past == 0 and q_len > 1 and (
                attention_mask is None or bool(attention_mask[:, -q_len:].all()))
        write_at = self.lengths[:rows, None] + torch.arange(q_len, device=device)
        if attention_mask is None:
            fresh = torch.ones_like(write_at, dtype=torch.bool)
        else:
            fresh = attention_mask[:, -q_len:].bool().to(device)
        self.valid[:rows].scatter_(1, write_at, fresh)
        self._write_at = write_at
        self._row_index = torch.arange(rows, device=device)[:, None]

    def default_positions(self) -> torch.Tensor:
        """(B, q) positions of the planned tokens, for a forward given no position_ids: each row
        continues from its length (right for rows without holes)."""
        return self._write_at

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, q, D) at the planned positions; return K/V of positions [0, span) of those rows."""
        if self.keys[layer_idx] is None:
            shape = (self.batch, keys.shape[1], self.capacity, keys.shape[3])
            self.keys[layer_idx] = keys.new_zeros(shape)
            self.values[layer_idx] = keys.new_zeros(shape)
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        b = keys.shape[0]
        write_at, rows = self._write_at.to(k_buf.device), self._row_index.to(k_buf.device)
        k_buf[rows, :, write_at] = keys.transpose(1, 2)  # indexed as (B, q, H, D)
        v_buf[rows, :, write_at] = values.transpose(1, 2)
        return k_buf[:b, :, : self._span], v_buf[:b, :, : self._span]

    def self_attention_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive (B, 1, q, span): a new token sees the real tokens of its row up to itself.
        None: plain causal attention."""
        if self._plain_causal:
            return None
        b = self._write_at.shape[0]
        keys = torch.arange(self._span, device=self._write_at.device)
        allowed = (keys[None, None, :] <= self._write_at[:, :, None]) & self.valid[:b, None, : self._span]
        return torch.where(allowed[:, None], torch.zeros((), dtype=dtype, device=keys.device), torch.finfo(dtype).min)

    def end(self, rows: int, q_len: int) -> None:
        self.lengths[:rows] += q_len
        if not self.static:
            for row in range(rows):
                self.host_lengths[row] += q_len

    # --- pictures ---------------------------------------------------------------------------

    def runs_cross_layers(self, rows: int) -> bool:
        """Static caches always run the cross layers (one graph whatever the rows hold; an exact
        identity for rows without a picture); eager steps skip them when no row has a picture."""
        if not self.cross_keys:
            return False
        return self.static or any(self.image_rows[:rows])

    def store_cross(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Cross K/V of rows [0, B) of a forward with pictures (prefill). Buffers hold every row of
        the cache, so that a prompt's rows can later be copied into more rows (`reorder_rows`)."""
        b = keys.shape[0]
        old = self.cross_keys.get(layer_idx)
        if old is None or old.shape[1:] != keys.shape[1:]:
            self.cross_keys[layer_idx] = keys.new_zeros((self.batch, *keys.shape[1:]))
            self.cross_values[layer_idx] = values.new_zeros((self.batch, *values.shape[1:]))
        self.cross_keys[layer_idx][:b].copy_(keys)
        self.cross_values[layer_idx][:b].copy_(values)
        self.image_rows[:b] = [True] * b

    def set_cross_mask_row(self, row: torch.Tensor, num_vision_tokens: int, dtype: torch.dtype) -> None:
        """Remember the last prompt token's (B, 1, N, T) mask: later tokens see what it saw."""
        additive, rows = prepare_cross_attention_mask(row, num_vision_tokens, dtype)
        b = row.shape[0]
        if self.cross_mask is None or self.cross_mask.shape[1:] != additive.shape[1:]:
            self.cross_mask = additive.new_zeros((self.batch, *additive.shape[1:]))
            self.cross_rows = rows.new_zeros((self.batch, *rows.shape[1:]))
        self.cross_mask[:b].copy_(additive)
        self.cross_rows[:b].copy_(rows)

    def cross_masks(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_mask[:rows], self.cross_rows[:rows]

    # --- rows as independent conversations (the serving engine) -------------------------------

    def set_lengths(self, lengths: list[int]) -> None:
        """Rows [0, len(lengths)) continue at these lengths (one host-to-device copy)."""
        n = len(lengths)
        self.lengths[:n].copy_(torch.tensor(lengths))
        self.host_lengths[:n] = list(lengths)

    def load_row(self, row: int, kv: list, length: int) -> None:
        """Start row `row` from stored self-attention K/V of positions [0, length): per layer
        (keys, values) (1, H, >=length, D), or None for cross-attention layers."""
        for i, pair in enumerate(kv):
            if pair is not None:
                self.keys[i][row, :, :length] = pair[0][0, :, :length]
                self.values[i][row, :, :length] = pair[1][0, :, :length]
        self.valid[row, :length] = True
        self.lengths[row] = length
        self.host_lengths[row] = length

    def load_cross(self, row: int, keys: dict, values: dict) -> None:
        """Row `row` looks at a picture whose cross K/V (per layer, (1, H, N*T*P, D)) were kept."""
        for i in self.cross_keys:
            self.cross_keys[i][row] = keys[i][0]
            self.cross_values[i][row] = values[i][0]
        self.image_rows[row] = True

    def copy_row(self, row: int, source: "MllamaCache", source_row: int) -> int:
        """Row `row` becomes `source`'s row `source_row` with its padding holes squeezed out
        (K/V do not depend on where they are stored, only on their rotary positions).
        Returns the row's length here."""
        kept = source.valid[source_row, : source.host_lengths[source_row]].nonzero().squeeze(1)
        length = kept.numel()
        for i in range(self.num_layers):
            if source.keys[i] is not None:
                self.keys[i][row, :, :length] = source.keys[i][source_row].index_select(1, kept.to(source.keys[i].device))
                self.values[i][row, :, :length] = source.values[i][source_row].index_select(1, kept.to(source.keys[i].device))
        self.valid[row, :length] = True
        self.lengths[row] = length
        self.host_lengths[row] = length
        if source.image_rows[source_row]:
            for i in self.cross_keys:
                self.cross_keys[i][row] = source.cross_keys[i][source_row]
                self.cross_values[i][row] = source.cross_values[i][source_row]
            self.cross_mask[row] = source.cross_mask[source_row]
            self.cross_rows[row] = source.cross_rows[source_row]
        elif self.cross_keys:
            for values in self.cross_values.values():
                values[row] = 0  # a stale picture must not leak in when the cross layers run anyway
            self.cross_mask[row] = 0
            self.cross_rows[row] = 0
        self.image_rows[row] = source.image_rows[source_row]
        return length

    def export_row(self, row: int, length: int) -> list:
        """Copies of row `row`'s self-attention K/V for positions [0, length), per layer (None for
        cross-attention layers); the row must hold no holes there."""
        return [None if k is None else (k[row : row + 1, :, :length].clone(), v[row : row + 1, :, :length].clone())
                for k, v in zip(self.keys, self.values)]

    # --- rows that follow other rows (several sequences per prompt: beams, samples) ----------

    def reorder_rows(self, index: torch.Tensor, *, pictures: bool = True) -> None:
        """Rows [0, n) become copies of rows `index` (n,) as they were: a prompt's row expanded
        into several sequences, or beam search keeping some beams and dropping others. Buffers
        are overwritten in place, never replaced (a captured graph stays valid).

        `pictures=False` leaves each row's picture and cross mask where they are, which is right
        (and saves copying every picture's K/V) when rows only move among rows that see the same
        picture, as the beams of one prompt do."""
        n = index.shape[0]
        if n > self.batch:
            raise ValueError(f"the cache holds {self.batch} rows, the new order has {n}")
        host_index = None if self.static and not pictures else index.tolist()
        # Eager caches only hold positions [0, longest row); static ones are read whole.
        span = self.capacity if self.static else max(self.host_lengths[r] for r in host_index)
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                if buffer is not None:
                    buffer[:n, :, :span] = buffer[:, :, :span].index_select(0, index.to(buffer.device))
        self.valid[:n] = self.valid.index_select(0, index)
        self.lengths[:n] = self.lengths.index_select(0, index)
        if not self.static:
            self.host_lengths[:n] = [self.host_lengths[r] for r in host_index]
        if pictures:
            for buffer in (*self.cross_keys.values(), *self.cross_values.values(), self.cross_mask, self.cross_rows):
                if buffer is not None:
                    buffer[:n] = buffer.index_select(0, index.to(buffer.device))
            self.image_rows[:n] = [self.image_rows[r] for r in host_index]

    # --- reuse across requests (compiled generate keeps its caches) --------------------------

    def reset(self) -> None:
        """Start over with the same buffers (a captured graph stays valid)."""
        self.lengths.zero_()
        self.valid.zero_()
        self.host_lengths = [0] * self.batch

    def checkpoint(self) -> torch.Tensor:
        return self.lengths.clone()

    def rewind(self, lengths: torch.Tensor) -> None:
        """Back to a checkpoint: K/V written since are hidden again (causal mask) until overwritten."""
        self.lengths.copy_(lengths)

    # --- internals ----------------------------------------------------------------------------

    def _allocate_rows(self, device: torch.device) -> None:
        if self.lengths is None:
            self.lengths = torch.zeros(self.batch, dtype=torch.long, device=device)
            self.valid = torch.zeros(self.batch, self.capacity, dtype=torch.bool, device=device)

    def _grow(self, capacity: int) -> None:
        """A longer eager cache (a plain forward fed its cache back); static caches never move."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                k, v = self.keys[i], self.values[i]
                self.keys[i] = k.new_zeros(*k.shape[:2], capacity, k.shape[3])
                self.values[i] = v.new_zeros(*v.shape[:2], capacity, v.shape[3])
                self.keys[i][:, :, : self.capacity] = k
                self.values[i][:, :, : self.capacity] = v
        valid = self.valid.new_zeros(self.batch, capacity)
        valid[:, : self.capacity] = self.valid
        self.valid = valid
        self.capacity = capacity


class CacheLayer:
    """A view of one layer of an eager cache. Self-attention layers: the positions filled so far,
    padding included (masked when attending); cross-attention layers: the picture K/V
    (batch, kv_heads, N*T*P, head_dim), None when no picture was seen."""

    def __init__(self, cache: MllamaCache, index: int) -> None:
        self.cache, self.index = cache, index

    def _get(self, self_kv: list, cross_kv: dict) -> torch.Tensor | None:
        if self.index in cross_kv:
            return cross_kv[self.index]
        buffer = self_kv[self.index]
        return None if buffer is None else buffer[:, :, : self.cache.get_seq_length()]

    @property
    def keys(self) -> torch.Tensor | None:
        return self._get(self.cache.keys, self.cache.cross_keys)

    @property
    def values(self) -> torch.Tensor | None:
        return self._get(self.cache.values, self.cache.cross_values)
