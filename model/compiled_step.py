"""A decode step made fast: compiled by torch.compile (fixed shapes), and on a GPU captured in a
CUDA graph and replayed.

A decode step of the 11B model is ~1,500 small kernels; launching them one by one from Python
costs more than running them, so the whole step is recorded once and replayed. A graph replays
on fixed memory addresses: the tokens and positions are copied into static inputs, and the
static `MllamaCache` the step reads (generate's, reused across requests, or the engine's slots)
is only ever overwritten in place. Graphs are captured by hand with torch.cuda.CUDAGraph rather
than through torch.compile's "reduce-overhead" mode, whose graph trees may skip a step that
mutates its inputs, as every decode step mutates the cache. Capture follows PyTorch's recipe:
warm up on a side stream, then record. A cache keeps one graph per batch size
(`cache.decode_graphs`).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

StepFn = Callable[..., torch.Tensor]  # (model, cache, tokens (B,), positions (B,)) -> logits (B, V)
# Every compiled step is the same Python function (generation.decode_step), and dynamo counts the
# compilations of one function against one limit (8 by default) across the whole process: every
# batch size, cache layout and model loaded in it. A server with many batch buckets, or a process
# that loads several models, needs more than 8; past the limit a full-graph compile fails.
COMPILATIONS_PER_PROCESS = 256


class DecodeGraph:
    """`step_fn` over one cache, recorded once; calling it replays the recording.

    The returned logits tensor is the graph's output buffer: it is overwritten by the next replay,
    so read it (sample the next token) before calling again.
    """

    WARMUP_STEPS = 2  # the first call may compile; the second proves no recompilation is pending

    def __init__(self, model, cache, step_fn: StepFn, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        self.tokens, self.positions = tokens.clone(), positions.clone()
        state = cache.checkpoint()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_STEPS):
                    step_fn(model, cache, self.tokens, self.positions)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step_fn(model, cache, self.tokens, self.positions)
        finally:
            cache.rewind(state)  # the warm-up steps were not real steps

    def __call__(self, model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


def on_one_device(model) -> bool:
    """Compiled steps and graphs are for a model that sits whole on one device (accelerate's
    hooks between devices break a full graph)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return len(set(device_map.values())) <= 1


def accelerated(step_fn: StepFn, device: torch.device) -> StepFn:
    """`step_fn` compiled (eager if compiling fails); on a CUDA device also run from CUDA graphs."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILATIONS_PER_PROCESS)
    step = with_eager_fallback(torch.compile(step_fn, dynamic=False, fullgraph=True), step_fn)
    return graphed(step) if device.type == "cuda" else step


def with_eager_fallback(compiled: StepFn, eager: StepFn) -> StepFn:
    """Compilation needs a working compiler toolchain; without one, run eagerly (tracing fails
    before the step mutates the cache, so the eager retry is exact)."""
    state = {"fn": compiled, "compiled_once": False}

    def step(*args):
        if state["compiled_once"]:
            return state["fn"](*args)
        try:
            out = state["fn"](*args)
        except Exception as error:  # torch._dynamo / inductor errors have no common public base
            log.warning("torch.compile failed (%s); decoding eagerly", str(error).splitlines()[0][:200])
            state["fn"] = eager
            out = eager(*args)
        state["compiled_once"] = True
        return out

    return step


def graphed(step_fn: StepFn) -> StepFn:
    """`step_fn`, replayed from a CUDA graph kept on the cache, one per batch size, captured at
    the first step of that size. If capturing fails, the step runs without a graph."""

    def step(model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        run = cache.decode_graphs.get(batch)
        if run is None:
            try:
                run = DecodeGraph(model, cache, step_fn, tokens, positions)
            except Exception as error:  # capture errors come from several layers of torch
                log.warning("CUDA graph capture failed (%s); decoding without graphs", str(error).splitlines()[0][:200])
                torch.cuda.synchronize()
                run = step_fn
            cache.decode_graphs[batch] = run
        return run(model, cache, tokens, positions)

    return step
