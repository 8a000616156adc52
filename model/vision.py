"""The tiled vision encoder (a ViT-H/14 with a 'local' and a gated 'global' stage).

Parameter names equal the checkpoint keys under `vision_model.`. Shapes use B = batch,
N = images per sample, T = max tiles, P = tokens per tile (patches + class token), P8 = P padded
to a multiple of 8, D = hidden size.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .activations import get_activation
from .config import MllamaVisionConfig
from .loading import MllamaPreTrainedModel
from .outputs import BaseModelOutput, returned
from .recording import Recording, attend, record_hidden, recorded


def like_param(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Cast `x` to the parameter's dtype and move it to its device, unless the parameter is
    offloaded (meta): then accelerate's hooks bring inputs where the weights are loaded."""
    return x.to(param.dtype) if param.device.type == "meta" else x.to(param.device, param.dtype)


class MllamaPrecomputedAspectRatioEmbedding(nn.Module):
    """One learned vector per tile, looked up by aspect-ratio id, gated by tanh(gate)."""

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.hidden_size = config.hidden_size
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1, config.max_num_tiles * config.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (B*N, T, L, D); aspect_ratio_ids (B*N,)"""
        emb = self.embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, 1, self.hidden_size)
        return x + emb * self.gate.tanh()


class MllamaPrecomputedPositionEmbedding(nn.Module):
    """Per-token position embedding blended with a per-(aspect ratio, tile, token) table."""

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.num_patches = config.num_patches
        self.hidden_size = config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(config.hidden_size**-0.5 * torch.randn(self.num_patches, self.hidden_size))
        self.tile_embedding = nn.Embedding(
            config.max_aspect_ratio_id + 1, config.max_num_tiles * self.num_patches * self.hidden_size
        )

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (B*N, T, P, D)"""
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding.view(1, 1, self.num_patches, self.hidden_size)
        tiles = self.tile_embedding(aspect_ratio_ids).reshape(
            x.shape[0], self.max_num_tiles, self.num_patches, self.hidden_size
        )
        return x + gate * tiles


class MllamaVisionMLP(nn.Module):
    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act_fn = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn(self.fc1(x)))


class MllamaVisionAttention(nn.Module):
    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.num_heads = config.attention_heads
        self.head_dim = config.hidden_size // config.attention_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, recording: Recording | None = None) -> torch.Tensor:
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = attend(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), mask, recording)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class MllamaVisionEncoderLayer(nn.Module):
    """Pre-norm block; global layers scale both branches by tanh gates."""

    def __init__(self, config: MllamaVisionConfig, is_gated: bool) -> None:
        super().__init__()
        self.is_gated = is_gated
        self.self_attn = MllamaVisionAttention(config)
        self.mlp = MllamaVisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        if is_gated:
            self.gate_attn = nn.Parameter(torch.ones(1) * math.pi / 4)
            self.gate_ffn = nn.Parameter(torch.ones(1) * math.pi / 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, recording: Recording | None = None) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask, recording)
        x = x + (self.gate_attn.tanh() * h if self.is_gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.is_gated else h)


class MllamaVisionEncoder(nn.Module):
    def __init__(self, config: MllamaVisionConfig, num_layers: int, is_gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionEncoderLayer(config, is_gated) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: tuple[int, ...] = (),
                recording: Recording | None = None) -> tuple[torch.Tensor, list]:
        """Run all layers; also return the *input* of each layer listed in `keep`, in that
        order (index len(layers) means the encoder's output). `recording` gets the encoder's
        input and each layer's output."""
        states = {}
        record_hidden(recording, x)
        for i, layer in enumerate(self.layers):
            if i in keep:
                states[i] = x
            x = layer(x, mask, recording)
            record_hidden(recording, x)
        states[len(self.layers)] = x
        return x, [states[i] for i in keep]


def tile_attention_mask(aspect_ratio_mask: torch.Tensor, num_patches: int, padded: int, dtype: torch.dtype) -> torch.Tensor:
    """Meta's encoder mask: only (pad, pad) pairs are blocked. A token is padding when its tile is
    masked or it is one of the alignment tokens past `num_patches`. (B*N, T) -> (B*N, 1, T*P8, T*P8)."""
    pad = (aspect_ratio_mask[:, :, None] == 0).expand(-1, -1, padded).clone()
    pad[:, :, num_patches:] = True
    pad = pad.flatten(1).to(dtype)
    return (pad[:, :, None] * pad[:, None, :] * torch.finfo(dtype).min)[:, None]


class MllamaVisionModel(MllamaPreTrainedModel):
    """pixel_values (B, N, T, C, S, S) -> features (B, N, T, P, vision_output_dim)."""

    config_class = MllamaVisionConfig
    checkpoint_prefixes: ClassVar = (("vision_model.", ""), ("", ""))

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.num_patches = config.num_patches
        self.hidden_size = config.hidden_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, config.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(config.hidden_size**-0.5 * torch.randn(config.hidden_size))
        self.gated_positional_embedding = MllamaPrecomputedPositionEmbedding(config)
        self.pre_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(config)
        self.post_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(config.hidden_size)
        self.layernorm_post = nn.LayerNorm(config.hidden_size)
        self.transformer = MllamaVisionEncoder(config, config.num_hidden_layers, is_gated=False)
        self.global_transformer = MllamaVisionEncoder(config, config.num_global_layers, is_gated=True)

    def recorded_layers(self) -> tuple[int, ...]:
        """Meta records the input of each listed layer; transformers >= 4.56 its output, i.e.
        the input of the next layer (and the encoder output for the last one)."""
        indices = self.config.intermediate_layers_indices
        return tuple(indices) if self.config.semantics == "meta" else tuple(i + 1 for i in indices)

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        """hidden_states: the input of the local encoder and the output of each of its layers,
        then the same for the global encoder, each (B*N, T*P8, D) as the encoders see them;
        attentions: one (B*N, heads, T*P8, T*P8) per layer, local then global."""
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise ValueError(
                "pixel_values need aspect_ratio_ids and aspect_ratio_mask; pass all the image fields the "
                "processor returns"
            )
        b, n, t, c, s, _ = pixel_values.shape
        m, d, p = b * n, self.hidden_size, self.num_patches
        x = self.patch_embedding(like_param(pixel_values.reshape(m * t, c, s, s), self.patch_embedding.weight))
        x = x.flatten(2).transpose(1, 2)  # (M*T, P-1, D), patches row-major
        ids = aspect_ratio_ids.reshape(m).to(x.device)
        x = self.pre_tile_positional_embedding(x.reshape(m, t, -1, d), ids)
        cls = self.class_embedding.to(x.dtype).expand(m * t, 1, d)
        x = torch.cat([cls, x.reshape(m * t, -1, d)], dim=1)  # class token first
        x = self.gated_positional_embedding(x.reshape(m, t, p, d), ids)
        x = self.layernorm_pre(x)

        padded = p + (8 - p % 8) % 8  # Meta pads every tile to a multiple of 8 tokens
        x = F.pad(x, (0, 0, 0, padded - p))
        mask = tile_attention_mask(aspect_ratio_mask.reshape(m, t).to(x.device), p, padded, x.dtype)

        recording = Recording.asked(self.config, output_hidden_states, output_attentions)
        x, kept = self.transformer(x.reshape(m, t * padded, d), mask, self.recorded_layers(), recording)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(m, t, padded, d), ids)
        x, _ = self.global_transformer(x.reshape(m, t * padded, d), mask, recording=recording)

        x = x.reshape(m, t, padded, d)[:, :, :p]
        # Intermediate features interleave: feature j of recorded layer k sits at j*K + k.
        inter = torch.stack(kept, dim=-1).reshape(m, t, padded, -1)[:, :, :p]
        out = torch.cat([x, inter], dim=-1)
        result = BaseModelOutput(last_hidden_state=out.reshape(b, n, t, p, -1), **recorded(recording))
        return returned(result, return_dict, self.config)
