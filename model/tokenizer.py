"""A small tokenizer over `tokenizers.Tokenizer`, reading a checkpoint's tokenizer files like transformers.

Files: tokenizer.json (the vocabulary, merges, pre/post-processing), tokenizer_config.json and
special_tokens_map.json (which added tokens are BOS/EOS/PAD, model_max_length, padding_side).
Decoding is the `tokenizers` decoder alone: transformers 5 ignores clean_up_tokenization_spaces
for BPE tokenizers, and so do we.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer

from .batch_feature import convert_tensors

_VERY_LARGE = int(1e30)  # transformers' "no limit" value of model_max_length


def _token_text(value: Any) -> str | None:
    """Special tokens are stored as a string or as an AddedToken dict {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class MllamaTokenizer:
    """Encode/decode with the checkpoint's special tokens, padding and length limit."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, model_max_length: int = _VERY_LARGE,
                 padding_side: str = "right") -> None:
        self._tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the vocabulary of tokenizer.json. Fix {name} in "
                                 "tokenizer_config.json / special_tokens_map.json.")
        self.model_max_length = model_max_length
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        self.padding_side = padding_side
        self.init_kwargs: dict[str, Any] = {}  # tokenizer_config.json as read, written back by save_pretrained

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` underneath (transformers' name for it)."""
        return self._tokenizer

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MllamaTokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"No tokenizer.json in {folder}. Pass the folder of a Mllama checkpoint.")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path} could not be read ({error}). Restore it from the checkpoint.") from None
        settings: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
            file = folder / name
            if file.is_file():
                settings.update(json.loads(file.read_text()))
        limit = settings.get("model_max_length") or _VERY_LARGE
        loaded = cls(tokenizer, bos_token=_token_text(settings.get("bos_token")),
                     eos_token=_token_text(settings.get("eos_token")), pad_token=_token_text(settings.get("pad_token")),
                     model_max_length=int(min(limit, _VERY_LARGE)), padding_side=settings.get("padding_side", "right"))
        config = folder / "tokenizer_config.json"
        loaded.init_kwargs = json.loads(config.read_text()) if config.is_file() else {}
        return loaded

    def save_pretrained(self, folder: str | Path, special_tokens_map: bool = False) -> list[str]:
        """Write tokenizer.json and tokenizer_config.json (other keys of the config read are kept; the
        added tokens live in tokenizer.json); `special_tokens_map` also writes special_tokens_map.json,
        as the official checkpoints have it. Returns the files written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(folder / "tokenizer.json"))
        config = {k: v for k, v in self.init_kwargs.items() if k != "added_tokens_decoder"}
        config.update(self.special_tokens_map, padding_side=self.padding_side)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self.model_max_length < _VERY_LARGE:
            config["model_max_length"] = self.model_max_length
        files = [folder / "tokenizer.json", folder / "tokenizer_config.json"]
        files[1].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if special_tokens_map:
            files.append(folder / "special_tokens_map.json")
            files[2].write_text(json.dumps(self.special_tokens_map, indent=2, sort_keys=True) + "\n")
        return [str(f) for f in files]

    # --------------------------------------------------------------- vocabulary
    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._tokenizer.token_to_id(self.pad_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The special tokens by role, as a chat template sees them (bos_token, eos_token, pad_token)."""
        return {name: token for name, token in
                (("bos_token", self.bos_token), ("eos_token", self.eos_token), ("pad_token", self.pad_token))
                if token is not None}

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special)

    def add_tokens(self, new_tokens: str | Sequence[str], special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (after the existing ids); returns how many were new. Resize
        the model's embeddings to `len(tokenizer)` afterwards."""
        tokens = [new_tokens] if isinstance(new_tokens, str) else list(new_tokens)
        if special_tokens:
            return self._tokenizer.add_special_tokens(tokens)
        return self._tokenizer.add_tokens(tokens)

    # --------------------------------------------------------------- encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True,
                 padding: bool | str = False, truncation: bool = False, max_length: int | None = None,
                 padding_side: str | None = None, return_tensors: str | None = None) -> dict[str, Any]:
        """input_ids and attention_mask (one row per text; a single string gives one flat row), as lists or,
        with return_tensors="pt"/"np", a BatchFeature of (B, L) tensors. padding: False, True/"longest",
        or "max_length" (needs max_length)."""
        if return_tensors is not None:
            batch = self([text] if isinstance(text, str) else text, add_special_tokens, padding, truncation,
                         max_length, padding_side)
            if len(set(map(len, batch["input_ids"]))) > 1:
                raise ValueError("The texts tokenize to different lengths; pass padding=True to get one tensor.")
            return convert_tensors(batch, return_tensors)
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings.")
        ids = [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
        if truncation:
            if max_length is None:
                max_length = self.model_max_length
            ids = [seq[:max_length] for seq in ids]
        masks = [[1] * len(seq) for seq in ids]
        if padding:
            ids, masks = self._pad(ids, masks, padding, max_length, padding_side or self.padding_side)
        if single:
            return {"input_ids": ids[0], "attention_mask": masks[0]}
        return {"input_ids": ids, "attention_mask": masks}

    def _pad(self, ids: list[list[int]], masks: list[list[int]], padding: bool | str, max_length: int | None,
             side: str) -> tuple[list[list[int]], list[list[int]]]:
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}.")
        if self.pad_token_id is None:
            raise ValueError("This tokenizer has no pad_token, so it cannot pad. Set pad_token in "
                             "tokenizer_config.json, or pass one text at a time.")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length.")
        target = max(max(map(len, ids)), max_length or 0) if padding == "max_length" else max(map(len, ids))
        out_ids, out_masks = [], []
        for seq, mask in zip(ids, masks):
            fill = target - len(seq)
            if side == "left":
                out_ids.append([self.pad_token_id] * fill + seq)
                out_masks.append([0] * fill + mask)
            else:
                out_ids.append(seq + [self.pad_token_id] * fill)
                out_masks.append(mask + [0] * fill)
        return out_ids, out_masks

    # --------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids (a list, or a 1-D tensor/array)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]] | Any, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]
