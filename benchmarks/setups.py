"""Shared by the benchmark scripts: model presets, the same random weights in transformers and
in our model, inputs, timing. Benchmarks compare the two in one run on one machine."""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from model.checkpoint import map_keys  # noqa: E402

PRESETS = {
    # A medium model for 2 CPU cores: the 11B's structure, narrower and shallower.
    "medium": dict(
        vision=dict(image_size=112, patch_size=14, hidden_size=256, attention_heads=4, intermediate_size=1024,
                    num_hidden_layers=8, num_global_layers=2, intermediate_layers_indices=[2, 5],
                    vision_output_dim=768, max_num_tiles=4),
        text=dict(vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1536, num_hidden_layers=10, cross_attention_layers=[3, 8],
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        image_token=32000,
    ),
    # Narrow and deep: per-layer overhead dominates each decode step, as kernel launches do on a GPU.
    "narrow": dict(
        vision=dict(image_size=56, patch_size=14, hidden_size=64, attention_heads=2, intermediate_size=128,
                    num_hidden_layers=4, num_global_layers=1, intermediate_layers_indices=[1, 2],
                    vision_output_dim=192, max_num_tiles=4),
        text=dict(vocab_size=1000, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=20,
                  cross_attention_layers=[3, 8, 13, 18]),
        image_token=1000,
    ),
    # Llama-3.2-11B-Vision(-Instruct): the library defaults are its shapes; 560-px tiles.
    "11b": dict(vision=dict(image_size=560), text=dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}), image_token=128256),
}


def device_and_dtype() -> tuple[str, torch.dtype]:
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_pair(preset: str, seed: int = 0):
    """(transformers model, our model) sharing the same random weight tensors, on the device."""
    from transformers import MllamaConfig as HFConfig
    from transformers import MllamaForConditionalGeneration as HFModel

    spec = PRESETS[preset]
    device, dtype = device_and_dtype()
    torch.manual_seed(seed)
    hf_config = HFConfig(vision_config=spec["vision"], text_config=spec["text"], image_token_index=spec["image_token"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = HFModel(hf_config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # open the gates so every path does real work
        for name, param in hf.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate"):
                param.fill_(0.5)
    config = MllamaConfig.from_dict(hf_config.to_dict())
    config.semantics = "transformers"  # same math as the reference, so the work is identical
    with torch.device("meta"):
        ours = MllamaForConditionalGeneration(config)
    state = hf.state_dict()
    mapping = map_keys(list(state), MllamaForConditionalGeneration.checkpoint_prefixes)
    ours.load_state_dict({name: state[key] for key, name in mapping.items()}, assign=True)
    ours.eval().requires_grad_(False)
    return hf, ours


def make_inputs(model_config, batch: int = 1, prompt_len: int = 64, image: bool = True, seed: int = 0) -> dict:
    """One 4-tile (2x2) image per sample after a chat-like header, like an Instruct prompt."""
    device, dtype = device_and_dtype()
    g = torch.Generator().manual_seed(seed)
    vocab = model_config.text_config.vocab_size
    ids = torch.randint(10, vocab - 10, (batch, prompt_len), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if image:
        vc = model_config.vision_config
        ids[:, 5] = model_config.image_token_index
        cross = torch.ones(batch, prompt_len, 1, vc.max_num_tiles, dtype=torch.long)
        cross[:, :5] = 0
        out.update(
            pixel_values=torch.randn(batch, 1, vc.max_num_tiles, 3, vc.image_size, vc.image_size, generator=g).to(dtype),
            aspect_ratio_ids=torch.full((batch, 1), 6, dtype=torch.long),
            aspect_ratio_mask=torch.ones(batch, 1, vc.max_num_tiles, dtype=torch.long),
            cross_attention_mask=cross,
        )
    return {k: v.to(device) for k, v in out.items()}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
