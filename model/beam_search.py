"""Beam search bookkeeping: which beams live on, which are finished, and how they score.

The rules are those of transformers 5.x `GenerationMixin._beam_search` (the vectorised one), so
that the same call gives the same beams, scores and indices:

- every step keeps the best `keep = max(2, 1 + n_eos) * num_beams` continuations of each prompt
  (sampled without replacement when sampling), so that `num_beams` of them are still running
  even if the best ones all end;
- a continuation that ends (an eos token, or the last step) joins the finished hypotheses if it
  is among the `num_beams` best of the step, scored `sum of log-probs / new_length ** length_penalty`;
- `early_stopping`: True stops a prompt once it has `num_beams` finished hypotheses; False stops
  it when the best running beam, scored at its current length, cannot beat the worst finished
  one; "never" assumes (with a positive length penalty) that a running beam could still grow to
  the maximum length.

The decoding itself (model, cache, logits processing) stays in `generate`; this class only sees
log-probabilities and hands back the next tokens and the rows they continue.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

EarlyStopping = bool | str
_NEG = -1.0e9  # transformers' "impossible" score; its exact value shows in returned scores


@dataclass(frozen=True)
class SearchConfig:
    """How many sequences each prompt gets and how beams are scored; transformers' defaults."""

    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False

    @property
    def expand(self) -> int:
        """Rows per prompt."""
        return max(self.num_beams, self.num_return_sequences)

    @classmethod
    def from_generation_config(
        cls, generation_config: Mapping[str, Any], *, do_sample: bool, **overrides: Any
    ) -> SearchConfig:
        """An override that is not None > the checkpoint's generation_config.json > the default;
        then transformers' checks, with what to pass instead."""
        values = {}
        for f in fields(cls):
            value = overrides.get(f.name)
            value = generation_config.get(f.name) if value is None else value
            if value is not None:
                values[f.name] = value
        config = cls(**values)
        config._check(do_sample)
        return config

    def _check(self, do_sample: bool) -> None:
        for name in ("num_beams", "num_return_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)):
            raise ValueError(f"length_penalty={self.length_penalty!r}: must be a number (> 0 favours longer sequences)")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping={self.early_stopping!r}: must be True, False or 'never'")
        if self.num_return_sequences > 1 and self.num_beams == 1 and not do_sample:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} without beam search needs do_sample=True "
                "(greedy decoding returns one sequence per prompt); or pass num_beams >= num_return_sequences")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) has to be smaller or equal to num_beams "
                f"({self.num_beams}): beam search returns its best finished beams")


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, K, ...) indexed along K by index (B, k) -> (B, k, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def fill_value(pad_token_id: int | None, eos_token_ids: list[int]) -> int:
    """What fills finished hypotheses after their end: transformers' rule, which takes the first
    eos id when the pad id is 0 or unset, and -1 without eos ids (then nothing ends early)."""
    if not eos_token_ids:
        return -1
    return pad_token_id if pad_token_id else eos_token_ids[0]


class BeamSearch:
    """`num_beams` running beams per prompt over `ids` (B * num_beams, prompt_len) whose rows are
    each prompt repeated `num_beams` times; sequences may grow to `max_length` tokens."""

    def __init__(
        self,
        ids: torch.Tensor,
        *,
        num_beams: int,
        max_length: int,
        eos_token_ids: list[int],
        pad_token_id: int | None,
        length_penalty: float,
        early_stopping: EarlyStopping,
        do_sample: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        rows, self.prompt_len = ids.shape
        self.batch, self.num_beams, self.max_length = rows // num_beams, num_beams, max_length
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.do_sample, self.generator = do_sample, generator
        device = ids.device
        self.eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
        self.keep = max(2, 1 + len(eos_token_ids)) * num_beams
        self.top_beams = torch.arange(self.keep, device=device) < num_beams  # (keep,)
        shape = (self.batch, num_beams)
        self.running = torch.full((*shape, max_length), fill_value(pad_token_id, eos_token_ids),
                                  dtype=torch.long, device=device)
        self.running[:, :, : self.prompt_len] = ids.view(*shape, -1)
        self.finished = self.running.clone()
        # Only the first beam of a prompt starts alive, so the first step does not pick the same
        # token num_beams times.
        self.running_scores = torch.zeros(shape, device=device)
        self.running_scores[:, 1:] = _NEG
        self.finished_scores = torch.full(shape, _NEG, device=device)
        self.is_finished = torch.zeros(shape, dtype=torch.bool, device=device)
        self.can_improve = torch.ones(self.batch, 1, dtype=torch.bool, device=device)
        # Per generated token, the row (b * num_beams + beam) it continued; -1 where none.
        self.running_indices = torch.full((*shape, max_length - self.prompt_len), -1, dtype=torch.int32, device=device)
        self.finished_indices = self.running_indices.clone()
        self.done = False

    @property
    def ids(self) -> torch.Tensor:
        """(B * num_beams, max_length) the running beams' tokens, rows in beam order."""
        return self.running.flatten(0, 1)

    def step(self, log_probs: torch.Tensor, length: int, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend the beams of sequences of `length` tokens by one token, from the processed
        log-probabilities (B * num_beams, V). `last`: no token may follow this one (the maximum
        length, or a stop request). Returns the new tokens (B * num_beams,) and, per row, the row
        whose cache it continues (B * num_beams,)."""
        b, k, vocab = self.batch, self.num_beams, log_probs.shape[-1]
        new = length - self.prompt_len
        totals = (log_probs.view(b, k, vocab) + self.running_scores[:, :, None]).view(b, k * vocab)
        if self.do_sample:
            picked = torch.multinomial(totals.softmax(-1), num_samples=self.keep, generator=self.generator)
            top_scores, order = totals.gather(1, picked).sort(dim=-1, descending=True)
            picked = picked.gather(1, order)
        else:
            top_scores, picked = torch.topk(totals, k=self.keep)
        source = picked // vocab  # (b, keep) beam of its prompt
        tokens = picked % vocab
        top_sequences = _gather(self.running, source)
        top_sequences[:, :, length] = tokens
        top_indices = _gather(self.running_indices, source)
        top_indices[:, :, new] = (source + torch.arange(b, device=source.device)[:, None] * k).to(top_indices.dtype)
        ends = torch.isin(tokens, self.eos) if not last else torch.ones_like(tokens, dtype=torch.bool)

        # The best continuations that did not end keep running.
        alive_scores = top_scores + ends.float() * _NEG
        best = torch.topk(alive_scores, k=k)[1]
        self.running = _gather(top_sequences, best)
        self.running_scores = _gather(alive_scores, best)
        self.running_indices = _gather(top_indices, best)

        self._add_finished(top_sequences, top_scores, top_indices, ends, new + 1)
        self._update_can_improve(new + 1)
        self.done = not (bool(self.can_improve.any())
                         and not (bool(self.is_finished.all()) and self.early_stopping is True)
                         and not bool(ends.all()))
        return self.running[:, :, length].flatten(), self.running_indices[:, :, new].flatten().long()

    def _add_finished(self, sequences, scores, indices, ends, new_length: int) -> None:
        """Keep the num_beams best finished hypotheses of each prompt, old and new."""
        just_finished = ends & self.top_beams[None, :]
        scores = scores / (new_length ** self.length_penalty)
        full = self.is_finished.all(dim=-1, keepdim=True) & (self.early_stopping is True)
        scores = scores + full.float() * _NEG
        scores = scores + (~self.can_improve).float() * _NEG
        scores = scores + (~just_finished) * _NEG
        merged_scores = torch.cat((self.finished_scores, scores), dim=1)
        best = torch.topk(merged_scores, k=self.num_beams)[1]
        self.finished = _gather(torch.cat((self.finished, sequences), dim=1), best)
        self.finished_scores = _gather(merged_scores, best)
        self.finished_indices = _gather(torch.cat((self.finished_indices, indices), dim=1), best)
        self.is_finished = _gather(torch.cat((self.is_finished, just_finished), dim=1), best)

    def _update_can_improve(self, new_length: int) -> None:
        """Could the best running beam still beat the worst finished hypothesis?"""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            new_length = self.max_length - self.prompt_len
        best_running = self.running_scores[:, :1] / (new_length ** self.length_penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(dim=1, keepdim=True)[0], _NEG)
        self.can_improve = self.can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)

    def result(self, num_return_sequences: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The best `num_return_sequences` finished hypotheses of each prompt, best first:
        sequences (B * n, prompt_len + longest), scores (B * n,), beam indices (B * n, longest)."""
        n = num_return_sequences
        sequences = self.finished[:, :n].flatten(0, 1)
        scores = self.finished_scores[:, :n].flatten()
        indices = self.finished_indices[:, :n].flatten(0, 1)
        longest = int((indices + 1).bool().sum(dim=1).max())
        return sequences[:, : self.prompt_len + longest], scores, indices[:, :longest]
