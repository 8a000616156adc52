"""Our model against transformers on random small checkpoints saved with `save_pretrained`.

In "transformers" semantics float32 logits must agree within 1e-4 relative (||Δ|| / ||ref||).
"""
from __future__ import annotations

import pytest
import torch

from model import (
    MllamaForCausalLM,
    MllamaForConditionalGeneration,
    MllamaModel,
    MllamaTextModel,
    MllamaVisionModel,
)
from reference import VARIANTS, ImageSpec, build_hf_model, make_inputs, relative_error, save_hf

TOL = 1e-4


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.name)
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained folder, folder)."""
    hf = build_hf_model(request.param)
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param.name))
    ours = MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers")
    return hf, ours, folder


def logits_pair(hf, ours, inputs):
    with torch.no_grad():
        return ours(**inputs).logits, hf(**inputs).logits


def real_rows(inputs, logits):
    return logits[inputs["attention_mask"].bool()]


def test_text_only_logits_match(pair):
    hf, ours, _ = pair
    inputs = make_inputs(hf, [[]], length=11)
    got, want = logits_pair(hf, ours, inputs)
    assert relative_error(got, want) < TOL


def test_every_aspect_ratio_matches(pair):
    hf, ours, _ = pair
    ratios = hf.config.vision_config.supported_aspect_ratios
    samples = [[ImageSpec(ratio_id=i + 1, position=2)] for i in range(len(ratios))]
    inputs = make_inputs(hf, samples, length=9)
    got, want = logits_pair(hf, ours, inputs)
    for b in range(len(ratios)):
        err = relative_error(got[b], want[b])
        assert err < TOL, f"aspect ratio {ratios[b]}: relative error {err:.2e}"


def test_two_images_in_one_sample_match(pair):
    hf, ours, _ = pair
    inputs = make_inputs(hf, [[ImageSpec(1, 1), ImageSpec(2, 6)]], length=12)
    got, want = logits_pair(hf, ours, inputs)
    assert relative_error(got, want) < TOL


def test_left_padded_batch_of_two_matches(pair):
    hf, ours, _ = pair
    inputs = make_inputs(hf, [[ImageSpec(1, 1)], [ImageSpec(2, 3)]], length=12, pad_left=[4, 0])
    got, want = logits_pair(hf, ours, inputs)
    assert relative_error(real_rows(inputs, got), real_rows(inputs, want)) < TOL


def test_sharded_checkpoint_loads_the_same_model(pair, tmp_path):
    hf, ours, _ = pair
    folder = save_hf(hf, tmp_path / "sharded", max_shard_size="20KB")
    assert any(p.name == "model.safetensors.index.json" for p in (tmp_path / "sharded").iterdir())
    sharded = MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers")
    inputs = make_inputs(hf, [[ImageSpec(1, 2)]], length=8)
    with torch.no_grad():
        assert torch.equal(sharded(**inputs).logits, ours(**inputs).logits)


def test_vision_model_matches(pair):
    hf, _, folder = pair
    ours = MllamaVisionModel.from_pretrained(folder, semantics="transformers")
    inputs = make_inputs(hf, [[ImageSpec(1, 1), ImageSpec(len(hf.config.vision_config.supported_aspect_ratios), 3)]], length=6)
    args = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    with torch.no_grad():
        got = ours(**args).last_hidden_state
        want = hf.model.vision_model(**args).last_hidden_state
    assert got.shape == want.shape
    assert relative_error(got, want) < TOL


def test_text_model_and_causal_lm_match(pair):
    hf, _, folder = pair
    inputs = make_inputs(hf, [[], []], length=10, pad_left=[3, 0])
    text = MllamaTextModel.from_pretrained(folder, semantics="transformers")
    lm = MllamaForCausalLM.from_pretrained(folder, semantics="transformers")
    with torch.no_grad():
        want_hidden = hf.model.language_model(**inputs).last_hidden_state
        want_logits = hf.lm_head(want_hidden)
        got_hidden = text(**inputs).last_hidden_state
        got_logits = lm(**inputs).logits
    rows = inputs["attention_mask"].bool()
    assert relative_error(got_hidden[rows], want_hidden[rows]) < TOL
    assert relative_error(got_logits[rows], want_logits[rows]) < TOL


def test_base_model_matches(pair):
    hf, _, folder = pair
    base = MllamaModel.from_pretrained(folder, semantics="transformers")
    inputs = make_inputs(hf, [[ImageSpec(1, 2)]], length=7)
    with torch.no_grad():
        got = base(**inputs).last_hidden_state
        want = hf.model(**inputs).last_hidden_state
    assert relative_error(got, want) < TOL


def test_bfloat16_loads_and_stays_close(pair):
    """bfloat16 keeps ~3 significant digits per op; over a few layers 2e-2 relative is the bound."""
    hf, _, folder = pair
    ours = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, semantics="transformers")
    assert ours.dtype == torch.bfloat16
    inputs = make_inputs(hf, [[ImageSpec(1, 2)]], length=8)
    got, want = logits_pair(hf, ours, inputs)
    assert got.dtype == torch.bfloat16
    assert relative_error(got.float(), want) < 2e-2
