"""What a transformers user calls on configs, embeddings, image processors and the processor:
each test makes the same call on transformers and on ours and compares the results."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import (
    MllamaConfig,
    MllamaForCausalLM,
    MllamaForConditionalGeneration,
    MllamaModel,
    MllamaTextConfig,
    MllamaTextModel,
    MllamaVisionConfig,
    MllamaVisionModel,
)
from model.activations import ACTIVATIONS
from model.tokenizer import MllamaTokenizer
from reference import VOCAB, ImageSpec, Variant, build_hf_model, make_inputs, relative_error, save_hf

TOL = 1e-4
TINY_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-mllama"


def without_version(data: dict) -> dict:
    """A config dict without the keys that name the writer, not the model."""
    data = {k: v for k, v in data.items() if k != "transformers_version"}
    for key in ("text_config", "vision_config"):
        if isinstance(data.get(key), dict):
            data[key] = without_version(data[key])
    return data


# ----------------------------------------------------------------------------------------- config
def test_config_keeps_unknown_keys_through_our_save_and_load(tmp_path):
    from transformers import MllamaConfig as HFConfig

    reference = Variant("base").hf_config()
    reference.future_field = {"a": [1, 2]}
    reference.text_config.new_text_knob = 3
    reference.save_pretrained(tmp_path / "hf")
    ours = MllamaConfig.from_pretrained(tmp_path / "hf")
    assert ours.future_field == {"a": [1, 2]} and ours.text_config.new_text_knob == 3
    ours.save_pretrained(tmp_path / "ours")
    again = HFConfig.from_pretrained(tmp_path / "ours")
    assert without_version(again.to_dict()) == without_version(reference.to_dict())
    assert MllamaConfig.from_pretrained(tmp_path / "ours").to_dict() == ours.to_dict()


def test_constructors_take_model_type_and_unknown_keywords_like_transformers():
    from transformers import MllamaTextConfig as HFText
    from transformers import MllamaVisionConfig as HFVision

    text = dict(model_type="mllama_text_model", vocab_size=99, num_hidden_layers=2, cross_attention_layers=[1],
                some_new_key="x")
    vision = dict(model_type="mllama_vision_model", num_hidden_layers=4, intermediate_layers_indices=[1],
                  vision_output_dim=2560, some_new_key=[1])
    for ours, theirs in ((MllamaTextConfig(**text), HFText(**text)), (MllamaVisionConfig(**vision), HFVision(**vision))):
        assert ours.some_new_key == theirs.some_new_key
        assert ours.to_dict()["model_type"] == theirs.to_dict()["model_type"]
        assert ours.num_hidden_layers == theirs.num_hidden_layers
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        MllamaTextConfig(model_type="llama")


def test_to_json_string_is_read_by_transformers():
    from transformers import MllamaConfig as HFConfig

    reference = Variant("base").hf_config()
    ours = MllamaConfig.from_dict(reference.to_dict())
    rebuilt = HFConfig(**json.loads(ours.to_json_string()))
    assert without_version(rebuilt.to_dict()) == without_version(reference.to_dict())
    assert json.loads(ours.text_config.to_json_string())["model_type"] == reference.text_config.model_type


def test_get_text_config_returns_what_transformers_returns():
    reference = Variant("base").hf_config()
    ours = MllamaConfig.from_dict(reference.to_dict())
    assert ours.get_text_config() is ours.text_config and reference.get_text_config() is reference.text_config
    assert ours.get_text_config(decoder=True).to_dict()["vocab_size"] == reference.get_text_config(decoder=True).vocab_size
    for ours_sub, ref_sub in ((ours.text_config, reference.text_config), (ours.vision_config, reference.vision_config)):
        assert (ours_sub.get_text_config() is ours_sub) == (ref_sub.get_text_config() is ref_sub) == True  # noqa: E712


def test_sub_config_from_pretrained_reads_its_part_of_a_full_config(tmp_path):
    from transformers import MllamaTextConfig as HFText

    Variant("base").hf_config().save_pretrained(tmp_path)
    assert MllamaTextConfig.from_pretrained(tmp_path).hidden_size == HFText.from_pretrained(tmp_path).hidden_size


def test_non_default_semantics_survives_config_and_model_save(tmp_path, tiny_hf_checkpoint):
    from transformers import MllamaConfig as HFConfig

    config = MllamaConfig()
    config.semantics = "transformers"
    config.save_pretrained(tmp_path / "config")
    assert MllamaConfig.from_pretrained(tmp_path / "config").semantics == "transformers"
    assert HFConfig.from_pretrained(tmp_path / "config").text_config.num_hidden_layers == 40  # still readable there
    model = MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(), semantics="transformers")
    model.save_pretrained(tmp_path / "model")
    again = MllamaForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert again.config.semantics == again.config.vision_config.semantics == "transformers"
    assert "semantics" not in json.loads(MllamaConfig().to_json_string())["text_config"]  # the default stays implicit


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_matches_transformers(name):
    from transformers.activations import ACT2FN

    x = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    torch.testing.assert_close(ACTIVATIONS[name](x), ACT2FN[name](x), rtol=1e-12, atol=1e-12)


def test_unknown_activation_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="hidden_act 'swiglu' is not supported; use one of .*gelu"):
        MllamaTextConfig(hidden_act="swiglu")


@pytest.mark.parametrize("text_act,vision_act", [("gelu_pytorch_tanh", "quick_gelu"), ("relu", "gelu_new")])
def test_model_uses_the_configured_activation(tiny_hf_checkpoint, text_act, vision_act):
    from transformers import MllamaForConditionalGeneration as HFModel

    folder = tiny_hf_checkpoint(text={"hidden_act": text_act}, vision={"hidden_act": vision_act})
    hf = HFModel.from_pretrained(folder).eval()
    ours = MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers")
    silu_config = MllamaConfig.from_pretrained(folder)
    silu_config.text_config.hidden_act = silu_config.vision_config.hidden_act = "silu"
    silu = MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers", config=silu_config)
    inputs = make_inputs(hf, [[ImageSpec(2, 3)]], length=10)
    with torch.no_grad():
        want, got, other = hf(**inputs).logits, ours(**inputs).logits, silu(**inputs).logits
    assert relative_error(got, want) < TOL
    assert relative_error(other, want) > 10 * TOL  # the activation is not a no-op choice


def test_cross_attention_layers_past_the_last_layer_name_no_layer(tiny_hf_checkpoint, tmp_path):
    from transformers import MllamaForConditionalGeneration as HFModel

    folder = tiny_hf_checkpoint(text={"cross_attention_layers": [1, 4, 9]})  # 4 layers: 4 and 9 are none
    hf = HFModel.from_pretrained(folder).eval()
    ours = MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers")
    kinds = [type(layer).__name__ for layer in ours.language_model.model.layers]
    assert kinds == [type(layer).__name__ for layer in hf.model.language_model.layers]
    assert ours.config.text_config.cross_attention_layers == [1, 4, 9]
    inputs = make_inputs(hf, [[ImageSpec(1, 2)], [ImageSpec(3, 0)]], length=9)
    with torch.no_grad():
        assert relative_error(ours(**inputs).logits, hf(**inputs).logits) < TOL
