"""The text decoder: Llama 3.1 self-attention layers interleaved with gated cross-attention layers.

Module and parameter names equal the checkpoint keys under `language_model.model.` (and
`language_model.lm_head.`), so a state dict loads without renaming.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .activations import get_activation
from .cache import MllamaCache, causal_mask
from .config import MllamaTextConfig
from .generation import GenerationMixin
from .loading import MllamaPreTrainedModel
from .outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, accepts_past_key_values, returned
from .recording import Recording, attend, record_hidden, recorded
from .rotary import MllamaRotaryEmbedding, apply_rotary


class MllamaTextRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back before the weight (as Llama does).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class MllamaTextMLP(nn.Module):
    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """(B, L, n*d) -> (B, n, L, d)"""
    return x.view(x.shape[0], x.shape[1], n, d).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, n, L, d) -> (B, L, n*d)"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class _Projections(nn.Module):
    """q/k/v/o projections with grouped-query heads, shared by both attention kinds."""

    def __init__(self, config: MllamaTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)


class MllamaTextSelfAttention(_Projections):

    def forward(self, x, mask, rope, cache: MllamaCache | None, recording: Recording | None = None) -> torch.Tensor:
        q = _heads(self.q_proj(x), self.num_heads, self.head_dim)
        k = _heads(self.k_proj(x), self.num_key_value_heads, self.head_dim)
        v = _heads(self.v_proj(x), self.num_key_value_heads, self.head_dim)
        q, k = apply_rotary(q, k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # mask None means plain causal attention over the whole key range (no padding, no cache).
        out = attend(q, k, v, mask, recording, is_causal=mask is None and q.shape[2] > 1)
        return self.o_proj(_merge_heads(out))


class MllamaTextCrossAttention(_Projections):
    def __init__(self, config: MllamaTextConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_norm = MllamaTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = MllamaTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def project_states(self, states: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision states (B*N*T, P, H) -> K, V (B, n_kv, N*T*P, D); done once per image set."""
        k = self.k_proj(states).view(batch_size, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(batch_size, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v

    def forward(self, x, keys, values, mask, row_mask, recording: Recording | None = None) -> torch.Tensor:
        q = self.q_norm(_heads(self.q_proj(x), self.num_heads, self.head_dim))
        out = attend(q, keys, values, mask, recording)
        if row_mask is not None:
            out = out * row_mask  # Meta: rows that see no image get nothing from the images
        return self.o_proj(_merge_heads(out))


class MllamaSelfAttentionDecoderLayer(nn.Module):
    def __init__(self, config: MllamaTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MllamaTextSelfAttention(config, layer_idx)
        self.mlp = MllamaTextMLP(config)
        self.input_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, mask, rope, cache, recording: Recording | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, rope, cache, recording)
        return x + self.mlp(self.post_attention_layernorm(x))


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """Cross-attention block with tanh gates on the attention and the MLP branch."""

    def __init__(self, config: MllamaTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.cross_attn = MllamaTextCrossAttention(config, layer_idx)
        self.input_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = MllamaTextMLP(config)
        self.post_attention_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, keys, values, mask, row_mask, recording: Recording | None = None) -> torch.Tensor:
        """row_mask (B, 1, q, 1): 1 where the text row sees at least one image tile."""
        attn_rows = row_mask if self.config.semantics == "meta" else None
        attn = self.cross_attn(self.input_layernorm(x), keys, values, mask, attn_rows, recording)
        x = x + self.cross_attn_attn_gate.tanh() * attn
        m = self.mlp(self.post_attention_layernorm(x))
        if row_mask is not None:
            m = row_mask[:, 0] * m
        return x + self.cross_attn_mlp_gate.tanh() * m


class MllamaTextModel(MllamaPreTrainedModel):
    """Embeddings, decoder layers, final norm. Returns the last hidden state (B, L, H)."""

    config_class = MllamaTextConfig
    checkpoint_prefixes: ClassVar = (("language_model.model.", ""), ("model.", ""), ("", ""))

    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        # 8 extra rows: Meta's learnable image-token embeddings (<|image|> is row vocab_size).
        self.embed_tokens = nn.Embedding(config.vocab_size + 8, config.hidden_size, self.padding_idx)
        self.cross_attention_layers = list(config.cross_attention_layers)
        self.layers = nn.ModuleList(
            MllamaCrossAttentionDecoderLayer(config, i)
            if i in self.cross_attention_layers
            else MllamaSelfAttentionDecoderLayer(config, i)
            for i in range(config.num_hidden_layers)
        )
        self.norm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MllamaRotaryEmbedding(config)

    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        full_text_row_masked_out_mask: torch.Tensor | None = None,
        cache: MllamaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """cross_attention_states: projected vision states (B*N*T, P, H);
        cross_attention_mask: prepared additive mask (B, 1, q, N*T*P); full_text_row_masked_out_mask:
        (B, 1, q, 1). `MllamaModel` prepares both from the processor's (B, L, N, T) mask.
        hidden_states: the embeddings, then the output of each layer that ran (cross-attention
        layers do not run without pictures), the last one normalised."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, q_len = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = MllamaCache(len(self.layers), batch, q_len)
        if cache is not None:
            cache.begin(batch, q_len, attention_mask, x.device)
            mask = cache.self_attention_mask(x.dtype)
            if position_ids is None:
                position_ids = cache.default_positions()
        else:
            mask = causal_mask(attention_mask, q_len, x.dtype, x.device)
            if position_ids is None:
                position_ids = torch.arange(q_len, device=x.device)[None].expand(batch, -1)
        rope = self.rotary_emb(x, position_ids)
        # Cross layers run when this forward brings pictures or the cache holds some for its rows;
        # a text-only forward skips them (they would be an identity).
        cached_pictures = cross_attention_states is None and cache is not None and cache.runs_cross_layers(batch)
        if cached_pictures and full_text_row_masked_out_mask is None:
            # Never without row masks: a row without a picture must pass these layers unchanged.
            cross_attention_mask, full_text_row_masked_out_mask = cache.cross_masks(batch)

        recording = Recording.asked(self.config, output_hidden_states, output_attentions)
        record_hidden(recording, x)
        for layer in self.layers:
            if isinstance(layer, MllamaSelfAttentionDecoderLayer):
                x = layer(x, mask, rope, cache, recording)
            else:
                i = layer.layer_idx
                if cross_attention_states is not None:
                    keys, values = layer.cross_attn.project_states(cross_attention_states, batch)
                    if cache is not None:
                        cache.store_cross(i, keys, values)
                elif cached_pictures:
                    keys, values = cache.cross_keys[i][:batch], cache.cross_values[i][:batch]
                else:
                    continue
                x = layer(x, keys, values, cross_attention_mask, full_text_row_masked_out_mask, recording)
            record_hidden(recording, x)

        if cache is not None:
            cache.end(batch, q_len)
        x = self.norm(x)
        out = BaseModelOutputWithPast(last_hidden_state=x, cache=cache if use_cache else None, **recorded(recording, x))
        return returned(out, return_dict, self.config)


class MllamaForCausalLM(MllamaPreTrainedModel, GenerationMixin):
    """The text model with its LM head; loads the text half of a full Mllama checkpoint."""

    config_class = MllamaTextConfig
    checkpoint_prefixes: ClassVar = (
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.", "model."),
        ("lm_head.", "lm_head."),
    )

    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.model = MllamaTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        full_text_row_masked_out_mask: torch.Tensor | None = None,
        cache: MllamaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cross_attention_states=cross_attention_states,
            cross_attention_mask=cross_attention_mask,
            full_text_row_masked_out_mask=full_text_row_masked_out_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        logits = self.lm_head(hidden).float()
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        result = CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache,
                                        hidden_states=out.hidden_states, attentions=out.attentions)
        return returned(result, return_dict, self.config)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; label -100 is ignored (transformers' convention)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
    )
