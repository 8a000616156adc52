"""generate() feeding a TextIteratorStreamer from another thread, as the app does."""
from __future__ import annotations

import threading

import pytest
import torch

from engine_checkpoint import write_engine_checkpoint
from model import MllamaForConditionalGeneration, MllamaProcessor, TextIteratorStreamer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = write_engine_checkpoint(tmp_path_factory.mktemp("stream_ck"), seed=4)
    model = MllamaForConditionalGeneration.from_pretrained(folder)
    processor = MllamaProcessor.from_pretrained(folder)
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "Tell me about the picture"}], add_generation_prompt=True,
        tokenize=True, return_dict=True, return_tensors="pt")
    return model, processor, inputs


def start(model, inputs, streamer, **kwargs):
    result = {}

    def work():
        try:
            result["ids"] = model.generate(**inputs, streamer=streamer, **kwargs)
        except Exception as error:  # the consumer sees it through the streamer
            result["error"] = error

    thread = threading.Thread(target=work)
    thread.start()
    return thread, result


def test_concatenated_stream_equals_decoding_the_new_tokens(setup):
    model, processor, inputs = setup
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=30)
    thread, result = start(model, inputs, streamer, max_new_tokens=60, do_sample=True, temperature=1.5, seed=1,
                           eos_token_id=None)
    pieces = list(streamer)
    thread.join()
    new = result["ids"][0, inputs["input_ids"].shape[1]:]
    assert len(pieces) > 5
    # Random tokens of a byte-level vocabulary split many multi-byte characters across tokens;
    # (tests/test_streamer.py checks pieces never hold half of a valid character).
    assert "".join(pieces) == processor.decode(new, skip_special_tokens=True)


def test_cancelling_mid_stream_ends_promptly_and_the_model_stays_usable(setup):
    model, processor, inputs = setup
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, timeout=30)
    thread, result = start(model, inputs, streamer, max_new_tokens=400, do_sample=False, eos_token_id=None)
    received = 0
    for _ in streamer:
        received += 1
        if received == 3:
            streamer.cancel()
    thread.join()
    produced = result["ids"].shape[1] - inputs["input_ids"].shape[1]
    assert produced < 50, f"generation went on for {produced} tokens after the cancel"
    again = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None)
    n = min(again.shape[1], result["ids"].shape[1])
    assert torch.equal(again[:, :n], result["ids"][:, :n]), "the next request should run as if nothing happened"


def test_an_error_in_the_worker_is_raised_in_the_consumer(setup):
    model, processor, inputs = setup
    broken = dict(inputs, pixel_values=torch.zeros(1, 1, 4, 3, 28, 28))  # no aspect ratios, no image token
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, timeout=30)
    thread, result = start(model, broken, streamer, max_new_tokens=5)
    with pytest.raises(ValueError, match="aspect_ratio_ids"):
        list(streamer)
    thread.join()
    assert isinstance(result["error"], ValueError)
