"""Base class of our models: from_pretrained / save_pretrained. (Being written: see loader task.)"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class MllamaPreTrainedModel(nn.Module):
    config_class: ClassVar[type]
    # (checkpoint prefix, module prefix) pairs tried in order; checkpoint keys that match none are
    # not ours (e.g. vision weights when loading only the text model) and are skipped.
    checkpoint_prefixes: ClassVar[tuple[tuple[str, str], ...]] = (("", ""),)
    _no_split_modules: ClassVar[list[str]] = [
        "MllamaVisionEncoderLayer",
        "MllamaSelfAttentionDecoderLayer",
        "MllamaCrossAttentionDecoderLayer",
    ]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
