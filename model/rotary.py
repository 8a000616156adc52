"""Rotary position embeddings with Llama 3's frequency scaling ("llama3" rope type).

HF checkpoints store q/k projections permuted for the rotate-half layout, so we rotate halves,
never interleaved pairs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import MllamaTextConfig


def rope_inverse_frequencies(config: MllamaTextConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low_freq_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_freq_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class MllamaRotaryEmbedding(nn.Module):
    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, q) -> cos, sin (B, q, head_dim) in x's dtype (angles in float32)."""
        inv_freq = self.inv_freq
        if inv_freq.device.type == "meta" or inv_freq.device != x.device:
            # Buffers are not loaded from checkpoints; recompute wherever the layer landed.
            inv_freq = rope_inverse_frequencies(self.config).to(x.device)
            self.inv_freq = inv_freq
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, heads, q, D); cos, sin (B, q, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
