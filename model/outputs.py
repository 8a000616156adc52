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


class _GenerateOutput(_Output):
    @property
    def past_key_values(self) -> Any:
        """The older name of `cache` (transformers still answers to it)."""
        return self.cache


@dataclass
class GenerateDecoderOnlyOutput(_GenerateOutput):
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


@dataclass
class GenerateBeamDecoderOnlyOutput(_GenerateOutput):
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
