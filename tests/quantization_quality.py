"""How far a quantized model is from the same weights unquantized: the measurement behind the
bounds in test_quantization.py and the table in benchmarks/RESULTS.md
(`python benchmarks/bench_quantization_quality.py` prints it).

Both models are ours, loaded from one random float32 checkpoint (reference.py's configs, saved by
transformers), one with `quantization=...`. Measured on one prompt, with a picture or text only:
- relative error of the prompt's logits, ||q - ref|| / ||ref||;
- greedy agreement: the unquantized model decodes 32 tokens greedily; the quantized model reads
  the same tokens, and the share of the 32 steps where its own greedy pick is the same token;
- steps until the first difference when each model decodes greedily on its own (32 = none).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from reference import VARIANTS, ImageSpec, Variant, build_hf_model, make_inputs, relative_error, save_hf

STEPS = 32
# The configs measured: reference.py's, and a wider one whose layers take int4 groups of 128.
QUALITY_VARIANTS = {v.name: v for v in VARIANTS} | {
    "wide_128": Variant("wide_128", text=dict(hidden_size=128, intermediate_size=384, num_attention_heads=4,
                                              num_key_value_heads=2)),
}
# int4 on the CPU packs output channels by 16; deeper_gqa4's k/v projections have 8 (1 head of 8).
INT4_VARIANTS = ["base", "two_tiles_42px_mha_no_rope_scaling", "wide_128"]


@dataclass(frozen=True)
class Quality:
    logits_error: float
    agreement: float
    steps_identical: int


def write_checkpoint(variant: str, seed: int, folder: Path) -> tuple[Path, dict[str, dict]]:
    """A random float32 checkpoint of `variant` in `folder`, and its prompts: {"picture": ..., "text": ...}."""
    hf = build_hf_model(QUALITY_VARIANTS[variant], seed=seed)
    save_hf(hf, folder)
    prompts = {kind: make_inputs(hf, samples=samples, length=12, seed=seed)
               for kind, samples in (("picture", [[ImageSpec(1, 2)]]), ("text", [[]]))}
    return folder, prompts


@torch.inference_mode()
def measure(reference, quantized, inputs: dict) -> Quality:
    prompt_len = inputs["input_ids"].shape[1]
    ref_out = reference.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=[])
    own_out = quantized.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=[])
    # Teacher-forced: the quantized model reads the reference's continuation; its pick at each step.
    forced = dict(inputs, input_ids=ref_out, attention_mask=torch.ones_like(ref_out))
    if "cross_attention_mask" in inputs:
        last = inputs["cross_attention_mask"][:, -1:]
        forced["cross_attention_mask"] = torch.cat([inputs["cross_attention_mask"]] + [last] * STEPS, dim=1)
    ref_logits = reference(**forced).logits
    q_logits = quantized(**forced).logits
    picks = q_logits[0, prompt_len - 1 : -1].argmax(-1)
    agreement = (picks == ref_out[0, prompt_len:]).float().mean().item()
    differ = (own_out[0, prompt_len:] != ref_out[0, prompt_len:]).nonzero()
    steps_identical = int(differ[0, 0]) if len(differ) else STEPS
    error = relative_error(q_logits[:, :prompt_len], ref_logits[:, :prompt_len])
    return Quality(error, agreement, steps_identical)
