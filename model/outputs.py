"""Output records of the forward passes (the fields users of transformers read)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


class _Output:
    """Attribute access plus `out["logits"]` and `out.keys()`, like transformers' ModelOutput."""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class BaseModelOutput(_Output):
    last_hidden_state: torch.Tensor


@dataclass
class BaseModelOutputWithPast(_Output):
    last_hidden_state: torch.Tensor
    past_key_values: Any = None


@dataclass
class CausalLMOutputWithPast(_Output):
    logits: torch.Tensor
    past_key_values: Any = None
    loss: torch.Tensor | None = None


@dataclass
class GenerateDecoderOnlyOutput(_Output):
    """What `generate(return_dict_in_generate=True)` returns: the token ids and, when asked, one
    (B, V) float32 tensor per new token of processed `scores` and raw `logits`."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    past_key_values: Any = None
