"""Base class of our models: `from_pretrained` / `save_pretrained` for Hugging Face safetensors checkpoints.

The model is built on the meta device; then every checkpoint tensor is read once, cast to the target
dtype and put straight on its device (or into the disk offload folder). No full copy of the weights
ever exists in host memory, and none in float32 when loading bfloat16.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from typing import Any, ClassVar

import torch
from accelerate import dispatch_model, init_empty_weights
from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device
from safetensors import safe_open
from torch import nn

from . import quantization as quant
from .checkpoint import (
    CheckpointError,
    TensorInfo,
    few,
    find_weight_files,
    first_float_dtype,
    map_keys,
    read_headers,
    save_weights,
)
from .config import SEMANTICS, ConfigError, MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from .device_map import (
    STRATEGIES,
    Device,
    check_device_map_arg,
    device_of,
    main_device,
    resolve_device_map,
    torch_device,
)
from .embeddings import EmbeddingsMixin
from .hub import CHECKPOINT_FILES, resolve_checkpoint

__all__ = ["MllamaPreTrainedModel", "CheckpointError"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
# Where the sub-configs live in a full Mllama config.json.
_SUB_CONFIG_KEY = {MllamaTextConfig: "text_config", MllamaVisionConfig: "vision_config"}
_READ_THREADS = 4


class MllamaPreTrainedModel(EmbeddingsMixin, nn.Module):
    config_class: ClassVar[type]
    # (checkpoint prefix, module prefix) pairs tried in order; checkpoint keys that match none are
    # not ours (e.g. vision weights when loading only the text model) and are skipped. A catch-all
    # ("", "") pair only applies to a checkpoint that no other pair matches (the class's own export).
    checkpoint_prefixes: ClassVar[tuple[tuple[str, str], ...]] = (("", ""),)
    quantization: str | None = None  # "int8" / "int4" when from_pretrained quantized the text decoder
    _no_split_modules: ClassVar[list[str]] = [
        "MllamaVisionEncoderLayer",
        "MllamaSelfAttentionDecoderLayer",
        "MllamaCrossAttentionDecoderLayer",
    ]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the main device of a dispatched model, else the device of the weights."""
        device_map = getattr(self, "hf_device_map", None)
        if device_map:
            return torch_device(main_device(device_map))
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        dtype: str | torch.dtype = "auto",
        device_map: str | int | torch.device | dict[str, Any] | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        offload_folder: str | os.PathLike | None = None,
        semantics: str | None = None,
        config: Any = None,
        torch_dtype: str | torch.dtype | None = None,
        quantization: str | None = None,
    ) -> "MllamaPreTrainedModel":
        """Load a checkpoint folder or Hub id, ready for inference (eval mode, no gradients).

        dtype: "auto" (config.json's `torch_dtype`/`dtype`, else the weights' dtype), a floating
        torch.dtype or its name. device_map: None (CPU), "auto"/"balanced"/"sequential" (accelerate
        fills `max_memory`, then CPU, then disk), one device, or {module name: device or "disk"}.
        offload_folder: where "disk" weights go. semantics: "meta" or "transformers", overrides the
        config's (see config.SEMANTICS). config: use this config instead of the checkpoint's config.json.
        torch_dtype: the older name of `dtype`, still used by the reference's examples.
        quantization: None, "int8" or "int4": the text decoder's linear layers get weight-only int8
        (per output channel) or int4 (per group of 128) weights, quantized as they are read (see
        model/quantization.py); the rest keeps `dtype`.
        """
        if torch_dtype is not None:
            if dtype != "auto":
                raise ValueError("pass dtype=... or torch_dtype=..., not both")
            dtype = torch_dtype
        target_dtype = None if dtype == "auto" else _parse_dtype(dtype, "dtype")
        check_device_map_arg(device_map)
        quant.check_quantization_arg(quantization)
        if max_memory is not None and device_map not in STRATEGIES:
            raise ValueError(f"max_memory only applies with device_map in {STRATEGIES}, got device_map={device_map!r}")
        if semantics is not None and semantics not in SEMANTICS:
            raise ConfigError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        folder = resolve_checkpoint(path_or_id, allow_patterns=CHECKPOINT_FILES)
        if config is None:
            config = _read_config(cls, folder)
        elif not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}")
        else:
            config = copy.deepcopy(config)  # the caller's config keeps its semantics
        if semantics is not None:
            config.semantics = semantics
        infos = read_headers(find_weight_files(folder))
        config_file = os.path.join(folder, "config.json")
        quant.check_not_prequantized(_read_json(config_file) if os.path.isfile(config_file) else {}, infos, folder)
        target_dtype = target_dtype or _auto_dtype(folder, infos)

        with init_empty_weights():  # parameters on the meta device; buffers (rotary) computed for real
            model = cls(config)
        mapping = map_keys(list(infos), cls.checkpoint_prefixes)
        _check_keys(model, mapping, infos, folder)
        quantized = quant.quantized_weight_names(model) if quantization else []
        device_map = resolve_device_map(model, device_map, max_memory, target_dtype,
                                        quant.planning_dtypes(quantized, quantization))
        if quantization:
            devices = {name: _device_or_disk(device_of(name, device_map)) for name in quantized}
            quant.check_supported(quantization, model, devices, target_dtype)
        if "disk" in device_map.values():
            if offload_folder is None:
                disk = [repr(name) if name else "the whole model" for name, d in device_map.items() if d == "disk"]
                raise ValueError(
                    f"device_map puts {few(disk)} on 'disk': pass offload_folder=<a folder> to hold those weights "
                    "(or give more max_memory)"
                )
            os.makedirs(offload_folder, exist_ok=True)
        _load_weights(model, mapping, infos, device_map, target_dtype, offload_folder,
                      dict.fromkeys(quantized, quantization))
        _place(model, device_map, offload_folder)
        model.quantization = quantization
        generation_file = os.path.join(folder, "generation_config.json")
        if hasattr(model, "generation_config") and os.path.isfile(generation_file):
            model.generation_config = _read_json(generation_file)  # generate()'s defaults (eos ids, sampling)
        model.eval()
        model.requires_grad_(False)
        return model

    def save_pretrained(self, folder: str | os.PathLike, max_shard_size: int | str | None = None) -> None:
        """Write config.json, generation_config.json (if loaded with one) and model.safetensors (or
        shards of at most `max_shard_size` + index), in the Hub layout, which transformers loads too."""
        if self.quantization:
            raise ValueError(
                f"cannot save a model loaded with quantization={self.quantization!r}: save the original checkpoint "
                "instead (loading quantizes it again in seconds)"
            )
        state = self.state_dict()
        offloaded = [k for k, t in state.items() if t.device.type == "meta"]
        if offloaded:
            raise ValueError(
                f"cannot save: {len(offloaded)} weight(s) ({few(offloaded)}) are offloaded, not in memory; load "
                "the model without offloading (no 'disk', no 'cpu' next to a GPU in device_map) to save it"
            )
        os.makedirs(folder, exist_ok=True)
        save_weights(state, os.fspath(folder), max_shard_size)
        config = self.config.to_dict()
        config["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        _write_json(os.path.join(folder, "config.json"), config)
        if getattr(self, "generation_config", None):
            _write_json(os.path.join(folder, "generation_config.json"), self.generation_config)


def _write_json(file: str, data: dict) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{file} does not exist: a checkpoint folder needs a config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None


def _read_config(cls: type, folder: str) -> Any:
    """The config of `cls` from config.json: a full Mllama config, or (for the text or vision model
    alone) the matching sub-config of one, or that sub-model's own config."""
    file = os.path.join(folder, "config.json")
    data = _read_json(file)
    config_class = cls.config_class
    if config_class is MllamaConfig:
        return MllamaConfig.from_dict(data, source=file)
    model_type = data.get("model_type")
    if model_type == MllamaConfig.model_type:
        key = _SUB_CONFIG_KEY[config_class]
        if not isinstance(data.get(key), dict):
            raise ConfigError(f"{file}: field '{key}' should be an object, got {data.get(key)!r}")
        return config_class.from_dict(data[key], source=file, prefix=f"{key}.")
    if model_type == config_class.model_type:
        return config_class.from_dict(data, source=file)
    raise ConfigError(
        f"{file}: model_type is {model_type!r}; {cls.__name__} loads checkpoints of model_type "
        f"'mllama' or {config_class.model_type!r}"
    )


def _parse_dtype(value: Any, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(
        f"{what} must be 'auto', a floating torch.dtype or one of {', '.join(map(repr, _DTYPES))}; got {value!r}"
    )


def _auto_dtype(folder: str, infos: dict[str, TensorInfo]) -> torch.dtype:
    """config.json's `torch_dtype` (Hub files) or `dtype` (transformers >= 5), else the weights' dtype."""
    file = os.path.join(folder, "config.json")
    if os.path.isfile(file):
        data = _read_json(file)
        name = data.get("torch_dtype") or data.get("dtype")
        if name is not None:
            return _parse_dtype(name, f"{file}: 'torch_dtype'")
    return first_float_dtype(infos) or torch.float32


def _check_keys(model: nn.Module, mapping: dict[str, str], infos: dict[str, TensorInfo], folder: str) -> None:
    """Every weight of `model` comes from the checkpoint, every mapped tensor is a weight, shapes agree."""
    cls = type(model).__name__
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    loaded = set(mapping.values())
    missing = [repr(n) for n in expected if n not in loaded]
    unexpected = [repr(k) for k, n in mapping.items() if n not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) of {cls} are not in the checkpoint: {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensor(s) match no weight of {cls}: {few(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{folder}: {'; '.join(problems)}. Is this a checkpoint of {cls}, with its own config.json?"
        )
    mismatched = [
        f"{key!r} in {os.path.basename(infos[key].file)}: expected {expected[name]}, found {infos[key].shape}"
        for key, name in mapping.items()
        if infos[key].shape != expected[name]
    ]
    if mismatched:
        raise CheckpointError(
            f"{folder}: shape mismatch for {len(mismatched)} tensor(s): {few(mismatched)}. The config "
            "does not describe these weights"
        )


def _load_weights(
    model: nn.Module,
    mapping: dict[str, str],
    infos: dict[str, TensorInfo],
    device_map: dict[str, Device],
    dtype: torch.dtype,
    offload_folder: str | os.PathLike | None,
    quantize: dict[str, str],
) -> None:
    """Read each mapped tensor once, shard by shard, cast it and put it on its device or on disk.
    A few threads read, copy and cast (torch releases the GIL), at most a few tensors ahead.
    `quantize`: {parameter name: "int8" | "int4"}, quantized on their device by the reading thread,
    so that at most one full-precision copy per thread exists at a time."""
    offload_index: dict = {}

    def read(f, key: str) -> tuple[Device, torch.Tensor]:
        device = device_of(mapping[key], device_map)
        tensor = f.get_tensor(key)
        if device != "disk":
            tensor = tensor.to(torch_device(device))  # cast on the device: host memory holds the original only
        tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if mapping[key] in quantize:
            tensor = quant.quantize_weight(tensor, quantize[mapping[key]])
        return device, tensor

    def place(key: str, device: Device, tensor: torch.Tensor) -> None:
        name = mapping[key]
        if name in quantize:  # a torchao tensor subclass: the module takes it as it is
            module, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(module), attribute, tensor)
            return
        if device == "disk":
            offload_weight(tensor, name, offload_folder, offload_index)
            tensor = torch.empty_like(tensor, device="meta")  # keeps the dtype visible on the module
            device = "meta"
        set_module_tensor_to_device(model, name, device, value=tensor, dtype=tensor.dtype, clear_cache=False)

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        for file, keys in groupby(sorted(mapping, key=lambda k: infos[k].file), key=lambda k: infos[k].file):
            with safe_open(file, framework="pt") as f:
                pending: deque = deque()
                for key in keys:
                    pending.append((key, pool.submit(read, f, key)))
                    if len(pending) > 2 * _READ_THREADS:
                        key_done, future = pending.popleft()
                        place(key_done, *future.result())
                while pending:
                    key_done, future = pending.popleft()
                    place(key_done, *future.result())
    if offload_index:
        save_offload_index(offload_index, offload_folder)


def _device_or_disk(device: Device) -> torch.device | str:
    return device if device == "disk" else torch_device(device)


def _place(model: nn.Module, device_map: dict[str, Device], offload_folder: str | os.PathLike | None) -> None:
    """Move the buffers the modules computed on the CPU; add accelerate's hooks when weights are spread."""
    devices = set(device_map.values())
    if len(devices) == 1 and "disk" not in devices:
        model.to(torch_device(devices.pop()))
        return
    with warnings.catch_warnings():
        # Entries for single tensors are valid (accelerate's own infer_auto_device_map makes them).
        warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
        dispatch_model(model, device_map, main_device=main_device(device_map), offload_dir=offload_folder)
    model.hf_device_map = device_map
