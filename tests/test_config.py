"""MllamaConfig and its sub-configs: every field of the reference, both rope spellings, and
errors that name the bad field and the file."""
from __future__ import annotations

import json

import pytest

from model import MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from model.config import ConfigError
from reference import VARIANTS

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def write(tmp_path, data) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_reads_every_field_transformers_writes(variant, tmp_path):
    reference = variant.hf_config()
    reference.save_pretrained(tmp_path)
    ours = MllamaConfig.from_pretrained(tmp_path)
    ref_text, ref_vision = reference.text_config, reference.vision_config
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "rms_norm_eps", "max_position_embeddings", "cross_attention_layers",
                 "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert getattr(ours.text_config, name) == getattr(ref_text, name), name
    for name in ("hidden_size", "num_hidden_layers", "num_global_layers", "intermediate_size", "vision_output_dim",
                 "image_size", "patch_size", "max_num_tiles", "intermediate_layers_indices", "supported_aspect_ratios",
                 "norm_eps"):
        assert getattr(ours.vision_config, name) == getattr(ref_vision, name), name
    assert ours.vision_config.attention_heads == ref_vision.attention_heads
    assert ours.image_token_index == reference.image_token_index
    assert ours.text_config.rope_theta == ref_text.rope_parameters["rope_theta"]
    expected_scaling = {k: v for k, v in ref_text.rope_parameters.items() if k != "rope_theta"}
    assert (ours.text_config.rope_scaling or {"rope_type": "default"}) == expected_scaling


def test_hub_spelling_rope_theta_and_rope_scaling(tmp_path):
    path = write(tmp_path, {"model_type": "mllama", "text_config": {"rope_theta": 500000.0, "rope_scaling": LLAMA3}})
    text = MllamaConfig.from_json_file(path).text_config
    assert text.rope_theta == 500000.0 and text.rope_scaling == LLAMA3


def test_transformers5_spelling_rope_parameters(tmp_path):
    path = write(tmp_path, {"model_type": "mllama", "text_config": {"rope_parameters": {**LLAMA3, "rope_theta": 123.0}}})
    text = MllamaConfig.from_json_file(path).text_config
    assert text.rope_theta == 123.0 and text.rope_scaling == LLAMA3


def test_old_type_key_of_rope_scaling_is_accepted():
    text = MllamaTextConfig.from_dict({"rope_scaling": {**{k: v for k, v in LLAMA3.items() if k != "rope_type"}, "type": "llama3"}})
    assert text.rope_scaling["rope_type"] == "llama3"


def test_to_dict_round_trips(tmp_path):
    config = VARIANTS[1].hf_config()
    config.save_pretrained(tmp_path)
    ours = MllamaConfig.from_pretrained(tmp_path)
    again = MllamaConfig.from_dict(ours.to_dict())
    assert again == ours


def test_transformers_reads_what_we_write(tmp_path):
    from transformers import MllamaConfig as HFConfig

    ours = MllamaConfig(text_config=MllamaTextConfig(rope_scaling=LLAMA3, num_hidden_layers=10, cross_attention_layers=[2]))
    ours.save_pretrained(tmp_path)
    theirs = HFConfig.from_pretrained(tmp_path)
    assert theirs.text_config.num_hidden_layers == 10 and theirs.text_config.cross_attention_layers == [2]
    assert theirs.text_config.rope_parameters["rope_type"] == "llama3"


def test_wrong_type_names_the_field_and_the_file(tmp_path):
    path = write(tmp_path, {"model_type": "mllama", "text_config": {"hidden_size": "big"}})
    with pytest.raises(ConfigError, match=r"config\.json: field 'text_config\.hidden_size' should be int, got 'big'"):
        MllamaConfig.from_json_file(path)


def test_inconsistent_value_names_the_field(tmp_path):
    path = write(tmp_path, {"model_type": "mllama", "vision_config": {"vision_output_dim": 100}})
    with pytest.raises(ConfigError, match=r"vision_config\.vision_output_dim should be"):
        MllamaConfig.from_json_file(path)


def test_another_model_type_is_refused(tmp_path):
    path = write(tmp_path, {"model_type": "llava"})
    with pytest.raises(ConfigError, match="model_type is 'llava', not 'mllama'"):
        MllamaConfig.from_json_file(path)


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ConfigError, match="only 'default' and 'llama3'"):
        MllamaTextConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_semantics_is_validated_and_propagates():
    config = MllamaConfig()
    config.semantics = "transformers"
    assert config.text_config.semantics == config.vision_config.semantics == "transformers"
    with pytest.raises(ConfigError, match="semantics must be one of"):
        config.semantics = "hf"


def test_vision_heads_key_falls_back_to_num_attention_heads():
    assert MllamaVisionConfig.from_dict({"num_attention_heads": 8, "hidden_size": 64, "vision_output_dim": 384}).attention_heads == 8


def test_derived_key_is_checked_not_stored():
    assert MllamaTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16).head_dim == 16
    with pytest.raises(ConfigError, match="head_dim=8 does not agree"):
        MllamaTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
