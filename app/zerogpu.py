"""Hugging Face ZeroGPU Spaces: recognised as the `spaces` package recognises them, and served by
the engine that asks for the GPU once per request."""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from .config import ZERO_GPU_VARIABLE, AppConfig

if TYPE_CHECKING:
    from serving.zerogpu import GpuDecorator, ZeroGPUEngine


def load_zerogpu_engine(config: AppConfig, gpu: GpuDecorator | None = None,
                        device: str = "cuda") -> ZeroGPUEngine | None:
    """Load the model for ZeroGPU (on `device`; 'cuda' needs no GPU at start-up there), each
    request's GPU work going through `gpu` (default: `spaces.GPU`); on failure print what to do
    and return None."""
    if gpu is None:
        try:
            import spaces  # before anything touches CUDA: it lets 'cuda' tensors exist without a GPU
        except ImportError:
            print(f"\nThis is a ZeroGPU Space ({ZERO_GPU_VARIABLE} is set) but the `spaces` package is "
                  "missing: add `spaces` to requirements.txt.", file=sys.stderr)
            return None
        gpu = spaces.GPU
    if config.quantize:
        # The GPU a ZeroGPU call gets holds the 11B in bfloat16; int8/int4 weights would only cost quality.
        print(f"\nMLLAMA_QUANTIZE={config.quantize} is not used on ZeroGPU, whose GPUs hold the model in "
              "bfloat16: remove it from the Space's variables.", file=sys.stderr)
        return None
    from serving.zerogpu import ZeroGPUEngine

    print(f"Loading {config.model} (dtype {config.dtype}) for ZeroGPU: a GPU is attached to each answer"
          f"{'; --compile does nothing here' if config.compile else ''} ...", flush=True)
    start = time.perf_counter()
    try:
        engine = ZeroGPUEngine.load(config.model, gpu=gpu, dtype=config.dtype, device=device,
                                    context_tokens=config.context_tokens)
    except Exception as error:  # noqa: BLE001 - any load failure ends the app with its message
        print(f"\nCould not load the model {config.model!r}:\n  {error}\n\n"
              "Pass a checkpoint folder or a Hub id with MLLAMA_MODEL (a gated model also needs the "
              "HF_TOKEN secret).", file=sys.stderr)
        return None
    print(f"Model ready in {time.perf_counter() - start:.1f} s.", flush=True)
    return engine
