"""What a forward collects when asked (`output_hidden_states`, `output_attentions`), and the
attention function that can hand its weights to it.

A forward that is not asked passes `None` down: the layers then run exactly as without this
module (scaled_dot_product_attention, nothing kept), which is what decoding does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Recording:
    """Hidden states and attention weights of one forward, in the order the layers ran."""

    def __init__(self, hidden_states: bool, attentions: bool) -> None:
        self.hidden_states: list[torch.Tensor] | None = [] if hidden_states else None
        self.attentions: list[torch.Tensor] | None = [] if attentions else None

    @classmethod
    def asked(cls, config, output_hidden_states: bool | None, output_attentions: bool | None) -> Recording | None:
        """A recording if either is asked (unset flags default to the config's, as in transformers)."""
        if not isinstance(output_hidden_states, (bool, type(None))):
            raise TypeError(f"output_hidden_states takes True or False, got {output_hidden_states!r}: to pick layers, "
                            "index the returned hidden_states")
        hidden = getattr(config, "output_hidden_states", False) if output_hidden_states is None else output_hidden_states
        attentions = getattr(config, "output_attentions", False) if output_attentions is None else output_attentions
        return cls(bool(hidden), bool(attentions)) if hidden or attentions else None

    def hidden(self, x: torch.Tensor) -> None:
        if self.hidden_states is not None:
            self.hidden_states.append(x)

    def fields(self, last_hidden_state: torch.Tensor | None = None) -> dict:
        """`hidden_states` / `attentions` for an output record (None when not asked). With
        `last_hidden_state`, it replaces the last layer's output (transformers' convention for
        decoders, whose last hidden state is normalised)."""
        hidden = self.hidden_states
        if hidden and last_hidden_state is not None:
            hidden = hidden[:-1] + [last_hidden_state]
        return {
            "hidden_states": None if hidden is None else tuple(hidden),
            "attentions": None if self.attentions is None else tuple(self.attentions),
        }


def recorded(recording: Recording | None, last_hidden_state: torch.Tensor | None = None) -> dict:
    return recording.fields(last_hidden_state) if recording is not None else {}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           recording: Recording | None = None, *, is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, q, D) queries and (B, H_kv, k, D) keys/values
    (grouped-query heads allowed). When the recording wants attention weights, they are computed
    explicitly (softmax in float32, as transformers' eager attention does) and kept."""
    if recording is None or recording.attentions is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if is_causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), torch.finfo(scores.dtype).min)
    if mask is not None:
        scores = scores + mask
    weights = scores.float().softmax(-1).to(q.dtype)
    recording.attentions.append(weights)
    return weights @ v


def record_hidden(recording: Recording | None, x: torch.Tensor) -> None:
    if recording is not None:
        recording.hidden(x)
