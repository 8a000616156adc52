"""The oracle of the serving tests: what `generate()` alone answers for one conversation.

The engine batches requests that come and go, reuses K/V across turns and pads prompts that are
prefilled together; none of that may change an answer. Each answer is therefore compared with
`generate()` run on that conversation alone (greedy, float32). Batching changes the order of
float32 sums, so a step whose best two scores are closer than MARGIN could flip without any
defect: answers are compared token for token up to the first such step (`horizon`), which on
these random checkpoints is almost always the whole answer.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

MARGIN = 1e-4  # best-two gaps here are ~2e-2 (median); batching moves float32 logits by ~1e-7
WORDS = "what color shape how many describe the image picture red green blue circle square".split()


def picture(seed: int, aspect: tuple[int, int] | None = None) -> Image.Image:
    """Random pixels; `aspect` (w, h) in tiles picks the tiling, else a random small size."""
    rng = np.random.default_rng(seed)
    if aspect is None:
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    else:
        w, h = 28 * aspect[0] - 3, 28 * aspect[1] - 3  # the test checkpoints cut 28-px tiles
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def words(rng: random.Random, low: int = 1, high: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def user(text: str, image: Image.Image | None = None) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return {"role": "user", "content": content}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@dataclass
class Answer:
    token_ids: list[int]
    margins: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # (V,) float32 per step


class Oracle:
    """generate() alone on the engine's own checkpoint (the same model object is fine: generate
    keeps no state between calls)."""

    def __init__(self, model, processor) -> None:
        self.model, self.processor = model, processor
        self._lock = threading.Lock()

    def answer(self, messages: list[dict], max_new_tokens: int, **sampling) -> Answer:
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        inputs = {k: v.to(self.model.device) for k, v in dict(inputs).items() if torch.is_tensor(v)}
        with self._lock:
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                                      output_scores=True, output_logits=True, **({"do_sample": False} | sampling))
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
        return Answer(new, margins, [step[0] for step in out.logits])

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        return inputs["input_ids"][0].tolist()


def horizon(expected: Answer) -> int:
    """Steps whose token is clear: up to the first step with a best-two gap under MARGIN."""
    for step, margin in enumerate(expected.margins):
        if margin < MARGIN:
            return step
    return len(expected.token_ids)


def assert_same_answer(got: list[int], expected: Answer, what: str) -> None:
    h = horizon(expected)
    assert got[:h] == expected.token_ids[:h], (
        f"{what}: the engine answered {got} but generate() alone answers {expected.token_ids} "
        f"(compared over the first {h} tokens, where the choice is clear)")
    if h == len(expected.token_ids):
        assert got == expected.token_ids, f"{what}: {got} != {expected.token_ids}"
