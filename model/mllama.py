"""The whole model: vision tower -> projector -> text decoder with cross-attention.

Parameter names are the checkpoint keys (`vision_model.`, `multi_modal_projector.`,
`language_model.model.`, `language_model.lm_head.`).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .cache import MllamaCache, prepare_cross_attention_mask
from .config import MllamaConfig
from .generation import GenerationMixin
from .loading import MllamaPreTrainedModel
from .outputs import (
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
    accepts_past_key_values,
    returned,
)
from .text import MllamaForCausalLM, MllamaTextModel, causal_lm_loss
from .vision import MllamaVisionModel, like_param


def check_image_tokens(input_ids: torch.Tensor, aspect_ratio_ids: torch.Tensor, image_token_id: int) -> None:
    tokens = (input_ids == image_token_id).sum(-1).tolist()
    images = (aspect_ratio_ids != 0).sum(-1).tolist()
    for b, (t, i) in enumerate(zip(tokens, images)):
        if t != i:
            raise ValueError(
                f"sample {b} has {t} <|image|> token(s) but {i} image(s): each image needs exactly one "
                "<|image|> token in the text (the processor's chat template puts them there)"
            )


class _VisionLanguageModel(MllamaPreTrainedModel):
    """Vision tower -> projector -> `language_model` (the text model, with or without head)."""

    config_class = MllamaConfig
    language_model_class: ClassVar[type]

    def __init__(self, config: MllamaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = MllamaVisionModel(config.vision_config)
        self.multi_modal_projector = nn.Linear(
            config.vision_config.vision_output_dim, config.text_config.hidden_size, bias=True
        )
        self.language_model = self.language_model_class(config.text_config)


class MllamaModel(_VisionLanguageModel):
    """Vision tower, projector and text model, without the LM head."""

    language_model_class = MllamaTextModel
    checkpoint_prefixes: ClassVar = (
        ("vision_model.", "vision_model."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("language_model.model.", "language_model."),
    )

    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MllamaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MultimodalBaseModelOutputWithPast | tuple:
        out = _forward_multimodal(self, self.language_model, **_locals(locals(), drop=("return_dict",)))
        return returned(out, return_dict, self.config)


class MllamaForConditionalGeneration(_VisionLanguageModel, GenerationMixin):
    """Mllama with its LM head: `model(**processor(...)).logits`, `model.generate(**inputs)`."""

    language_model_class = MllamaForCausalLM
    checkpoint_prefixes: ClassVar = (("", ""),)

    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MllamaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MultimodalCausalLMOutputWithPast | tuple:
        out = _forward_multimodal(
            self, self.language_model.model, **_locals(locals(), drop=("labels", "logits_to_keep", "return_dict"))
        )
        hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        logits = self.language_model.lm_head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        result = MultimodalCausalLMOutputWithPast(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
            attentions=out.attentions, image_outputs=out.image_outputs,
        )
        return returned(result, return_dict, self.config)


def _locals(values: dict, drop: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in values.items() if k not in ("self", "__class__") + drop}


def _forward_multimodal(
    owner: nn.Module,
    text_model: MllamaTextModel,
    *,
    input_ids,
    pixel_values,
    aspect_ratio_mask,
    aspect_ratio_ids,
    attention_mask,
    cross_attention_mask,
    cross_attention_states,
    position_ids,
    cache,
    inputs_embeds,
    use_cache,
    output_attentions,
    output_hidden_states,
) -> MultimodalBaseModelOutputWithPast:
    """Shared by MllamaModel and MllamaForConditionalGeneration: images -> cross states and
    masks for the rows being processed, then the text model. The vision tower's own output is
    returned as `image_outputs` (its last hidden state only, as transformers does)."""
    config: MllamaConfig = owner.config
    if pixel_values is not None and cross_attention_states is not None:
        raise ValueError("Pass pixel_values or cross_attention_states, not both")
    use_cache = config.text_config.use_cache if use_cache is None else use_cache
    tokens = input_ids if input_ids is not None else inputs_embeds
    batch, q_len = tokens.shape[:2]
    if cache is None and use_cache:
        cache = MllamaCache(len(text_model.layers), batch, q_len)

    image_outputs = None
    if pixel_values is not None:
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise ValueError(
                "pixel_values were given without aspect_ratio_ids/aspect_ratio_mask: pass every image field "
                "the processor returns (e.g. model(**inputs))"
            )
        if cross_attention_mask is None:
            raise ValueError(
                "pixel_values were given without cross_attention_mask: the processor builds it when it gets "
                "both text and images; pass it along (e.g. model(**inputs))"
            )
        if input_ids is not None:
            check_image_tokens(input_ids, aspect_ratio_ids, config.image_token_index)
        image_outputs = owner.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask, return_dict=True)
        projector = owner.multi_modal_projector
        states = projector(like_param(image_outputs.last_hidden_state, projector.weight))
        cross_attention_states = states.reshape(-1, states.shape[-2], states.shape[-1])  # (B*N*T, P, H)

    has_images = cross_attention_states is not None or (cache is not None and cache.runs_cross_layers(batch))
    row_mask = None
    dtype = text_model.embed_tokens.weight.dtype
    num_patches = config.vision_config.num_patches
    if not has_images:
        cross_attention_mask = None
    elif cross_attention_mask is None:
        if cache is None or cross_attention_states is not None:
            raise ValueError("images need a cross_attention_mask (B, seq_len, num_images, num_tiles)")
        # New tokens see what the last prompt token saw: the text model takes those masks from the cache.
    else:
        if cross_attention_mask.shape[1] != q_len:
            # A mask over the whole sequence so far (transformers' calling convention).
            past = cache.get_seq_length() if cache is not None else 0
            cross_attention_mask = cross_attention_mask[:, past : past + q_len]
        if cache is not None:
            cache.set_cross_mask_row(cross_attention_mask[:, -1:], num_patches, dtype)
        cross_attention_mask, row_mask = prepare_cross_attention_mask(cross_attention_mask, num_patches, dtype)

    out = text_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cross_attention_states=cross_attention_states,
        cross_attention_mask=cross_attention_mask,
        full_text_row_masked_out_mask=row_mask,
        cache=cache,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        return_dict=True,
    )
    return MultimodalBaseModelOutputWithPast(
        last_hidden_state=out.last_hidden_state, cache=out.cache, hidden_states=out.hidden_states,
        attentions=out.attentions, image_outputs=image_outputs,
    )
