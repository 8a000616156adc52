"""Output records of the forward passes, with the class names, fields and behaviour of
transformers' ModelOutput: attributes, `out["logits"]`, `out[0]` and slices over the fields that
are set, `to_tuple()`, `in`, iteration over the keys, `.keys()/.values()/.items()`.

transformers 5 calls the cache field `cache` and still answers to its old name
`past_key_values` (attribute, key, `in`, and forward argument); so do we.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

OLD_CACHE_NAME = "past_key_values"


class ModelOutput:
    """A dataclass read like an ordered dict of its fields that are not None."""

    def _field_name(self, key: str) -> str:
        return "cache" if key == OLD_CACHE_NAME and "cache" in self.__dataclass_fields__ else key

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        """The fields that are set, in order; a nested output (image_outputs) becomes its tuple."""
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self:
                raise KeyError(key)
            return getattr(self, self._field_name(key))
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        name = self._field_name(key)
        if name not in self.__dataclass_fields__:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, name, value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._field_name(key) in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    @property
    def past_key_values(self) -> Any:
        return self.cache


@dataclass(eq=False)
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class MultimodalBaseModelOutputWithPast(BaseModelOutputWithPast):
    """MllamaModel's output: the text model's, plus the vision tower's when pictures were given."""

    image_outputs: BaseModelOutput | None = None
    video_outputs: Any = None
    audio_outputs: Any = None


@dataclass(eq=False)
class MultimodalCausalLMOutputWithPast(CausalLMOutputWithPast):
    """MllamaForConditionalGeneration's output."""

    image_outputs: BaseModelOutput | None = None
    video_outputs: Any = None
    audio_outputs: Any = None


@dataclass(eq=False)
class GenerateDecoderOnlyOutput(ModelOutput):
    """What `generate(return_dict_in_generate=True)` returns without beams, fields as transformers
    5.x names and orders them: the token ids and, when asked, one (rows, V) float32 tensor per new
    token of processed `scores` and raw `logits`; `cache` the decoding cache (None when compiled
    decoding keeps it). `attentions` and `hidden_states` are not produced (always None)."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Any = None


@dataclass(eq=False)
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """What beam search returns with `return_dict_in_generate=True`: the best hypotheses
    (B * num_return_sequences, length), their final scores `sequences_scores` (with
    `output_scores`), per step the processed log-probabilities `scores` and raw `logits` of every
    beam (B * num_beams, V), and `beam_indices` (B * num_return_sequences, new tokens): the row
    each token continued, -1 past a hypothesis' end."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Any = None


def accepts_past_key_values(forward: Callable) -> Callable:
    """Let a forward that takes `cache=` also take the old name `past_key_values=`."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if OLD_CACHE_NAME in kwargs:
            old = kwargs.pop(OLD_CACHE_NAME)
            if kwargs.get("cache") is not None and old is not None:
                raise ValueError("pass the cache once, as cache= (past_key_values= is its old name)")
            kwargs["cache"] = kwargs.get("cache") if old is None else old
        return forward(self, *args, **kwargs)

    return wrapper


def returned(output: ModelOutput, return_dict: bool | None, config) -> ModelOutput | tuple:
    """`output`, or `output.to_tuple()` when return_dict is False (unset: the config's
    `return_dict`, True by default), as transformers' forwards do."""
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return output if return_dict else output.to_tuple()
