"""Mllama configuration: dataclasses read from a checkpoint's config.json.

The field names are the JSON keys of the Hub files (and of transformers' configs). Keys that are
not fields (`transformers_version`, `id2label`, a future field, ...) are kept as attributes and
written back by `to_dict`, as transformers does; a known key with a value of the wrong type is an
error that names the field and the file.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .activations import get_activation

SEMANTICS = ("meta", "transformers")
"""`meta`: the math of Meta's reference code, which the weights were trained with (default).
`transformers`: reproduce transformers >= 4.56 exactly (vision intermediate features are the
outputs of the listed layers, and text rows that see no image still get the cross-attention
output). README, "Semantics", says why both exist."""

DEFAULT_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]


class ConfigError(ValueError):
    """A config.json that cannot describe an Mllama model."""


def _check_activation(name: str) -> None:
    try:
        get_activation(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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
    """Shared dict/JSON/folder round trips of the three config dataclasses."""

    model_type: ClassVar[str]
    # Where this config sits inside a full Mllama config.json (None: it is the full config).
    sub_config_key: ClassVar[str | None] = None

    @classmethod
    def normalize_keys(cls, data: dict) -> dict:
        """Other spellings of the same fields (older or newer checkpoints) -> the field names."""
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", prefix: str = ""):
        try:
            data = cls.normalize_keys(dict(data))
        except ConfigError as e:
            raise ConfigError(f"{source}: {prefix}{e}") from None
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"{source}: {prefix}model_type is {model_type!r}, not {cls.model_type!r}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in data and f.init and not _type_ok(data[f.name], hints[f.name]):
                raise ConfigError(
                    f"{source}: field '{prefix}{f.name}' should be {_type_name(hints[f.name])}, got {data[f.name]!r}"
                )
            if f.name in data and hints[f.name] is float:
                data[f.name] = float(data[f.name])
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {prefix}{e}") from None

    def extra_keys(self) -> dict:
        """The keys kept from the source that are not fields of this class."""
        names = {f.name for f in dataclasses.fields(self)}
        return {k: v for k, v in vars(self).items() if k not in names and not k.startswith("_")}

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # semantics is ours, not the reference's: written only when it is not the default.
            if f.name != "semantics" or value != "meta":
                out[f.name] = value.to_dict() if isinstance(value, _JsonConfig) else value
        out.update(self.extra_keys())
        out["model_type"] = self.model_type
        return json.loads(json.dumps(out))  # deep copy of lists/dicts

    def to_json_string(self, use_diff: bool = False) -> str:
        """The JSON text `save_pretrained` writes (every field; `use_diff` is accepted for
        transformers' signature and changes nothing)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, file: str | os.PathLike, use_diff: bool = False) -> None:
        with open(file, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        self.to_json_file(os.path.join(folder, "config.json"))

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> "_JsonConfig":
        """The config of the text decoder: `text_config` of a full config, else this config."""
        return getattr(self, "text_config", self)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any):
        """Read `config.json` from a checkpoint folder (or a hub id already in the local cache); a
        sub-config also reads its part of a full Mllama config.json."""
        from .hub import resolve_checkpoint

        folder = resolve_checkpoint(path, allow_patterns=["config.json"])
        return cls.from_json_file(os.path.join(folder, "config.json"), **overrides)

    @classmethod
    def from_json_file(cls, file: str | os.PathLike, **overrides: Any):
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{file} does not exist: a checkpoint folder needs a config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        prefix = ""
        if cls.sub_config_key and isinstance(data, dict) and data.get("model_type") == MllamaConfig.model_type:
            prefix = f"{cls.sub_config_key}."
            data = data.get(cls.sub_config_key, {})
            if not isinstance(data, dict):
                raise ConfigError(f"{file}: field '{prefix[:-1]}' should be an object, got {data!r}")
        semantics = overrides.pop("semantics", None)
        config = cls.from_dict(data, source=str(file), prefix=prefix)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ConfigError(f"unknown config field {key!r}")
            setattr(config, key, value)
        if semantics is not None:
            config.semantics = semantics
        return config


def _keeps_unknown_keys(cls: type) -> type:
    """Let the dataclass `__init__` take any keyword, as transformers' configs do: other spellings
    are mapped to the fields, `model_type` is checked, the rest become attributes."""
    init = cls.__init__
    names = {f.name for f in dataclasses.fields(cls) if f.init}

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs = cls.normalize_keys(kwargs)
        model_type = kwargs.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"model_type is {model_type!r}, not {cls.model_type!r}")
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
        init(self, *args, **kwargs)
        for key, value in extra.items():
            derived = getattr(cls, key, None)
            if isinstance(derived, property) and derived.fset is None:  # e.g. head_dim: computed, not stored
                if getattr(self, key) != value:
                    raise ConfigError(f"{key}={value!r} does not agree with the other fields ({getattr(self, key)!r})")
                continue
            setattr(self, key, value)

    cls.__init__ = __init__
    return cls


def _type_name(typ: Any) -> str:
    return str(typ).replace("typing.", "").replace("<class '", "").replace("'>", "")


@_keeps_unknown_keys
@dataclass
class MllamaVisionConfig(_JsonConfig):
    """The tiled ViT: 'local' encoder layers, gated 'global' layers, intermediate features."""

    model_type: ClassVar[str] = "mllama_vision_model"
    sub_config_key: ClassVar[str] = "vision_config"
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
        _check_activation(self.hidden_act)
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
    def normalize_keys(cls, data: dict) -> dict:
        if "num_attention_heads" in data:
            heads = data.pop("num_attention_heads")
            data.setdefault("attention_heads", heads)
        return data


@_keeps_unknown_keys
@dataclass
class MllamaTextConfig(_JsonConfig):
    """Llama 3.1 decoder with gated cross-attention layers at `cross_attention_layers`."""

    model_type: ClassVar[str] = "mllama_text_model"
    sub_config_key: ClassVar[str] = "text_config"
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
        _check_activation(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        # Entries that are not layer indices (>= num_hidden_layers) are kept and name no layer, as in
        # transformers: a config can be cut to fewer layers without editing this list.
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
    def normalize_keys(cls, data: dict) -> dict:
        # transformers >= 5 writes one `rope_parameters` object that also holds rope_theta.
        params = data.pop("rope_parameters", None)
        if params is not None:
            if not isinstance(params, dict):
                raise ConfigError(f"rope_parameters should be an object, got {params!r}")
            params = dict(params)
            if "rope_theta" in params:
                data["rope_theta"] = params.pop("rope_theta")
            data.setdefault("rope_scaling", params)
        return data


@_keeps_unknown_keys
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
    def normalize_keys(cls, data: dict) -> dict:
        if "image_token_id" in data:
            token = data.pop("image_token_id")
            data.setdefault("image_token_index", token)
        if "dtype" in data:  # transformers >= 5's name of torch_dtype
            dtype = data.pop("dtype")
            data.setdefault("torch_dtype", dtype)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", prefix: str = ""):
        if data.get("model_type", "mllama") != "mllama":
            raise ConfigError(
                f"{source}: model_type is {data['model_type']!r}, not 'mllama': this is not a Llama 3.2 Vision "
                "checkpoint"
            )
        data = dict(data)
        for key, sub in (("vision_config", MllamaVisionConfig), ("text_config", MllamaTextConfig)):
            value = data.get(key, {})
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: field '{key}' should be an object, got {value!r}")
            data[key] = sub.from_dict(value, source, prefix=f"{key}.")
        return super().from_dict(data, source, prefix)

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in ("architectures", "torch_dtype"):
            if out[key] is None:
                del out[key]
        return out
