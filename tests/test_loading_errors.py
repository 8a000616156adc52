"""Bad input to from_pretrained / save_pretrained: a clear error that says what to do, never a
silently wrong model. Each test checks the message."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from loading_helpers import copy_checkpoint, rewrite_config
from model import MllamaForCausalLM, MllamaForConditionalGeneration
from model.checkpoint import CheckpointError
from model.config import ConfigError


def test_missing_shard_is_named_with_its_index(tiny_hf_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_hf_checkpoint(max_shard_size="20KB"), tmp_path / "ckpt")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json lists '{shard.name}'"):
        MllamaForConditionalGeneration.from_pretrained(folder)


def test_missing_and_unexpected_keys_are_listed(tiny_hf_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_hf_checkpoint(), tmp_path / "ckpt")
    weights = load_file(folder / "model.safetensors")
    removed = ["language_model.model.norm.weight", "vision_model.class_embedding"]
    for key in removed:
        del weights[key]
    weights.update({f"extra.t{i}": torch.zeros(1) for i in range(7)})
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        MllamaForConditionalGeneration.from_pretrained(folder)
    message = str(err.value)
    assert "2 weight(s) of MllamaForConditionalGeneration are not in the checkpoint" in message
    assert all(repr(key) in message for key in removed), message
    assert "7 checkpoint tensor(s) match no weight of MllamaForConditionalGeneration: 'extra.t" in message
    assert message.count("'extra.t") == 5 and "and 2 more" in message, message


def test_two_tensors_for_one_weight_are_refused(tiny_hf_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_hf_checkpoint(), tmp_path / "ckpt")
    weights = load_file(folder / "model.safetensors")
    weights["model.language_model.norm.weight"] = weights["language_model.model.norm.weight"].clone()
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.language_model.norm.weight' both load into 'language_model.model.norm.weight'"):
        MllamaForConditionalGeneration.from_pretrained(folder)


def test_shape_mismatch_names_key_expected_and_found(tiny_hf_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_hf_checkpoint(), tmp_path / "ckpt")
    weights = load_file(folder / "model.safetensors")
    key = "language_model.model.norm.weight"
    weights[key] = torch.ones(weights[key].shape[0] + 1)
    save_file(weights, folder / "model.safetensors")
    hidden = weights[key].shape[0] - 1
    with pytest.raises(CheckpointError, match=rf"'{key}' in model.safetensors: expected \({hidden},\), found \({hidden + 1},\)"):
        MllamaForConditionalGeneration.from_pretrained(folder)


def test_config_of_another_model_type_is_refused(tiny_hf_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_hf_checkpoint(), tmp_path / "ckpt")
    rewrite_config(folder, lambda c: c.update(model_type="llava"))
    with pytest.raises(ConfigError, match="model_type is 'llava', not 'mllama'"):
        MllamaForConditionalGeneration.from_pretrained(folder)
    with pytest.raises(ConfigError, match="MllamaForCausalLM loads checkpoints of model_type 'mllama' or 'mllama_text_model'"):
        MllamaForCausalLM.from_pretrained(folder)


def test_folder_without_safetensors_is_refused(tiny_hf_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_hf_checkpoint(), tmp_path / "ckpt")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json.*only safetensors"):
        MllamaForConditionalGeneration.from_pretrained(folder)


def test_bad_semantics_lists_the_valid_ones(tiny_hf_checkpoint):
    with pytest.raises(ConfigError, match=r"semantics must be one of \('meta', 'transformers'\), got 'hf'"):
        MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(), semantics="hf")


def test_bad_dtype_lists_the_valid_ones(tiny_hf_checkpoint):
    with pytest.raises(ValueError, match="dtype must be 'auto', a floating torch.dtype or one of 'bfloat16', 'float16'.*got 'bf17'"):
        MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(), dtype="bf17")
    with pytest.raises(ValueError, match="got torch.int8"):
        MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(), dtype=torch.int8)


@pytest.mark.parametrize("device_map", ["gpu", "meta", -1])
def test_bad_device_map_lists_the_valid_values(tiny_hf_checkpoint, device_map):
    with pytest.raises(ValueError, match=r"device_map must be None .*'auto', 'balanced', 'sequential', one device"):
        MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(), device_map=device_map)


GPUS = torch.cuda.device_count()


@pytest.mark.parametrize("device_map", [GPUS, f"cuda:{GPUS}", {"": f"cuda:{GPUS}"}])
def test_device_map_naming_a_gpu_that_is_not_there_says_so(tiny_hf_checkpoint, device_map):
    with pytest.raises(ValueError, match=rf"device_map asks for GPU {GPUS}, but torch sees {GPUS} GPU\(s\).*'cpu' or 'auto'"):
        MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(), device_map=device_map)


def test_device_map_that_leaves_modules_out_names_them(tiny_hf_checkpoint):
    with pytest.raises(ValueError, match=r"device_map gives no device to 'language_model\..*or '' for everything"):
        MllamaForConditionalGeneration.from_pretrained(
            tiny_hf_checkpoint(), device_map={"vision_model": "cpu", "multi_modal_projector": "cpu"}
        )
    with pytest.raises(ValueError, match="device_map names 'vision_tower', not module"):
        MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(), device_map={"vision_tower": "cpu"})


def test_disk_without_offload_folder_says_what_to_pass(tiny_hf_checkpoint):
    with pytest.raises(ValueError, match="puts 'vision_model' on 'disk': pass offload_folder="):
        MllamaForConditionalGeneration.from_pretrained(
            tiny_hf_checkpoint(), device_map={"": "cpu", "vision_model": "disk"}
        )


def test_bad_max_shard_size_says_what_is_valid(tiny_hf_checkpoint, tmp_path):
    ours = MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint())
    with pytest.raises(ValueError, match="max_shard_size must be a positive int .* like '5GB'"):
        ours.save_pretrained(tmp_path, max_shard_size="big")


def test_saving_a_disk_offloaded_model_is_refused(tiny_hf_checkpoint, tmp_path):
    ours = MllamaForConditionalGeneration.from_pretrained(
        tiny_hf_checkpoint(), device_map={"": "cpu", "language_model.lm_head": "disk"}, offload_folder=tmp_path / "off"
    )
    with pytest.raises(ValueError, match=r"cannot save: 1 weight\(s\) \(language_model.lm_head.weight\) are offloaded"):
        ours.save_pretrained(tmp_path / "saved")
