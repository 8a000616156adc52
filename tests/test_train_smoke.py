"""scripts/train_tiny.py on a tiny budget: it trains, and writes a checkpoint our classes and the
chat template can use (the full run is not part of the test suite)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from model import MllamaForConditionalGeneration, MllamaProcessor
from scripts import synthetic, train_tiny

OFFICIAL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "chat_template.json", "preprocessor_config.json")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_smoke")
    report = train_tiny.main(["--out", str(out), "--steps", "3", "--batch-size", "2", "--pool", "4", "--eval", "2",
                              "--eval-every", "2"])
    return out, report


def test_smoke_run_writes_the_official_layout(smoke_run):
    out, _ = smoke_run
    missing = [name for name in OFFICIAL_FILES if not (out / name).is_file()]
    assert not missing, f"the training script did not write {missing}"


def test_smoke_run_reports_its_accuracy(smoke_run):
    out, report = smoke_run
    saved = json.loads((out / "training_report.json").read_text())
    assert saved == report, "training_report.json differs from what main() returned"
    assert set(report["held_out_exact_match"]) == set(synthetic.TASKS), f"report lacks tasks: {report}"
    assert all(0.0 <= v <= 1.0 for v in report["held_out_exact_match"].values()), f"accuracies out of range: {report}"


def test_smoke_checkpoint_answers_through_processor_and_generate(smoke_run):
    out, _ = smoke_run
    model = MllamaForConditionalGeneration.from_pretrained(out).eval()
    processor = MllamaProcessor.from_pretrained(out)
    image = synthetic.make_sample(random.Random(0)).image
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What color is the shape?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=3)
    prompt = inputs["input_ids"]
    assert output.shape[1] > prompt.shape[1] and torch.equal(output[:, :prompt.shape[1]], prompt), (
        f"generate returned {output.tolist()} for the prompt {prompt.tolist()}")


def test_training_prompts_are_the_chat_templates_tokens(smoke_run):
    """The script builds ids segment by segment; they must equal what the processor makes from
    the same multi-turn conversation, or the model would be trained on prompts it never sees."""
    out, _ = smoke_run
    processor = MllamaProcessor.from_pretrained(out)
    from tokenizers import Tokenizer

    encoder = train_tiny.ChatEncoder(Tokenizer.from_file(str(out / "tokenizer.json")))
    qa = [("What colour are the shapes?", "Red."), ("how many shapes?", "Two."), ("DESCRIBE THE IMAGE", "Two red circles.")]
    messages = []
    for turn, (question, answer) in enumerate(qa):
        image = [{"type": "image", "image": synthetic.make_sample(random.Random(1)).image}] if turn == 0 else []
        messages.append({"role": "user", "content": image + [{"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    expected = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    ids, labels = encoder.conversation(qa)
    assert expected["input_ids"][0].tolist() == ids, "training ids differ from the chat template's tokens"
    answer_tokens = [t for t, label in zip(ids, labels) if label != -100]
    assert processor.decode(answer_tokens) == "Red.<|eot_id|>Two.<|eot_id|>Two red circles.<|eot_id|>", (
        "the loss is not on exactly the answers and their <|eot_id|>")


def test_init_opens_the_gates(smoke_run):
    config = MllamaForConditionalGeneration.from_pretrained(smoke_run[0]).config
    model = MllamaForConditionalGeneration(config)
    train_tiny.init_weights(model, gate=0.5)
    gates = {n: p.item() for n, p in model.named_parameters() if n.endswith("cross_attn_attn_gate")}
    assert gates and all(g == 0.5 for g in gates.values()), f"cross-attention gates not opened: {gates}"
    assert model.vision_model.gated_positional_embedding.gate.item() == 0.0, (
        "the positional embedding should start as the plain per-patch table")
