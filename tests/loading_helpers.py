"""Helpers for the loading tests: transformers' weights under the Hub names, weight comparison,
damaging copies of checkpoints."""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch
import transformers

# transformers' in-memory names -> Hub names, written out here independently of model/checkpoint.py.
B_TO_A = [
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
]
TEXT_IDS = torch.tensor([[1, 17, 42, 99, 250, 7, 3, 64]])


def hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        renames = [(o, n) for o, n in B_TO_A if key.startswith(o)]
        assert renames, f"transformers has a key this test does not know how to rename: {key}"
        old, new = renames[0]
        out[new + key[len(old):]] = tensor
    return out


@functools.lru_cache
def transformers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """What transformers loads from `folder`, under the Hub names (cached: don't modify)."""
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return hub_layout(hf.state_dict())


def assert_same_weights(ours: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(want) - set(ours)), sorted(set(ours) - set(want))
    assert not missing and not extra, f"keys differ: missing {missing[:5]}, unexpected {extra[:5]}"
    for key, tensor in want.items():
        assert ours[key].dtype == tensor.dtype, f"{key}: dtype {ours[key].dtype}, want {tensor.dtype}"
        assert torch.equal(ours[key], tensor), f"{key}: values differ"


def logits(model, ids: torch.Tensor = TEXT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
