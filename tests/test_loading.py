"""from_pretrained / save_pretrained against checkpoints written by transformers' save_pretrained.

transformers is the oracle for what a checkpoint holds: our state dict must equal its in-memory state
dict after renaming its >= 4.52 layout (format B) to the Hub layout (format A), key for key, bit for bit.
Bad input is in test_loading_errors.py, hub ids in test_hub.py.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loading_helpers import assert_same_weights, copy_checkpoint, logits, rewrite_config, transformers_weights
from model import MllamaForCausalLM, MllamaForConditionalGeneration, MllamaTextModel, MllamaVisionModel


# --- what a load gives --------------------------------------------------------------------------


def test_loaded_weights_equal_transformers_weights(tiny_hf_checkpoint):
    folder = tiny_hf_checkpoint()
    ours = MllamaForConditionalGeneration.from_pretrained(folder)
    assert_same_weights(ours.state_dict(), transformers_weights(folder))


def test_sharded_checkpoint_loads_the_same_weights_as_single_file(tiny_hf_checkpoint):
    sharded = tiny_hf_checkpoint(max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2, "the fixture should have written several shards"
    single = MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint())
    ours = MllamaForConditionalGeneration.from_pretrained(sharded)
    assert_same_weights(ours.state_dict(), single.state_dict())


def test_text_only_logits_match_transformers(tiny_hf_checkpoint):
    folder = tiny_hf_checkpoint()
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours = MllamaForConditionalGeneration.from_pretrained(folder)
    got, want = logits(ours), logits(hf)
    assert ((got - want).norm() / want.norm()).item() < 1e-5, "text-only logits differ from transformers"


def test_inference_load_is_in_eval_mode_without_gradients(tiny_hf_checkpoint):
    ours = MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint())
    assert not any(m.training for m in ours.modules()), "some module is in training mode"
    assert not any(p.requires_grad for p in ours.parameters()), "some parameter requires grad"


def test_semantics_argument_overrides_the_config(tiny_hf_checkpoint):
    folder = tiny_hf_checkpoint()
    assert MllamaForConditionalGeneration.from_pretrained(folder).config.semantics == "meta"
    ours = MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers")
    assert ours.config.semantics == "transformers"
    assert ours.config.vision_config.semantics == ours.config.text_config.semantics == "transformers"


def test_explicit_config_is_used_and_not_modified(tiny_hf_checkpoint):
    folder = tiny_hf_checkpoint()
    config = MllamaForConditionalGeneration.config_class.from_pretrained(folder)
    ours = MllamaForConditionalGeneration.from_pretrained(folder, config=config, semantics="transformers")
    assert ours.config.semantics == "transformers"
    assert config.semantics == "meta", "from_pretrained changed the caller's config"


def test_generation_config_json_is_attached(tiny_hf_checkpoint):
    folder = tiny_hf_checkpoint()
    ours = MllamaForConditionalGeneration.from_pretrained(folder)
    assert ours.generation_config == json.loads((folder / "generation_config.json").read_text())


def test_model_is_built_on_the_meta_device_before_weights_are_read(tiny_hf_checkpoint):
    built_on = []

    class Recording(MllamaForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            built_on.append({p.device.type for p in self.parameters()})

    Recording.from_pretrained(tiny_hf_checkpoint())
    assert built_on == [{"meta"}], f"parameters were allocated at construction: {built_on}"


# --- dtype ---------------------------------------------------------------------------------------


def test_dtype_auto_takes_the_config_dtype(tiny_hf_checkpoint):
    assert MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint()).dtype == torch.float32
    bf16 = MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(dtype=torch.bfloat16))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_dtype_auto_without_config_dtype_takes_the_weights_dtype(tiny_hf_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_hf_checkpoint(dtype=torch.bfloat16), tmp_path / "ckpt")
    rewrite_config(folder, lambda c: [c.pop(k, None) for k in ("dtype", "torch_dtype")])
    ours = MllamaForConditionalGeneration.from_pretrained(folder, dtype="auto")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "torch.float64"])
def test_explicit_dtype_casts_every_weight(tiny_hf_checkpoint, dtype):
    folder = tiny_hf_checkpoint()
    ours = MllamaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    want = {k: v.to(ours.dtype) for k, v in transformers_weights(folder).items()}
    assert str(ours.dtype).removeprefix("torch.") == str(dtype).removeprefix("torch.")
    assert_same_weights(ours.state_dict(), want)


def test_rotary_frequencies_stay_float32_in_a_bfloat16_model(tiny_hf_checkpoint):
    ours = MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(), dtype="bfloat16")
    buffers = {name: b for name, b in ours.named_buffers() if name.endswith("inv_freq")}
    assert buffers, "expected the rotary inv_freq buffer"
    assert all(b.dtype == torch.float32 and b.device.type == "cpu" for b in buffers.values())


# --- device_map ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device_map", ["auto", "balanced", "sequential", "cpu"])
def test_device_map_on_a_cpu_only_machine_puts_everything_on_the_cpu(tiny_hf_checkpoint, device_map):
    folder = tiny_hf_checkpoint()
    ours = MllamaForConditionalGeneration.from_pretrained(folder, device_map=device_map)
    assert {t.device.type for t in ours.state_dict().values()} == {"cpu"}
    assert ours.device == torch.device("cpu")
    assert_same_weights(ours.state_dict(), transformers_weights(folder))


def test_layers_offloaded_to_disk_give_the_same_logits(tiny_hf_checkpoint, tmp_path):
    folder = tiny_hf_checkpoint()
    device_map = {"": "cpu", "language_model.model.layers.1": "disk", "language_model.lm_head": "disk"}
    offloaded = MllamaForConditionalGeneration.from_pretrained(
        folder, device_map=device_map, offload_folder=tmp_path / "offload"
    )
    layer = offloaded.language_model.model.layers[1]
    assert {p.device.type for p in layer.parameters()} == {"meta"}, "layer 1 should live on disk"
    assert (tmp_path / "offload" / "language_model.lm_head.weight.dat").exists()
    assert offloaded.device == torch.device("cpu")
    whole = MllamaForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(logits(offloaded), logits(whole))


def test_vision_and_cross_attention_layers_on_disk_give_the_same_image_logits(tiny_hf_checkpoint, tmp_path):
    folder = tiny_hf_checkpoint()
    device_map = {
        "": "cpu",
        "vision_model": "disk",
        "vision_model.patch_embedding": "cpu",  # splits vision_model: its own class_embedding stays resident
        "language_model.model.layers.1": "disk",  # the cross-attention layer
    }
    offloaded = MllamaForConditionalGeneration.from_pretrained(
        folder, device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert offloaded.vision_model.class_embedding.device.type == "cpu", "a loose tensor was left on disk"
    assert {p.device.type for p in offloaded.vision_model.transformer.parameters()} == {"meta"}
    assert_same_image_logits_as_loaded_whole(offloaded, folder)


def assert_same_image_logits_as_loaded_whole(offloaded, folder) -> None:
    from reference import ImageSpec, make_inputs

    whole = MllamaForConditionalGeneration.from_pretrained(folder)
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    inputs = make_inputs(hf, [[ImageSpec(ratio_id=2, position=2)]], length=8)
    with torch.no_grad():
        assert torch.equal(offloaded(**inputs).logits, whole(**inputs).logits)


def test_patch_embedding_and_projector_on_disk_give_the_same_image_logits(tiny_hf_checkpoint, tmp_path):
    """Modules whose inputs the model casts itself must work when their weights are offloaded."""
    folder = tiny_hf_checkpoint()
    device_map = {"": "cpu", "vision_model.patch_embedding": "disk", "multi_modal_projector": "disk"}
    offloaded = MllamaForConditionalGeneration.from_pretrained(
        folder, device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert offloaded.multi_modal_projector.weight.device.type == "meta"
    assert_same_image_logits_as_loaded_whole(offloaded, folder)


def test_auto_device_map_offloads_to_disk_when_memory_is_short(tiny_hf_checkpoint, tmp_path):
    folder = tiny_hf_checkpoint()
    ours = MllamaForConditionalGeneration.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": "100KB"}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in ours.hf_device_map.values() and "cpu" in ours.hf_device_map.values(), ours.hf_device_map
    whole = MllamaForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(logits(ours), logits(whole))


# --- other classes and layouts -------------------------------------------------------------------


def test_causal_lm_from_a_full_checkpoint_loads_only_the_text_weights(tiny_hf_checkpoint):
    folder = tiny_hf_checkpoint()
    lm = MllamaForCausalLM.from_pretrained(folder)
    want = {
        key.replace("language_model.", "", 1): tensor
        for key, tensor in transformers_weights(folder).items()
        if key.startswith("language_model.")
    }
    assert_same_weights(lm.state_dict(), want)
    assert lm.config.hidden_size == MllamaForConditionalGeneration.from_pretrained(folder).config.text_config.hidden_size


def test_causal_lm_loads_a_transformers_text_only_export(tmp_path):
    from reference import BASE_TEXT

    torch.manual_seed(0)
    hf = transformers.MllamaForCausalLM(transformers.MllamaTextConfig(**BASE_TEXT)).eval()
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mllama_text_model"
    lm = MllamaForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(lm.state_dict(), hf.state_dict())
    assert torch.allclose(logits(lm), logits(hf), rtol=1e-5, atol=1e-5)


def test_in_memory_transformers_layout_is_mapped_on_load(tiny_hf_checkpoint, tmp_path):
    folder = tiny_hf_checkpoint()
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert any(k.startswith("model.language_model.") for k in f.keys()), "not format B"
    ours = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    assert_same_weights(ours.state_dict(), transformers_weights(folder))


def test_rotary_inv_freq_tensors_in_a_checkpoint_are_ignored(tiny_hf_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_hf_checkpoint(), tmp_path / "ckpt")
    weights = load_file(folder / "model.safetensors")
    weights["language_model.model.rotary_emb.inv_freq"] = torch.full((4,), 123.0)
    save_file(weights, folder / "model.safetensors")
    ours = MllamaForConditionalGeneration.from_pretrained(folder)
    assert ours.language_model.model.rotary_emb.inv_freq.max() < 123.0, "inv_freq was loaded, not computed"


def test_vision_model_from_a_full_checkpoint_skips_the_other_weights(tiny_hf_checkpoint):
    folder = tiny_hf_checkpoint()
    vision = MllamaVisionModel.from_pretrained(folder)
    want = {
        key.removeprefix("vision_model."): tensor
        for key, tensor in transformers_weights(folder).items()
        if key.startswith("vision_model.")
    }
    assert_same_weights(vision.state_dict(), want)


def test_text_model_round_trips_through_its_own_unprefixed_export(tiny_hf_checkpoint, tmp_path):
    text = MllamaTextModel.from_pretrained(tiny_hf_checkpoint())
    text.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "embed_tokens.weight" in f.keys(), "the text model's own export has no prefix"
    assert_same_weights(MllamaTextModel.from_pretrained(tmp_path).state_dict(), text.state_dict())


# --- save_pretrained -----------------------------------------------------------------------------


def test_save_pretrained_writes_the_hub_layout_that_transformers_loads(tiny_hf_checkpoint, tmp_path):
    ours = MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(), dtype="bfloat16")
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((tmp_path / "generation_config.json").read_text()) == ours.generation_config
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(ours.state_dict()), "saved keys are not the Hub names"
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_same_weights(transformers_weights(tmp_path), {k: v.float() for k, v in ours.state_dict().items()})
    reloaded = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    assert_same_weights(reloaded.state_dict(), ours.state_dict())


@pytest.mark.parametrize("max_shard_size", ["30KB", 30_000])
def test_save_pretrained_shards_with_an_index(tiny_hf_checkpoint, tmp_path, max_shard_size):
    ours = MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint())
    ours.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        with safe_open(tmp_path / shard, "pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert len(sizes) == 1 or sum(sizes) <= 30_000, f"{shard} holds {sum(sizes)} bytes in {len(sizes)} tensors"
    assert set(index["weight_map"]) == set(ours.state_dict())
    assert_same_weights(MllamaForConditionalGeneration.from_pretrained(tmp_path).state_dict(), ours.state_dict())


def test_causal_lm_save_round_trips_through_its_own_config(tiny_hf_checkpoint, tmp_path):
    lm = MllamaForCausalLM.from_pretrained(tiny_hf_checkpoint())
    lm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mllama_text_model"
    assert_same_weights(MllamaForCausalLM.from_pretrained(tmp_path).state_dict(), lm.state_dict())
