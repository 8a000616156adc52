"""MllamaProcessor equals transformers' MllamaProcessor on the same tokenizer.json and template."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.batch_feature import BatchFeature
from model.chat_template import ChatTemplateError
from model.processing import MllamaProcessor, get_cross_attention_token_mask
from scripts.make_tokenizer import build_small_tokenizer, special_tokens

DATE = {"date_string": "26 Jul 2024"}
rng = np.random.default_rng(7)


def picture(width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(mllama_processor_dir) -> MllamaProcessor:
    return MllamaProcessor.from_pretrained(mllama_processor_dir)


def assert_equal_features(ours, ref, what: str) -> None:
    assert set(ours.keys()) == set(ref.keys()), f"{what}: keys {sorted(ours.keys())} != {sorted(ref.keys())}"
    for key in ref.keys():
        expected = torch.as_tensor(np.asarray(ref[key]))
        got = torch.as_tensor(np.asarray(ours[key]))
        assert got.shape == expected.shape, f"{what}: {key} shape {tuple(got.shape)} != {tuple(expected.shape)}"
        if key == "pixel_values":
            assert torch.allclose(got, expected, atol=1e-5), f"{what}: pixel_values differ"
        else:
            assert torch.equal(got, expected), f"{what}: {key} differs"


# ----------------------------------------------------------------------------- parity with transformers
CALLS = {
    "text_only": dict(text="If I had to write a haiku"),
    "one_image": dict(text="<|image|>If I had to write a haiku for this one", images=lambda: picture(100, 50)),
    "image_after_text": dict(text="Hi <|image|> what is this?", images=lambda: [picture(640, 480)]),
    "several_images": dict(text="Look <|image|> then <|image|><|image|> and that is all",
                           images=lambda: [[picture(30, 40), picture(900, 600), picture(50, 1200)]]),
    "padded_batch_right": dict(text=["<|image|>Short one", "A much longer text with <|image|><|image|> two images"],
                               images=lambda: [[picture(80, 60)], [picture(60, 80), picture(700, 300)]],
                               padding=True),
    "padded_batch_left": dict(text=["<|image|>Short one", "A much longer text with <|image|> one image here"],
                              images=lambda: [[picture(80, 60)], [picture(60, 80)]], padding=True,
                              padding_side="left"),
    "text_with_bos_already": dict(text="<|begin_of_text|><|image|>Describe", images=lambda: picture(20, 20)),
}


@pytest.mark.parametrize("case", sorted(CALLS))
def test_call_equals_transformers(case, processor, reference_processor):
    kwargs = dict(CALLS[case])
    if "images" in kwargs:
        kwargs["images"] = kwargs["images"]()
    ref = reference_processor(**kwargs, return_tensors="pt")
    assert_equal_features(processor(**kwargs, return_tensors="pt"), ref, case)


CONVERSATIONS = {
    "text_only": [{"role": "user", "content": "Hello"}],
    "one_image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
    "system_and_image": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
    "multi_turn": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
                   {"role": "user", "content": [{"type": "text", "text": "And the background?"}]}],
    "two_images_two_turns": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First."}]},
                             {"role": "assistant", "content": "Ok."},
                             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Second?"}]}],
}


def with_images(conversation: list[dict], images: list) -> list[dict]:
    """A copy whose image parts carry the given images (PIL image or path) in order."""
    pending = iter(images)
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else
             [{**p, "image": next(pending)} if p["type"] == "image" else p for p in m["content"]]}
            for m in conversation]


@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_apply_chat_template_tokenized_equals_transformers(case, processor, reference_processor, tmp_path):
    count = sum(1 for m in CONVERSATIONS[case] if not isinstance(m["content"], str)
                for p in m["content"] if p["type"] == "image")
    paths = []
    for i in range(count):  # images given by path exercise the loading inside apply_chat_template
        picture(60 + 400 * i, 90).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    messages = with_images(CONVERSATIONS[case], paths)
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **DATE)
    assert_equal_features(processor.apply_chat_template(messages, **kwargs),
                          reference_processor.apply_chat_template(messages, **kwargs), case)


def test_apply_chat_template_batch_with_inline_pil_images_equals_transformers(processor, reference_processor):
    batch = [with_images(CONVERSATIONS["one_image"], [picture(300, 200)]),
             with_images(CONVERSATIONS["multi_turn"], [picture(200, 900)])]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True,
                  **DATE)
    assert_equal_features(processor.apply_chat_template(batch, **kwargs),
                          reference_processor.apply_chat_template(batch, **kwargs), "batch")


def test_apply_chat_template_without_return_dict_gives_input_ids_like_transformers(processor, reference_processor):
    messages = CONVERSATIONS["text_only"]
    ours = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **DATE)
    assert ours == reference_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **DATE)


def test_chat_prompt_gets_a_single_bos(processor):
    messages = with_images(CONVERSATIONS["one_image"], [picture(20, 20)])
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(128000) == 1 and ids[0] == 128000, f"expected one leading <|begin_of_text|>, got {ids[:4]}"


@pytest.mark.parametrize("skip", [False, True])
def test_decode_equals_transformers(processor, reference_processor, skip):
    ids = processor(text=["What color is the shape?<|eot_id|>", "Hello world!"], padding=True)["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=skip) == \
        reference_processor.batch_decode(ids, skip_special_tokens=skip)
    assert processor.decode(ids[0], skip_special_tokens=skip) == \
        reference_processor.decode(ids[0], skip_special_tokens=skip)


# ----------------------------------------------------------------------------- special tokens and masks
def test_special_token_ids_are_the_real_ones(processor):
    tok = processor.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128009, 128004)
    assert tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>",
                                      "<|reserved_special_token_246|>", "<|image|>"]) == \
        [128006, 128007, 128008, 128010, 128255, 128256]
    assert len(tok) == 128257


def test_small_tokenizer_keeps_the_special_names_after_its_vocabulary():
    tokenizer = build_small_tokenizer(vocab_size=300)
    assert [tokenizer.token_to_id(t) for t in special_tokens()] == list(range(300, 300 + 257))


@pytest.mark.parametrize("tokens, spans", [
    ([1, 1, 1, 1, 1, 9, 1, 1, 1], [[5, -1]]),
    ([1, 9, 1, 1, 9, 1, 1], [[1, 4], [4, 7]]),
    ([1, 9, 9, 1, 1, 1], [[1, 6], [2, 6]]),
    ([1, 9, 9, 1, 9, 1, 1], [[1, 4], [2, 4], [4, 7]]),
    ([1, 1], []),
])
def test_cross_attention_spans_follow_the_spec_examples(tokens, spans):
    assert get_cross_attention_token_mask(tokens, image_token_id=9) == spans


def test_cross_attention_mask_hides_padded_tiles_and_text_before_the_image(processor):
    out = processor(text="Hi <|image|> there", images=picture(900, 500), return_tensors="pt")  # 2 tiles
    mask = out["cross_attention_mask"][0, :, 0]
    position = out["input_ids"][0].tolist().index(128256)
    assert mask[:position].sum() == 0, "text before the image must not see it"
    assert mask[position:, :2].all() and mask[:, 2:].sum() == 0, "only the image's 2 real tiles are visible"


def test_text_only_call_has_no_image_fields(processor):
    assert set(processor(text="Hello").keys()) == {"input_ids", "attention_mask"}


def test_batch_feature_moves_and_unpacks(processor):
    out = processor(text="<|image|>Hi", images=picture(10, 10), return_tensors="pt").to("cpu")
    assert isinstance(out, BatchFeature)
    as_kwargs = (lambda **kw: kw)(**out)
    assert set(as_kwargs) == set(out.keys()) == {"input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids",
                                                 "aspect_ratio_mask", "cross_attention_mask"}
    half = out.to(torch.bfloat16)
    assert half["pixel_values"].dtype == torch.bfloat16 and half["input_ids"].dtype == torch.int64


def test_fast_image_processor_can_be_chosen(mllama_processor_dir):
    processor = MllamaProcessor.from_pretrained(mllama_processor_dir, use_fast=True)
    assert processor(text="<|image|>Hi", images=picture(10, 10))["pixel_values"].shape == (1, 1, 4, 3, 560, 560)


# ----------------------------------------------------------------------------- bad input
def test_more_image_tokens_than_images_is_refused(processor):
    with pytest.raises(ValueError, match=r"Found \[2\] <\|image\|> tokens.*\[1\] images.*exactly one image"):
        processor(text="<|image|>a<|image|>b", images=[picture(10, 10)])


def test_more_images_than_image_tokens_is_refused(processor):
    with pytest.raises(ValueError, match=r"Found \[1\] <\|image\|> tokens.*\[2\] images"):
        processor(text="<|image|>a", images=[picture(10, 10), picture(12, 12)])


def test_image_tokens_without_images_are_refused(processor):
    with pytest.raises(ValueError, match="no images were given. Pass one image per"):
        processor(text="<|image|>What is this?")


def test_prompt_longer_than_the_context_is_refused(processor):
    with pytest.raises(ValueError, match="tokens long, more than the 8 tokens the model can take"):
        processor(text="a fairly long prompt that will not fit into eight tokens at all", max_length=8)


def test_truncation_that_drops_an_image_token_is_refused(processor):
    with pytest.raises(ValueError, match="removed <\\|image\\|> tokens"):
        processor(text="a fairly long prompt before the picture <|image|>", images=picture(9, 9),
                  truncation=True, max_length=4)


def test_unpadded_batch_of_different_lengths_asks_for_padding(processor):
    with pytest.raises(ValueError, match="padding=True"):
        processor(text=["short", "a much longer text than the first one"], return_tensors="pt")


def test_unknown_message_role_is_refused(processor):
    with pytest.raises(ChatTemplateError, match="unknown role 'narrator'. Use one of system, user"):
        processor.apply_chat_template([{"role": "narrator", "content": "Once upon a time"}])


def test_image_part_without_an_image_asks_for_one_when_tokenizing(processor):
    with pytest.raises(ChatTemplateError, match="needs exactly one of 'image', 'url', 'path' or 'base64'"):
        processor.apply_chat_template(CONVERSATIONS["one_image"], tokenize=True)


def test_unreadable_image_in_messages_names_the_file(processor, tmp_path):
    messages = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "gone.jpg")},
                                             {"type": "text", "text": "Hi"}]}]
    with pytest.raises(ValueError, match="gone.jpg"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)


def test_checkpoint_without_chat_template_explains_raw_prompts(mllama_processor_dir, tmp_path):
    for name in ("tokenizer.json", "special_tokens_map.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((mllama_processor_dir / name).read_bytes())
    config = json.loads((mllama_processor_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    base = MllamaProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template.*<\\|image\\|>If I had to write a haiku"):
        base.apply_chat_template(CONVERSATIONS["text_only"])


def test_batch_feature_survives_copy_and_pickle(processor):
    import copy
    import pickle

    out = processor(text="Hello", return_tensors="pt")
    for clone in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        assert torch.equal(clone["input_ids"], out["input_ids"]) and torch.equal(clone.input_ids, out.input_ids)


def test_tokenizer_call_equals_transformers_tokenizer(processor, reference_processor):
    texts = ["What color is the shape?", "Hi"]
    ours = processor.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    ref = reference_processor.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"]) and torch.equal(ours["attention_mask"],
                                                                           ref["attention_mask"])
    assert processor.tokenizer.encode("Hi there") == reference_processor.tokenizer.encode("Hi there")
