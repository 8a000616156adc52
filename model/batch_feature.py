"""BatchFeature: the dict of model inputs returned by the processors (like transformers' class)."""
from __future__ import annotations

from collections import UserDict
from typing import Any

import numpy as np
import torch


class BatchFeature(UserDict):
    """A dict of tensors/arrays that also reads by attribute, moves with `.to(device)` and unpacks with `**`."""

    def __getattr__(self, name: str) -> Any:
        if name == "data" or name.startswith("__"):  # copy/pickle probe these before `data` exists
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no field {name!r}; it has {sorted(self.data)}") from None

    def __getstate__(self) -> dict:
        return {"data": self.data}

    def __setstate__(self, state: dict) -> None:
        self.data = state["data"]

    def to(self, device: str | torch.device | torch.dtype, dtype: torch.dtype | None = None) -> BatchFeature:
        """Move every tensor to `device`; a dtype (given alone or as `dtype`) applies to floating tensors only,
        so token ids and masks keep their integer type."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        moved = {}
        for key, value in self.data.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if dtype and value.is_floating_point() else None)
            moved[key] = value
        self.data = moved
        return self


def convert_tensors(data: dict[str, Any], return_tensors: str | None) -> BatchFeature:
    """Turn lists/arrays into torch tensors ("pt") or numpy arrays ("np"); None keeps them as they are."""
    if return_tensors not in (None, "pt", "np"):
        raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt', 'np' or None.")
    if return_tensors is None:
        return BatchFeature(data)
    out = {}
    for key, value in data.items():
        if return_tensors == "pt":
            value = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        else:
            value = value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        out[key] = value
    return BatchFeature(out)
