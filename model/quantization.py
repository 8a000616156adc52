"""Weight-only int8 / int4 quantization of the text decoder's linear layers, done by torchao.

What is quantized: every nn.Linear inside a self- or cross-attention decoder layer (q/k/v/o
projections and the MLP). The vision tower, the projector, the embeddings and `lm_head` keep the
checkpoint's dtype: together they are 18% of the 11B's weights, so quantizing them would save
little, while rounding in `lm_head` would move every logit directly.

int8: one scale per output channel (torchao's Int8WeightOnlyConfig), on any device.
int4: one scale and zero point per group of 128 inputs (64 or 32 where a layer is narrower),
asymmetric as in tinygemm; on a CUDA GPU of compute capability 8.0 or more in bfloat16
(torchao's tinygemm layout), on the CPU with torchao's CPU layout (its prototype workflow).

Loading quantizes each weight as soon as it is read (`quantize_weight`), so the full-precision
text decoder never exists at once, neither on the GPU nor on the host.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, TensorInfo, few

QUANTIZATIONS = ("int8", "int4")
_DECODER_LAYERS = ("MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer")
_INT4_GROUP_SIZES = (128, 64, 32)  # the first that divides a layer's inputs
_INT4_CPU_OUT_MULTIPLE = 16  # the CPU int4 packing takes blocks of 16 output channels
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Names of tensors that only quantized checkpoints hold (bitsandbytes, GPTQ/AWQ, torchao exports).
_QUANTIZED_SUFFIXES = (".SCB", ".weight_format", ".absmax", ".quant_map", ".quant_state", ".nested_absmax",
                       ".qweight", ".qzeros", ".scales", ".g_idx", ".qdata", ".scale_and_zero")
_FLOAT_SAFETENSORS = ("F64", "F32", "F16", "BF16")


class QuantizationError(ValueError):
    """A quantization that this model, device or dtype cannot run; the message says what to do."""


def check_quantization_arg(quantization: Any) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None, 'int8' or 'int4'; got {quantization!r}")


def quantized_weight_names(model: nn.Module) -> list[str]:
    """The weights quantization replaces: those of the linear layers inside text decoder layers."""
    names = []
    for prefix, module in model.named_modules():
        if type(module).__name__ in _DECODER_LAYERS:
            names += [f"{prefix}.{name}.weight" for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]
    return names


def planning_dtypes(names: list[str], quantization: str | None) -> dict[str, Any] | None:
    """{weight name: dtype} for accelerate's device_map planning: the quantized size, not the
    checkpoint's (int4 counts half a byte; its group scales add ~3%). None without quantization."""
    if quantization is None:
        return None
    from accelerate.utils.dataclasses import CustomDtype

    return dict.fromkeys(names, torch.int8 if quantization == "int8" else CustomDtype.INT4)


def check_supported(quantization: str, model: nn.Module, devices: dict[str, Any], dtype: torch.dtype) -> None:
    """Refuse, before any weight is read, what torchao cannot run (and import torchao). `devices`:
    {name of a weight to quantize: its torch.device, or "disk"}; the model may be on the meta device."""
    quiet_torchao_import()
    if dtype not in _FLOAT_DTYPES:
        raise QuantizationError(
            f"quantization={quantization!r} works on bfloat16, float16 or float32 weights, not {dtype}: pass "
            "dtype=torch.bfloat16 (on a GPU) or torch.float32 (on a CPU)")
    accelerator = [d for d in devices.values() if d != "disk" and d.type != "cpu"]
    offloaded = [repr(n) for n, d in devices.items() if d == "disk" or (accelerator and d.type == "cpu")]
    if offloaded:
        raise QuantizationError(
            f"device_map offloads quantized weights ({few(offloaded)}) to {'the CPU' if accelerator else 'disk'}; "
            "quantized weights must stay on the device that runs them. Give that device more max_memory, use "
            "quantization='int4' (half the bytes of int8), or put those layers on another GPU")
    if quantization != "int4":
        return
    for device in {d for d in devices.values() if d != "disk"}:
        if device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < (8, 0):
                raise QuantizationError(
                    f"quantization='int4' needs a GPU of compute capability 8.0 or more (Ampere or newer: A100, "
                    f"RTX 30xx/40xx, L4, H100); {torch.cuda.get_device_name(device)} has "
                    f"{capability[0]}.{capability[1]}. Use quantization='int8' instead")
            if dtype != torch.bfloat16:
                raise QuantizationError(
                    f"quantization='int4' on a GPU runs in bfloat16; got dtype={dtype}: pass dtype=torch.bfloat16")
        elif device.type != "cpu":
            raise QuantizationError(
                f"quantization='int4' runs on CUDA GPUs and on the CPU, not on {device.type}: use "
                "quantization='int8' there")
    for name in devices:
        out_features, in_features = model.get_parameter(name).shape
        if _int4_group_size(in_features) is None:
            raise QuantizationError(
                f"quantization='int4' needs a layer's inputs in groups of 32; {name!r} has {in_features}: use "
                "quantization='int8'")
        if devices[name].type == "cpu" and out_features % _INT4_CPU_OUT_MULTIPLE:
            raise QuantizationError(
                f"quantization='int4' on the CPU packs output channels by {_INT4_CPU_OUT_MULTIPLE}; {name!r} has "
                f"{out_features}: use quantization='int8'")


def quantize_weight(weight: torch.Tensor, quantization: str) -> nn.Parameter:
    """`weight` (out_features, in_features) of a linear layer, quantized where it lies.

    Goes through torchao's `quantize_` on a stand-in nn.Linear, its documented entry point, so
    the layouts and kernels are exactly those of its configs."""
    from torchao.quantization import quantize_

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(linear, _config(quantization, weight))
    return linear.weight


def _config(quantization: str, weight: torch.Tensor):
    # set_inductor_config=False: torchao's recommended settings are process-wide (among them float32
    # matmuls in TF32 on a GPU), which would change every other model in the process.
    if quantization == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig(set_inductor_config=False)
    group_size = _int4_group_size(weight.shape[1])
    if weight.device.type == "cpu":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                set_inductor_config=False)


def _int4_group_size(in_features: int) -> int | None:
    return next((g for g in _INT4_GROUP_SIZES if in_features % g == 0), None)


def check_not_prequantized(config: dict, infos: dict[str, TensorInfo], folder: str) -> None:
    """An already-quantized checkpoint (bitsandbytes, GPTQ, AWQ, torchao exports) holds no weights
    this loader can use: say so, and what to load instead."""
    method = config.get("quantization_config")
    if method is not None:
        name = method.get("quant_method", "unknown method") if isinstance(method, dict) else method
        reason = f"its config.json has a quantization_config ({name})"
    else:
        odd = [f"{k!r} ({i.dtype})" for k, i in infos.items()
               if i.dtype not in _FLOAT_SAFETENSORS or k.endswith(_QUANTIZED_SUFFIXES)]
        if not odd:
            return
        reason = f"it holds quantized tensors: {few(odd)}"
    raise CheckpointError(
        f"{folder} is an already-quantized checkpoint ({reason}). This loader reads the original bfloat16 "
        "weights and quantizes them itself: load the original checkpoint (e.g. "
        "meta-llama/Llama-3.2-11B-Vision-Instruct) with quantization='int8' or 'int4'")


def quiet_torchao_import() -> None:
    """Import torchao once with its warnings about optional extensions (CUDA kernels a CPU build
    of torch cannot load, Triton) silenced: nothing here uses them."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise QuantizationError(
            "quantization needs the torchao package: pip install -r requirements.txt (or pip install torchao)"
        ) from None
    finally:
        logger.setLevel(level)


def stored_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers take where they lie (see `tensor_bytes`)."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """What a tensor really stores: for a quantized one its packed data, scales and zero points,
    not its logical shape."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
