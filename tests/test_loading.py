"""from_pretrained / save_pretrained against checkpoints written by transformers' save_pretrained.

transformers is the oracle for what a checkpoint holds: our state dict must equal its in-memory state
dict after renaming its >= 4.52 layout (format B) to the Hub layout (format A), key for key, bit for bit.
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import MllamaForCausalLM, MllamaForConditionalGeneration, MllamaTextModel, MllamaVisionModel
from model.checkpoint import CheckpointError
from model.config import ConfigError
from model.hub import CheckpointNotFoundError

# transformers' in-memory names -> Hub names, written out here independently of model/checkpoint.py.
B_TO_A = [
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
]
TEXT_IDS = torch.tensor([[1, 17, 42, 99, 250, 7, 3, 64]])


def hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        renames = [(o, n) for o, n in B_TO_A if key.startswith(o)]
        assert renames, f"transformers has a key this test does not know how to rename: {key}"
        old, new = renames[0]
        out[new + key[len(old):]] = tensor
    return out


@functools.lru_cache
def transformers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """What transformers loads from `folder`, under the Hub names (cached: don't modify)."""
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return hub_layout(hf.state_dict())


def assert_same_weights(ours: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(want) - set(ours)), sorted(set(ours) - set(want))
    assert not missing and not extra, f"keys differ: missing {missing[:5]}, unexpected {extra[:5]}"
    for key, tensor in want.items():
        assert ours[key].dtype == tensor.dtype, f"{key}: dtype {ours[key].dtype}, want {tensor.dtype}"
        assert torch.equal(ours[key], tensor), f"{key}: values differ"


def logits(model, ids: torch.Tensor = TEXT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


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
    from reference import ImageSpec, make_inputs

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
    whole = MllamaForConditionalGeneration.from_pretrained(folder)
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    inputs = make_inputs(hf, [[ImageSpec(ratio_id=2, position=2)]], length=8)
    with torch.no_grad():
        assert torch.equal(offloaded(**inputs).logits, whole(**inputs).logits)


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


# --- bad input: a clear error, never a silently wrong model -------------------------------------


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


def test_unknown_hub_id_offline_says_how_to_use_a_local_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    repo = "no-such-org/no-such-mllama"
    with pytest.raises(CheckpointNotFoundError) as err:
        MllamaForConditionalGeneration.from_pretrained(repo)
    message = str(err.value)
    assert repo in message and "pass that folder instead of the id" in message and "HF_TOKEN" in message


def test_hub_id_in_the_local_cache_loads_without_network(tiny_hf_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--some-org--tiny-mllama"
    shutil.copytree(tiny_hf_checkpoint(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    ours = MllamaForConditionalGeneration.from_pretrained("some-org/tiny-mllama")
    assert_same_weights(ours.state_dict(), transformers_weights(tiny_hf_checkpoint()))


def test_hub_id_not_cached_is_downloaded_without_meta_original_weights(tiny_hf_checkpoint, monkeypatch):
    import model.hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(tiny_hf_checkpoint())

    monkeypatch.setattr(model.hub, "snapshot_download", fake_snapshot_download)
    MllamaForConditionalGeneration.from_pretrained("some-org/tiny-mllama")
    assert [c.get("local_files_only", False) for c in calls] == [True, False], "cache first, then the network"
    assert all("original/*" in c["ignore_patterns"] for c in calls)
    assert all("*.safetensors" in c["allow_patterns"] for c in calls)


def test_missing_local_folder_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="is not a folder .* pass the folder that holds config.json"):
        MllamaForConditionalGeneration.from_pretrained(tmp_path / "nowhere")


def test_a_file_instead_of_a_folder_is_refused(tiny_hf_checkpoint):
    with pytest.raises(CheckpointNotFoundError, match="is a file: pass the checkpoint folder that holds it"):
        MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint() / "config.json")


def test_saving_a_disk_offloaded_model_is_refused(tiny_hf_checkpoint, tmp_path):
    ours = MllamaForConditionalGeneration.from_pretrained(
        tiny_hf_checkpoint(), device_map={"": "cpu", "language_model.lm_head": "disk"}, offload_folder=tmp_path / "off"
    )
    with pytest.raises(ValueError, match=r"cannot save: 1 weight\(s\) \(language_model.lm_head.weight\) are offloaded"):
        ours.save_pretrained(tmp_path / "saved")
