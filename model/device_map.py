"""device_map: which device (GPU index, "cpu", "cuda:1", ... or "disk") holds each part of a model.

Resolved here into the form accelerate's `dispatch_model` wants: entries that cover every tensor
and never contain one another.
"""
from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from accelerate import infer_auto_device_map
from accelerate.utils import get_balanced_memory
from torch import nn

from .checkpoint import few

Device = str | int
STRATEGIES = ("auto", "balanced", "sequential")
_HELP = (
    "device_map must be None (everything on the CPU), 'auto', 'balanced', 'sequential', one device ('cpu', "
    "'cuda', 'cuda:1', a GPU index) or a dict {module name: device} whose devices may also be 'disk'"
)


def check_device_map_arg(device_map: Any) -> None:
    """Reject a bad device_map before anything is read (a dict is checked against the model later)."""
    if not isinstance(device_map, dict) and device_map not in (None, *STRATEGIES):
        parse_device(device_map)


def parse_device(value: Any, allow_disk: bool = False) -> Device:
    """A device as accelerate wants it: a GPU index, 'cpu', 'cuda:1', ... (or 'disk' in a dict)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        _check_gpu(value)
        return value
    if allow_disk and value == "disk":
        return value
    if isinstance(value, (str, torch.device)):
        try:
            device = torch.device(value)
        except RuntimeError:
            device = None
        if device is not None and device.type in ("cpu", "cuda", "mps", "xpu"):
            if device.type == "cuda":
                _check_gpu(device.index or 0)
            return str(device)
    raise ValueError(f"{_HELP}; got {value!r}")


def _check_gpu(index: int) -> None:
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device_map asks for GPU {index}, but torch sees {torch.cuda.device_count()} GPU(s) "
            f"(torch {torch.__version__}); use 'cpu' or 'auto'"
        )


def resolve_device_map(
    model: nn.Module, device_map: Any, max_memory: dict | None, dtype: torch.dtype,
    special_dtypes: dict[str, Any] | None = None,
) -> dict[str, Device]:
    """{module or tensor name: device} for a model on the meta device whose weights will be `dtype`
    (`special_dtypes`: {tensor name: dtype} for those that will not, e.g. quantized ones)."""
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, dict):
        return _resident_loose_tensors(model, _explicit(model, device_map))
    if device_map in STRATEGIES:
        no_split = list(model._no_split_modules)
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split, dtype=dtype,
                                             special_dtypes=special_dtypes)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                           special_dtypes=special_dtypes)
        return _resident_loose_tensors(model, dict(device_map))
    return {"": parse_device(device_map)}


def _explicit(model: nn.Module, device_map: dict) -> dict[str, Device]:
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    unknown = [repr(k) for k in device_map if k not in names]
    if unknown:
        raise ValueError(f"device_map names {few(unknown)}, not module(s) of {type(model).__name__}")
    resolved = {name: parse_device(device, allow_disk=True) for name, device in device_map.items()}
    tensors = [n for n, _ in chain(model.named_parameters(), model.named_buffers())]
    uncovered = [repr(n) for n in tensors if device_of(n, resolved) is None]
    if uncovered:
        raise ValueError(
            f"device_map gives no device to {few(uncovered)}: add their modules, or '' for everything not listed"
        )
    return _disjoint(model, resolved)


def _disjoint(model: nn.Module, device_map: dict[str, Device]) -> dict[str, Device]:
    """Split every entry that contains a more specific one into its children and own tensors, so that
    {"": "cpu", "layers.1": "disk"} means what it says (accelerate needs disjoint entries)."""
    out: dict[str, Device] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        if not any(_inside(key, prefix) and key != prefix for key in device_map):
            if (device := device_of(prefix, device_map)) is not None:
                out[prefix] = device
            return
        own = chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name, _ in own:
            if (device := device_of(_join(prefix, name), device_map)) is not None:
                out[_join(prefix, name)] = device
        for name, child in module.named_children():
            visit(_join(prefix, name), child)

    visit("", model)
    return out


def _resident_loose_tensors(model: nn.Module, device_map: dict[str, Device]) -> dict[str, Device]:
    """accelerate's hooks load offloaded weights per module: an entry for a single tensor (a module's
    own parameter, its children mapped apart) would never be loaded back, so it stays on the main device."""
    modules = {name for name, _ in model.named_modules()}
    main = main_device(device_map)
    offloaded = ("disk",) if main == "cpu" else ("disk", "cpu")
    return {k: main if k not in modules and d in offloaded else d for k, d in device_map.items()}


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def device_of(name: str, device_map: dict[str, Device]) -> Device | None:
    """The device of the most specific device_map entry that contains `name`."""
    best = max((key for key in device_map if _inside(name, key)), key=len, default=None)
    return None if best is None else device_map[best]


def main_device(device_map: dict[str, Device]) -> Device:
    """The first accelerator in the map (inputs and outputs live there), else the CPU."""
    return next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")


def torch_device(device: Device) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
