"""Next-token selection: transformers' logits processors as plain, vectorised functions.

One decode step is `select_next_tokens(process_logits(logits, ids, cfg, ...), cfg, generator)`.
The order and the math are those of transformers 5.x `GenerationMixin._get_logits_processor`:

1. repetition penalty (`RepetitionPenaltyLogitsProcessor`), always;
2. min_new_tokens: eos ids get -inf while too few tokens were generated
   (`MinNewTokensLengthLogitsProcessor`), always;
3. only when sampling: temperature, top-k, top-p (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
   `TopPLogitsWarper`, min_tokens_to_keep=1).

Everything stays on the logits' device and nothing reads a value back to the host, so a decode
step on a GPU is not stalled by sampling (no `.item()`, no Python loop over the batch).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. Defaults are transformers' global generation defaults.

    Greedy (argmax) when `do_sample` is False or `temperature` is 0; `top_k=0` and `top_p=1.0`
    switch those filters off; `repetition_penalty=1.0` switches the penalty off.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            _validate(f.name, getattr(self, f.name), "SamplingConfig")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_generation_config(
        cls, generation_config: Mapping[str, Any] | None = None, **overrides: Any
    ) -> SamplingConfig:
        """Merge a checkpoint's generation_config.json (a dict) with user overrides.

        Precedence as in transformers: an override that is not None > the checkpoint's value >
        the default. Keys of the checkpoint file that are not sampling settings (eos_token_id,
        max_length, ...) are ignored; an unknown override is an error.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; expected some of {names}")
        values: dict[str, Any] = {}
        for name in names:
            if overrides.get(name) is not None:
                value, origin = overrides[name], "the generation options"
            elif generation_config is not None and generation_config.get(name) is not None:
                value, origin = generation_config[name], "generation_config.json"
            else:
                continue
            _validate(name, value, origin)
            values[name] = value
        return cls(**values)


def _validate(name: str, value: Any, origin: str) -> None:
    """Raise a ValueError naming the field, the value and where it came from."""

    def fail(rule: str) -> None:
        raise ValueError(f"{name}={value!r} (from {origin}): {rule}")

    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_real = is_int or isinstance(value, float)
    if name == "do_sample" and not isinstance(value, bool):
        fail("must be true or false")
    elif name == "temperature" and not (is_real and value >= 0):
        fail("must be a number >= 0 (0 means greedy decoding)")
    elif name == "top_p" and not (is_real and 0 < value <= 1):
        fail("must be a number in (0, 1]; 1.0 switches top-p filtering off")
    elif name == "top_k" and not (is_int and value >= 0):
        fail("must be an integer >= 0; 0 switches top-k filtering off")
    elif name == "repetition_penalty" and not (is_real and value > 0):
        fail("must be a number > 0; 1.0 switches the penalty off")
    elif name == "min_new_tokens" and not (is_int and value >= 0):
        fail("must be an integer >= 0")


def process_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    cfg: SamplingConfig,
    *,
    new_tokens: int | torch.Tensor,
    eos_token_ids: Sequence[int],
    attention_mask: torch.Tensor | None = None,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """Turn last-position logits into the scores the next token is chosen from.

    logits: (B, V), computed in float32 like transformers' generate (other dtypes are upcast).
    input_ids: (B, L) prompt + tokens generated so far; the repetition penalty reads them.
    new_tokens: tokens generated so far, an int for the whole batch or a (B,) tensor per row
      (rows that joined a running batch at different steps).
    eos_token_ids: ids that are blocked while `new_tokens < cfg.min_new_tokens`.
    attention_mask: (B, L), 0 where input_ids holds padding (left padding of a batched prompt,
      unused slots of a preallocated buffer); those positions are not penalised, like the
      `prompt_ignore_length` transformers derives from the attention mask.
    min_tokens_to_keep: top-k and top-p never keep fewer tokens (beam sampling keeps one more
      than there are eos ids, so that some beam can go on).
    Returns (B, V) float32 scores, the logits themselves when no setting applies; the inputs
    are never modified.
    """
    scores = logits.float()
    if cfg.repetition_penalty != 1.0:
        scores = _repetition_penalty(scores, input_ids, cfg.repetition_penalty, attention_mask)
    if cfg.min_new_tokens > 0 and eos_token_ids:
        scores = _block_eos(scores, new_tokens, cfg.min_new_tokens, eos_token_ids)
    if cfg.greedy:
        return scores
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k != 0:
        scores = _top_k(scores, max(cfg.top_k, min_tokens_to_keep))
    if cfg.top_p < 1.0:
        scores = _top_p(scores, cfg.top_p, min_tokens_to_keep)
    return scores


def select_next_tokens(
    scores: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) processed scores -> (B,) long token ids: argmax when greedy, else one draw from
    softmax(scores) with `generator` (on the scores' device; the same seed gives the same
    tokens). torch.multinomial checks its input with an async assert, so it does not sync."""
    if cfg.greedy:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def _repetition_penalty(
    scores: torch.Tensor, input_ids: torch.Tensor, penalty: float, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    vocab = scores.shape[-1]
    # Ids the lm head cannot produce (Mllama's <|image|> = 128256 with V = 128256) and padding
    # positions go to an extra column that is dropped at the end.
    ids = input_ids.clamp(max=vocab)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; pass one mask entry per input id"
            )
        ids = ids.masked_fill(attention_mask == 0, vocab)
    padded = torch.nn.functional.pad(scores, (0, 1))
    seen = padded.gather(1, ids)
    # A penalty > 1 always lowers the probability: divide positive logits, multiply negative ones.
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :vocab]


def _block_eos(
    scores: torch.Tensor, new_tokens: int | torch.Tensor, min_new_tokens: int, eos_token_ids: Sequence[int]
) -> torch.Tensor:
    if isinstance(new_tokens, int) and new_tokens >= min_new_tokens:
        return scores
    scores = scores.clone()
    vocab = scores.shape[-1]
    # A loop over the (few) eos ids with plain indexing: no host->device copy of an index tensor.
    for eos in eos_token_ids:
        if not 0 <= eos < vocab:
            continue  # transformers' isin() ignores ids outside the vocabulary too
        if isinstance(new_tokens, int):
            scores[:, eos] = -math.inf
        else:
            scores[:, eos] = scores[:, eos].masked_fill(new_tokens < min_new_tokens, -math.inf)
    return scores


def _top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    k = min(top_k, scores.shape[-1])
    kth_best = torch.topk(scores, k).values[:, -1:]
    return scores.masked_fill(scores < kth_best, -math.inf)


def _top_p(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    # Drop the least likely tokens whose total mass is <= 1 - top_p; always keep the best ones.
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[:, -min_tokens_to_keep:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)
