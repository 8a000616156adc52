"""get/set of the input and output embeddings and `resize_token_embeddings`, as transformers has them.

The text model's `embed_tokens` has `vocab_size + 8` rows (Meta's image-token rows follow the
vocabulary; `<|image|>` is row `vocab_size` of the original checkpoint). Resizing keeps that
shape: every old row keeps its index (so `<|image|>` and all tokens keep their embeddings), the
vocabulary becomes the new size, and the checkpoint written afterwards loads here and in
transformers. transformers instead cuts `embed_tokens` to exactly the new size, dropping the
last image rows, and then cannot load its own saved checkpoint; per token id below the new size
both give the same embeddings.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.multivariate_normal import MultivariateNormal

# Paths tried in order; the first that exists is the model's input (output) embedding module.
_INPUT_PATHS = ("embed_tokens", "model.embed_tokens", "language_model.embed_tokens",
                "language_model.model.embed_tokens", "patch_embedding")
_OUTPUT_PATHS = ("lm_head", "language_model.lm_head")


def _find(module: nn.Module, paths: tuple[str, ...]) -> str | None:
    for path in paths:
        try:
            module.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, value)


def added_rows(old: torch.Tensor, count: int, mean_resizing: bool, std: float) -> torch.Tensor:
    """`count` new rows for the (rows, dim) weight `old`: drawn from a normal with the old rows'
    mean and 1e-9 times their covariance (`mean_resizing`, the rows' mean when that covariance is
    not positive definite), else from N(0, std), as transformers initialises them."""
    if not mean_resizing:
        return torch.empty(count, old.shape[1], dtype=old.dtype, device=old.device).normal_(0.0, std)
    weight = old.float()
    mean = weight.mean(0)
    centered = weight - mean
    covariance = 1e-9 * (centered.T @ centered / old.shape[0])
    if constraints.positive_definite.check(covariance).all():
        rows = MultivariateNormal(mean, covariance_matrix=covariance).sample((count,))
    else:
        rows = mean[None].repeat(count, 1)
    return rows.to(old.dtype)


def _resized_weight(old: torch.Tensor, rows: int, mean_resizing: bool, std: float) -> torch.Tensor:
    kept = old[: min(rows, old.shape[0])]
    if rows <= old.shape[0]:
        return kept.clone()
    return torch.cat([kept, added_rows(old, rows - old.shape[0], mean_resizing, std)])


class EmbeddingsMixin:
    """For MllamaPreTrainedModel subclasses with a `config` (full or text config)."""

    def get_input_embeddings(self) -> nn.Module:
        path = _find(self, _INPUT_PATHS)
        if path is None:
            raise NotImplementedError(f"{type(self).__name__} has no input embeddings")
        return self.get_submodule(path)

    def set_input_embeddings(self, value: nn.Module) -> None:
        path = _find(self, _INPUT_PATHS)
        if path is None:
            raise NotImplementedError(f"{type(self).__name__} has no input embeddings")
        _set(self, path, value)

    def get_output_embeddings(self) -> nn.Module | None:
        path = _find(self, _OUTPUT_PATHS)
        return None if path is None else self.get_submodule(path)

    def set_output_embeddings(self, value: nn.Module) -> None:
        path = _find(self, _OUTPUT_PATHS)
        if path is None:
            raise NotImplementedError(f"{type(self).__name__} has no output embeddings (LM head)")
        _set(self, path, value)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Give the vocabulary `new_num_tokens` entries (rounded up to a multiple of
        `pad_to_multiple_of`), e.g. `len(tokenizer)` after adding tokens. New rows of the
        embeddings and the LM head are drawn as transformers draws them (see `added_rows`);
        removed ones are the last. Updates `config.vocab_size`; returns the input embeddings."""
        embeddings = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embeddings
        if not isinstance(embeddings, nn.Embedding):
            raise TypeError(f"{type(self).__name__} has no token embeddings to resize")
        text_config = self.config.get_text_config()
        vocab = text_config.vocab_size if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
            vocab = -(-vocab // pad_to_multiple_of) * pad_to_multiple_of
        if not isinstance(vocab, int) or vocab < 1:
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        image_token = getattr(self.config, "image_token_index", None)
        if image_token is not None and vocab < image_token:
            raise ValueError(f"new_num_tokens={vocab} would remove the <|image|> token (id {image_token}); "
                             f"keep at least {image_token} tokens")
        if embeddings.weight.device.type == "meta":
            raise ValueError("cannot resize embeddings that are offloaded; load the model without 'disk' in device_map")
        extra_rows = embeddings.num_embeddings - text_config.vocab_size  # Meta's image-token rows
        std = text_config.initializer_range
        with torch.no_grad():
            weight = _resized_weight(embeddings.weight.data, vocab + extra_rows, mean_resizing, std)
            embeddings.weight.data = weight
            embeddings.num_embeddings = weight.shape[0]
            if embeddings.padding_idx is not None and embeddings.padding_idx >= weight.shape[0]:
                embeddings.padding_idx = None
            head = self.get_output_embeddings()
            if head is not None:
                new_head = nn.Linear(head.in_features, vocab, bias=False, device="meta")  # Mllama's head has no bias
                new_head.weight = nn.Parameter(_resized_weight(head.weight.data, vocab, mean_resizing, std))
                new_head.requires_grad_(head.weight.requires_grad)
                self.set_output_embeddings(new_head)
        text_config.vocab_size = vocab
        for module in self.modules():
            if isinstance(getattr(module, "vocab_size", None), int):
                module.vocab_size = vocab
        return embeddings
