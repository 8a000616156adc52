"""Reference models and inputs for parity tests: small random Mllama configs built with
transformers (test-only dependency), saved with `save_pretrained`, and hand-built inputs that
follow the processor's conventions (image tokens, aspect-ratio ids and masks, cross masks)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

IMAGE_TOKEN = 300
VOCAB = 300

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

BASE_VISION = dict(
    image_size=28,
    patch_size=14,
    hidden_size=16,
    attention_heads=2,
    intermediate_size=32,
    num_hidden_layers=5,
    num_global_layers=2,
    intermediate_layers_indices=[1, 3],
    vision_output_dim=48,
    max_num_tiles=4,
)
BASE_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    num_hidden_layers=4,
    cross_attention_layers=[1],
    rope_theta=10000.0,
    rope_scaling=LLAMA3_ROPE,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@dataclass
class Variant:
    """A small config; fields override BASE_VISION / BASE_TEXT."""

    name: str
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    image_token: int = IMAGE_TOKEN

    def hf_config(self):
        from transformers import MllamaConfig

        vision = {**copy.deepcopy(BASE_VISION), **self.vision}
        text = {**copy.deepcopy(BASE_TEXT), **self.text}
        if text.get("rope_scaling") is None:
            text.pop("rope_scaling")
        return MllamaConfig(vision_config=vision, text_config=text, image_token_index=self.image_token)


VARIANTS = [
    Variant("base"),
    Variant(
        "two_tiles_42px_mha_no_rope_scaling",
        vision=dict(image_size=42, max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
                    num_hidden_layers=4, intermediate_layers_indices=[1, 2, 3], vision_output_dim=64),
        # Not layer 0: transformers sizes its decode mask from cache layer 0, which breaks when
        # that layer is a cross-attention layer (real checkpoints start with self-attention).
        text=dict(num_key_value_heads=4, rope_scaling=None, cross_attention_layers=[1, 3]),
    ),
    Variant(
        "deeper_gqa4",
        vision=dict(num_hidden_layers=6, num_global_layers=1, intermediate_layers_indices=[2, 5]),
        text=dict(num_key_value_heads=1, num_hidden_layers=6, cross_attention_layers=[2, 5]),
    ),
]


def build_hf_model(variant: Variant, seed: int = 0):
    """A random transformers model in float32, gates opened (they start at 0, which hides bugs)."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(variant.hf_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate"):
                param.uniform_(0.3, 0.9)
            if "tile_embedding" in name or "embedding.weight" in name:
                param.normal_(0, 0.5)
    return model


def aspect_ratios(hf_model) -> list[list[int]]:
    return hf_model.config.vision_config.supported_aspect_ratios


@dataclass
class ImageSpec:
    """One image of a sample: its aspect-ratio id (1-based) and the position of its <|image|>."""

    ratio_id: int
    position: int


def make_inputs(hf_model, samples: list[list[ImageSpec]], length: int, pad_left: list[int] | None = None, seed: int = 1):
    """Inputs for a batch: random text with <|image|> tokens where given; left padding per sample.

    Cross-attention spans follow the processor: an image is seen from its token up to the next
    image's token (the last one until the end); tokens before the first image see nothing.
    """
    g = torch.Generator().manual_seed(seed)
    vc = hf_model.config.vision_config
    ratios = vc.supported_aspect_ratios
    tiles, size = vc.max_num_tiles, vc.image_size
    batch = len(samples)
    n_images = max((len(s) for s in samples), default=0)
    pad_left = pad_left or [0] * batch
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for b, pad in enumerate(pad_left):
        input_ids[b, :pad] = 0
        attention_mask[b, :pad] = 0
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if n_images == 0:
        return out
    ids = torch.zeros(batch, n_images, dtype=torch.long)
    ar_mask = torch.zeros(batch, n_images, tiles, dtype=torch.long)
    ar_mask[:, :, 0] = 1  # the processor marks tile 0 of every slot, even empty ones
    cross = torch.zeros(batch, length, n_images, tiles, dtype=torch.long)
    pixels = torch.zeros(batch, n_images, tiles, 3, size, size)
    for b, images in enumerate(samples):
        starts = [pad_left[b] + im.position for im in images]
        for k, im in enumerate(images):
            rows, cols = ratios[im.ratio_id - 1]
            n = rows * cols
            input_ids[b, starts[k]] = IMAGE_TOKEN
            ids[b, k] = im.ratio_id
            ar_mask[b, k, :n] = 1
            end = starts[k + 1] if k + 1 < len(images) else length
            cross[b, starts[k]:end, k, :n] = 1
            pixels[b, k, :n] = torch.randn(n, 3, size, size, generator=g)
    out.update(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=ar_mask, cross_attention_mask=cross)
    return out


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm()).item()


def save_hf(hf_model, folder, max_shard_size=None) -> str:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf_model.save_pretrained(folder, **kwargs)
    return str(folder)
