"""assets/tiny-mllama, the embedded default: it really looks at the picture.

Questions go through the processor's chat template and `generate` (greedy), as in the app.
The pictures are drawn with a seed the training never used and with odd canvas sides, while
training used only even ones, so no canvas size here was seen exactly in training.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from model import MllamaForConditionalGeneration, MllamaProcessor
from scripts import synthetic

ASSET = Path(__file__).resolve().parents[1] / "assets" / "tiny-mllama"
SEED = 20261126  # training draws with seeds 1 (pool) and 1000003 (its own held-out report)
OFFICIAL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "chat_template.json", "preprocessor_config.json")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MllamaForConditionalGeneration.from_pretrained(ASSET).eval(), MllamaProcessor.from_pretrained(ASSET)


@pytest.fixture(scope="module")
def fresh_samples() -> list[synthetic.Sample]:
    rng = random.Random(SEED)
    return [synthetic.make_sample(rng, parity=1) for _ in range(200)]


def user(text: str, image=None) -> dict:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def answer_all(tiny, conversations: list[list[dict]], batch_size: int = 50) -> list[str]:
    """Greedy replies to a batch of conversations (left-padded, as generation needs)."""
    model, processor = tiny
    replies = []
    for start in range(0, len(conversations), batch_size):
        inputs = processor.apply_chat_template(conversations[start:start + batch_size], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt",
                                               padding=True, padding_side="left")
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        replies += processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return replies


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def is_right(task: str, reply: str, sample: synthetic.Sample) -> bool:
    """The reply says exactly the expected answer, ignoring case and punctuation."""
    return words(reply) == words(synthetic.answer(task, sample.color, sample.shape, sample.count))


def accuracy(tiny, samples, task: str, question=None) -> tuple[float, list[str]]:
    questions = [question or synthetic.question(task, s.count) for s in samples]
    replies = answer_all(tiny, [[user(q, s.image)] for q, s in zip(questions, samples)])
    right = [is_right(task, r, s) for r, s in zip(replies, samples)]
    wrong = [f"{s.count} {s.color} {s.shape} {s.image.size}: {q!r} -> {r!r}"
             for q, r, s, ok in zip(questions, replies, samples, right) if not ok]
    return sum(right) / len(samples), wrong


def test_checkpoint_is_complete_and_small():
    missing = [name for name in OFFICIAL_FILES if not (ASSET / name).is_file()]
    assert not missing, f"assets/tiny-mllama lacks {missing}"
    size = sum(f.stat().st_size for f in ASSET.iterdir() if f.is_file())
    assert size < 15 * 2**20, f"assets/tiny-mllama is {size / 2**20:.1f} MB; the budget is 15 MB"


@pytest.mark.parametrize("task, bar", [("color", 0.97), ("shape", 0.90), ("count", 0.90)])
def test_answers_about_fresh_pictures_are_right(tiny, fresh_samples, task, bar):
    score, wrong = accuracy(tiny, fresh_samples, task)
    assert score >= bar, f"{task}: {score:.1%} right on 200 fresh pictures (bar {bar:.0%}); wrong: {wrong[:10]}"


def test_description_names_count_colour_and_shape(tiny, fresh_samples):
    score, wrong = accuracy(tiny, fresh_samples, "describe")
    assert score >= 0.85, f"describe: {score:.1%} exactly right on 200 fresh pictures; wrong: {wrong[:10]}"


def test_swapping_the_picture_for_another_colour_changes_the_answer(tiny):
    """Same layout, canvas and background; only the shapes' colour differs between pictures."""
    conversations, expected = [], []
    for layout in range(5):
        for color in synthetic.COLORS:
            rng = random.Random(SEED + layout)
            image = synthetic.draw_picture(rng, color, synthetic.SHAPES[layout % 3], 1 + layout % 3, (301, 177))
            conversations.append([user("What color is the shape?" if layout % 3 == 0 else
                                       "What color are the shapes?", image)])
            expected.append(color)
    replies = answer_all(tiny, conversations)
    wrong = [(c, r) for c, r in zip(expected, replies) if words(r) != [c]]
    assert not wrong, f"(colour drawn, reply) pairs where the reply did not follow the picture: {wrong}"


@pytest.mark.parametrize("question", ["what colour is the shape", "WHAT COLOR IS THE SHAPE?",
                                      "What colour are the shapes?", "What is the colour of the shape"])
def test_colour_question_phrased_differently_still_works(tiny, fresh_samples, question):
    score, wrong = accuracy(tiny, fresh_samples[:50], "color", question)
    assert score >= 0.97, f"{question!r}: {score:.0%} right on 50 pictures; wrong: {wrong[:5]}"


@pytest.mark.parametrize("follow_up", ["shape", "count"])
def test_follow_up_question_is_answered_from_the_first_turns_image(tiny, fresh_samples, follow_up):
    samples = fresh_samples[:60]
    first = [[user(synthetic.question("color", s.count), s.image)] for s in samples]
    first_replies = answer_all(tiny, first)
    second = [conv + [assistant(reply), user(synthetic.question(follow_up, s.count))]
              for conv, reply, s in zip(first, first_replies, samples)]
    replies = answer_all(tiny, second)
    right = [is_right(follow_up, r, s) for r, s in zip(replies, samples)]
    assert sum(right) / len(samples) >= 0.9, (
        f"follow-up {follow_up}: {sum(right)}/{len(samples)} right; "
        f"wrong: {[(s.count, s.color, s.shape, r) for r, s, ok in zip(replies, samples, right) if not ok][:5]}")


def test_transformers_gives_the_same_logits_on_the_shipped_checkpoint(tiny, fresh_samples):
    """Format proof: transformers loads the folder unchanged; our transformers-compatible mode
    reproduces its logits."""
    from transformers import AutoProcessor
    from transformers import MllamaForConditionalGeneration as ReferenceModel

    ours = MllamaForConditionalGeneration.from_pretrained(ASSET, semantics="transformers").eval()
    reference = ReferenceModel.from_pretrained(ASSET).eval()
    reference_processor = AutoProcessor.from_pretrained(ASSET)
    _, processor = tiny
    sample = fresh_samples[0]
    conversation = [user("What shape is this?", sample.image), assistant("Circle."), user("How many shapes are there?")]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    hub_conversation = [{"role": m["role"], "content": [{"type": c["type"], **({"text": c["text"]} if "text" in c else {})}
                                                        for c in m["content"]]} for m in conversation]
    text = reference_processor.apply_chat_template(hub_conversation, add_generation_prompt=True)
    reference_inputs = reference_processor(images=[sample.image], text=text, add_special_tokens=False,
                                           return_tensors="pt")
    assert torch.equal(inputs["input_ids"], reference_inputs["input_ids"]), "the two processors tokenize differently"
    with torch.no_grad():
        expected = reference(**reference_inputs).logits
        got = ours(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"logits differ from transformers on the shipped checkpoint: {m}")


def test_image_token_of_config_and_tokenizer_agree():
    config = json.loads((ASSET / "config.json").read_text())
    tokenizer = json.loads((ASSET / "tokenizer.json").read_text())
    image_ids = [t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<|image|>"]
    assert image_ids == [config["image_token_index"]], (
        f"<|image|> is {image_ids} in tokenizer.json but image_token_index is {config['image_token_index']}")


def test_ui_examples_are_answered_right(tiny):
    from PIL import Image

    folder = ASSET.parent / "examples"
    entries = json.loads((folder / "examples.json").read_text())
    replies = answer_all(tiny, [[user(e["question"], Image.open(folder / e["image"]))] for e in entries])
    wrong = [(e["image"], e["question"], r) for e, r in zip(entries, replies) if words(r) != words(e["answer"])]
    assert not wrong, f"suggested questions answered wrongly: {wrong}"
