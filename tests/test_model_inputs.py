"""Inputs the model refuses with a clear message instead of computing something wrong."""
from __future__ import annotations

import pytest
import torch

from model import MllamaForConditionalGeneration
from reference import VARIANTS, ImageSpec, build_hf_model, make_inputs, save_hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = build_hf_model(VARIANTS[0])
    return hf, MllamaForConditionalGeneration.from_pretrained(save_hf(hf, tmp_path_factory.mktemp("inputs")))


@pytest.mark.parametrize("dropped", ["aspect_ratio_ids", "aspect_ratio_mask"])
def test_pixel_values_without_aspect_ratio_fields_are_refused(pair, dropped):
    hf, ours = pair
    inputs = make_inputs(hf, [[ImageSpec(1, 2)]], length=6)
    del inputs[dropped]
    with pytest.raises(ValueError, match="without aspect_ratio_ids/aspect_ratio_mask: pass every image field"):
        ours(**inputs)


def test_pixel_values_without_cross_attention_mask_are_refused(pair):
    hf, ours = pair
    inputs = make_inputs(hf, [[ImageSpec(1, 2)]], length=6)
    del inputs["cross_attention_mask"]
    with pytest.raises(ValueError, match="without cross_attention_mask"):
        ours(**inputs)


def test_image_token_count_must_match_the_images(pair):
    hf, ours = pair
    inputs = make_inputs(hf, [[ImageSpec(1, 2)]], length=6)
    inputs["input_ids"][0, 4] = hf.config.image_token_index  # a second <|image|> for one image
    with pytest.raises(ValueError, match=r"sample 0 has 2 <\|image\|> token\(s\) but 1 image\(s\)"):
        ours(**inputs)


def test_text_only_model_refuses_images(pair, tmp_path):
    from model import MllamaForCausalLM

    hf, _ = pair
    lm = MllamaForCausalLM.from_pretrained(save_hf(hf, tmp_path))
    inputs = make_inputs(hf, [[ImageSpec(1, 2)]], length=6)
    with pytest.raises(ValueError, match="no vision tower"):
        lm.generate(**inputs, max_new_tokens=2)


def test_input_ids_and_inputs_embeds_are_exclusive(pair):
    _, ours = pair
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        ours.language_model(input_ids=ids, inputs_embeds=torch.zeros(1, 3, 32))
