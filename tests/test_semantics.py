"""Default (Meta) semantics differ from transformers in exactly the two documented ways
(README, "Semantics"): vision intermediate features are the *inputs* of the listed layers,
and text rows that see no image pass cross-attention layers unchanged."""
from __future__ import annotations

import pytest
import torch

from model import MllamaConfig, MllamaForConditionalGeneration, MllamaVisionModel
from reference import VARIANTS, ImageSpec, build_hf_model, make_inputs, relative_error, save_hf

TOL = 1e-4


@pytest.fixture(scope="module", params=VARIANTS[:2], ids=lambda v: v.name)
def setup(request, tmp_path_factory):
    """(transformers model, oracle with intermediate indices shifted by -1, checkpoint folder)."""
    from transformers import MllamaForConditionalGeneration as HFModel

    variant = request.param
    hf = build_hf_model(variant)
    folder = save_hf(hf, tmp_path_factory.mktemp(variant.name))
    shifted = variant.hf_config()
    shifted.vision_config.intermediate_layers_indices = [i - 1 for i in shifted.vision_config.intermediate_layers_indices]
    oracle = HFModel(shifted).eval()
    oracle.load_state_dict(hf.state_dict())
    return hf, oracle, folder


def test_meta_is_the_default():
    assert MllamaConfig().semantics == "meta"


def test_meta_vision_equals_transformers_with_indices_shifted_by_one(setup):
    hf, oracle, folder = setup
    ours = MllamaVisionModel.from_pretrained(folder)
    inputs = make_inputs(hf, [[ImageSpec(1, 0), ImageSpec(2, 3)]], length=5)
    args = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    with torch.no_grad():
        got = ours(**args).last_hidden_state
        want = oracle.model.vision_model(**args).last_hidden_state
        unshifted = hf.model.vision_model(**args).last_hidden_state
    assert relative_error(got, want) < TOL
    assert relative_error(got, unshifted) > 1e-3, "Meta and transformers intermediate features should differ"


def test_meta_model_equals_shifted_oracle_when_every_row_sees_the_image(setup):
    hf, oracle, folder = setup
    ours = MllamaForConditionalGeneration.from_pretrained(folder)
    inputs = make_inputs(hf, [[ImageSpec(1, 0)], [ImageSpec(2, 0)]], length=9)
    with torch.no_grad():
        assert relative_error(ours(**inputs).logits, oracle(**inputs).logits) < TOL


def test_meta_rows_before_the_image_ignore_the_image(setup):
    """Rows before the first <|image|> get exactly the text-only result of their prefix."""
    hf, _, folder = setup
    ours = MllamaForConditionalGeneration.from_pretrained(folder)
    inputs = make_inputs(hf, [[ImageSpec(1, 4)]], length=10)
    prefix = {"input_ids": inputs["input_ids"][:, :4]}
    with torch.no_grad():
        with_image = ours(**inputs).logits[:, :4]
        text_only = ours(**prefix).logits
    assert relative_error(with_image, text_only) < 1e-6


def test_transformers_rows_before_the_image_are_changed_by_it(setup):
    hf, _, folder = setup
    ours = MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers")
    inputs = make_inputs(hf, [[ImageSpec(1, 4)]], length=10)
    with torch.no_grad():
        with_image = ours(**inputs).logits[:, :4]
        text_only = ours(input_ids=inputs["input_ids"][:, :4]).logits
    assert relative_error(with_image, text_only) > 1e-3


def test_semantics_can_be_switched_on_the_config(setup):
    hf, _, folder = setup
    ours = MllamaForConditionalGeneration.from_pretrained(folder)
    inputs = make_inputs(hf, [[ImageSpec(1, 2)]], length=8)
    with torch.no_grad():
        meta = ours(**inputs).logits
        ours.config.semantics = "transformers"
        switched = ours(**inputs).logits
        want = hf(**inputs).logits
    assert relative_error(switched, want) < TOL
    assert relative_error(meta, want) > 1e-3
