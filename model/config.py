"""Mllama configuration: dataclasses read from a checkpoint's config.json.

The field names are the JSON keys of the Hub files (and of transformers' configs). Generic keys
that transformers writes into every config (`max_length`, `id2label`, ...) are ignored; a known
key with a value of the wrong type is an error that names the field and the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

SEMANTICS = ("meta", "transformers")
"""`meta`: the math of Meta's reference code, which the weights were trained with (default).
`transformers`: reproduce transformers >= 4.56 exactly (vision intermediate features are the
outputs of the listed layers, and text rows that see no image still get the cross-attention
output). README, "Semantics", says why both exist."""

DEFAULT_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]


class ConfigError(ValueError):
    """A config.json that cannot describe an Mllama model."""


def _check_semantics(value: str) -> str:
    if value not in SEMANTICS:
        raise ConfigError(f"semantics must be one of {SEMANTICS}, got {value!r}")
    return value


def _type_ok(value: Any, typ: Any) -> bool:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        return any(_type_ok(value, t) for t in typing.get_args(typ))
    if typ is type(None):
        return value is None
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list)
    if origin is dict or typ is dict:
        return isinstance(value, dict)
    return isinstance(value, typ)


class _JsonConfig:
    """Shared from_dict/to_dict for the three config dataclasses."""

    model_type: ClassVar[str]

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", prefix: str = ""):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data or not f.init:
                continue
            value = data[f.name]
            if not _type_ok(value, hints[f.name]):
                raise ConfigError(
                    f"{source}: field '{prefix}{f.name}' should be {_type_name(hints[f.name])}, "
                    f"got {value!r}"
                )
            kwargs[f.name] = float(value) if hints[f.name] is float else value
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {prefix}{e}") from None

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "semantics"}
        out["model_type"] = self.model_type
        return json.loads(json.dumps(out))  # deep copy of lists/dicts


def _type_name(typ: Any) -> str:
    return str(typ).replace("typing.", "").replace("<class '", "").replace("'>", "")


@dataclass
class MllamaVisionConfig(_JsonConfig):
    """The tiled ViT: 'local' encoder layers, gated 'global' layers, intermediate features."""

    model_type: ClassVar[str] = "mllama_vision_model"
    hidden_size: int = 1280
    hidden_act: str = "gelu"
    num_hidden_layers: int = 32
    num_global_layers: int = 8
    attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5120
    vision_output_dim: int = 7680
    image_size: int = 448
    patch_size: int = 14
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: list | None = None
    supported_aspect_ratios: list | None = None
    initializer_range: float = 0.02
    semantics: str = "meta"

    def __post_init__(self) -> None:
        if self.intermediate_layers_indices is None:
            self.intermediate_layers_indices = [3, 7, 15, 23, 30]
        if self.supported_aspect_ratios is None:
            self.supported_aspect_ratios = [list(r) for r in DEFAULT_ASPECT_RATIOS]
        _check_semantics(self.semantics)
        if self.hidden_act != "gelu":
            raise ConfigError(f"hidden_act: only 'gelu' is supported, got {self.hidden_act!r}")
        if self.hidden_size % self.attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by attention_heads ({self.attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        for i in self.intermediate_layers_indices:
            if not 0 <= i < self.num_hidden_layers:
                raise ConfigError(
                    f"intermediate_layers_indices: {i} is not a layer index (num_hidden_layers={self.num_hidden_layers})"
                )
        expected = (len(self.intermediate_layers_indices) + 1) * self.hidden_size
        if self.vision_output_dim != expected:
            raise ConfigError(
                f"vision_output_dim should be (len(intermediate_layers_indices) + 1) * hidden_size = {expected}, "
                f"got {self.vision_output_dim}"
            )
        for r in self.supported_aspect_ratios:
            if len(r) != 2 or r[0] * r[1] > self.max_num_tiles:
                raise ConfigError(
                    f"supported_aspect_ratios: {r} is not a (rows, cols) pair with at most max_num_tiles "
                    f"({self.max_num_tiles}) tiles"
                )

    @property
    def num_attention_heads(self) -> int:
        return self.attention_heads

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)

    @property
    def num_patches(self) -> int:
        """Tokens per tile: the patch grid plus the class token (1601 for 560-px tiles)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", prefix: str = ""):
        data = dict(data)
        if "attention_heads" not in data and "num_attention_heads" in data:
            data["attention_heads"] = data["num_attention_heads"]
        return super().from_dict(data, source, prefix)


@dataclass
class MllamaTextConfig(_JsonConfig):
    """Llama 3.1 decoder with gated cross-attention layers at `cross_attention_layers`."""

    model_type: ClassVar[str] = "mllama_text_model"
    vocab_size: int = 128256
    hidden_size: int = 4096
    hidden_act: str = "silu"
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    cross_attention_layers: list | None = None
    dropout: float = 0.0
    bos_token_id: int | None = 128000
    eos_token_id: int | list | None = 128001
    pad_token_id: int | None = 128004
    semantics: str = "meta"

    def __post_init__(self) -> None:
        if self.cross_attention_layers is None:
            self.cross_attention_layers = [3, 8, 13, 18, 23, 28, 33, 38]
        _check_semantics(self.semantics)
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for i in self.cross_attention_layers:
            if not 0 <= i < self.num_hidden_layers:
                raise ConfigError(
                    f"cross_attention_layers: {i} is not a layer index (num_hidden_layers={self.num_hidden_layers})"
                )
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            scaling.pop("rope_theta", None)
            if scaling["rope_type"] not in ("default", "llama3"):
                raise ConfigError(
                    f"rope_scaling.rope_type: only 'default' and 'llama3' are supported, got {scaling['rope_type']!r}"
                )
            if scaling["rope_type"] == "llama3":
                for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key not in scaling:
                        raise ConfigError(f"rope_scaling: the llama3 rope type needs '{key}'")
            self.rope_scaling = None if scaling["rope_type"] == "default" else scaling

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", prefix: str = ""):
        data = dict(data)
        # transformers >= 5 writes one `rope_parameters` object that also holds rope_theta.
        params = data.pop("rope_parameters", None)
        if params is not None:
            if not isinstance(params, dict):
                raise ConfigError(f"{source}: field '{prefix}rope_parameters' should be an object, got {params!r}")
            params = dict(params)
            if "rope_theta" in params:
                data["rope_theta"] = params.pop("rope_theta")
            data.setdefault("rope_scaling", params)
        return super().from_dict(data, source, prefix)


@dataclass
class MllamaConfig(_JsonConfig):
    """The whole model: vision tower, projector and text decoder."""

    model_type: ClassVar[str] = "mllama"
    vision_config: MllamaVisionConfig = field(default_factory=MllamaVisionConfig)
    text_config: MllamaTextConfig = field(default_factory=MllamaTextConfig)
    image_token_index: int = 128256
    torch_dtype: str | None = None
    architectures: list | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = MllamaVisionConfig.from_dict(self.vision_config, prefix="vision_config.")
        if isinstance(self.text_config, dict):
            self.text_config = MllamaTextConfig.from_dict(self.text_config, prefix="text_config.")

    @property
    def semantics(self) -> str:
        return self.text_config.semantics

    @semantics.setter
    def semantics(self, value: str) -> None:
        _check_semantics(value)
        self.vision_config.semantics = value
        self.text_config.semantics = value

    @property
    def image_token_id(self) -> int:
        return self.image_token_index

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", prefix: str = ""):
        if data.get("model_type", "mllama") != "mllama":
            raise ConfigError(
                f"{source}: model_type is {data['model_type']!r}, not 'mllama': this is not a Llama 3.2 Vision "
                "checkpoint"
            )
        data = dict(data)
        if "image_token_index" not in data and "image_token_id" in data:
            data["image_token_index"] = data["image_token_id"]
        if "torch_dtype" not in data and "dtype" in data:
            data["torch_dtype"] = data["dtype"]
        for key, sub in (("vision_config", MllamaVisionConfig), ("text_config", MllamaTextConfig)):
            value = data.get(key, {})
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: field '{key}' should be an object, got {value!r}")
            data[key] = sub.from_dict(value, source, prefix=f"{key}.")
        return super().from_dict(data, source, prefix)

    def to_dict(self) -> dict:
        out = {
            "image_token_index": self.image_token_index,
            "model_type": self.model_type,
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
        }
        for key in ("architectures", "torch_dtype"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "MllamaConfig":
        """Read `config.json` from a checkpoint folder (or a hub id already in the local cache)."""
        from .hub import resolve_checkpoint

        folder = resolve_checkpoint(path, allow_patterns=["config.json"])
        return cls.from_json_file(os.path.join(folder, "config.json"), **overrides)

    @classmethod
    def from_json_file(cls, file: str | os.PathLike, **overrides: Any) -> "MllamaConfig":
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{file} does not exist: a checkpoint folder needs a config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        semantics = overrides.pop("semantics", None)
        config = cls.from_dict(data, source=str(file))
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ConfigError(f"unknown config field {key!r}")
            setattr(config, key, value)
        if semantics is not None:
            config.semantics = semantics
        return config

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
