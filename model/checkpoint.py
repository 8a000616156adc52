"""Safetensors checkpoints in the Hugging Face layout: find the files, read the headers, map the keys, write.

Reading never loads tensor data here; `loading.py` reads each tensor once, when it places it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The layout transformers >= 4.52 saves from memory -> the layout of the Hub checkpoints.
_FORMAT_B_TO_A = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """Checkpoint files that cannot give the requested model its weights."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "F32", ...


def find_weight_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder: the shards its index lists, or model.safetensors."""
    index_file = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_file):
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file} has no 'weight_map' (key -> shard file): the index is damaged")
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise CheckpointError(
                f"{index_file} lists {few([repr(m) for m in missing])}, missing from {folder}: the download is incomplete; "
                "download the missing shard(s) again"
            )
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    present = sorted(os.listdir(folder))
    raise CheckpointError(
        f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE} (it holds: {few(present) or 'nothing'}); "
        "only safetensors checkpoints in the Hugging Face layout are supported"
    )


def read_headers(files: list[str]) -> dict[str, TensorInfo]:
    """Every tensor's file, shape and dtype, from the safetensors headers only."""
    infos: dict[str, TensorInfo] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                infos[key] = TensorInfo(file, tuple(tensor.get_shape()), tensor.get_dtype())
    return infos


def first_float_dtype(infos: dict[str, TensorInfo]) -> torch.dtype | None:
    return next((_SAFETENSORS_DTYPES[i.dtype] for i in infos.values() if i.dtype in _SAFETENSORS_DTYPES), None)


def map_keys(keys: list[str], prefixes: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Checkpoint key -> module parameter name, for the keys that belong to the module.

    Format B keys are first renamed to format A and rotary `inv_freq` buffers dropped (the modules
    compute them). Then the first (checkpoint prefix, module prefix) pair that matches a key renames it;
    the catch-all pair ("", ...) applies only when no other pair matches any key, i.e. when the
    checkpoint is the module's own export rather than a bigger model it is part of.
    """
    keys = [k for k in keys if not k.endswith("inv_freq")]
    # `lm_head.` alone does not mean format B: text-only exports (format C) use it too.
    format_b = any(k.startswith(b) for k in keys for b, _ in _FORMAT_B_TO_A[:3])
    renamed = [((_rename(k, _FORMAT_B_TO_A) or k) if format_b else k, k) for k in keys]
    pairs = tuple((c, m) for c, m in prefixes if c)
    if not any(a.startswith(c) for a, _ in renamed for c, _ in pairs):
        pairs = prefixes  # the module's own export: the catch-all applies
    owner: dict[str, str] = {}  # parameter name -> checkpoint key
    for key_a, key in renamed:
        name = _rename(key_a, pairs)
        if name is None:
            continue
        if name in owner:
            raise CheckpointError(f"checkpoint tensors {owner[name]!r} and {key!r} both load into {name!r}")
        owner[name] = key
    return {key: name for name, key in owner.items()}


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (GB = 10**9, GiB = 2**30, as in the Hub)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size must be a positive int (bytes) or a string like '5GB' or '500MB', got {size!r}")
    unit = match.group(2)
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** ("KMGT".index(unit[0]) + 1))


def save_weights(state: dict[str, torch.Tensor], folder: str, max_shard_size: int | str | None) -> None:
    """Write `state` as model.safetensors, or as shards + index when it exceeds `max_shard_size`."""
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    # Old weight files would shadow or contradict the new ones (an index beats model.safetensors).
    for name in os.listdir(folder):
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name):
            os.remove(os.path.join(folder, name))
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for name, keys in zip(names, shards):
        save_file({k: state[k].detach().to("cpu").contiguous() for k in keys}, os.path.join(folder, name), {"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, ks in zip(names, shards) for k in ks}}
        with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")


def few(items: list[str], limit: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e and 12 more': long lists in error messages."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
