"""The GPU decode path: compiled steps captured in CUDA graphs must give exactly the eager tokens.

These run wherever a CUDA device is present (`benchmarks/gpu_check.sh` runs them first on a lent
GPU); on a machine without one they are skipped.
"""
from __future__ import annotations

import pytest
import torch

from engine_checkpoint import write_engine_checkpoint
from model import MllamaForConditionalGeneration
from model.compiled_step import DecodeGraph
from reference import VARIANTS, ImageSpec, build_hf_model, make_inputs, save_hf
from serving import ChatEngine
from serving_oracle import Oracle
from test_engine import check_mix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    hf = build_hf_model(VARIANTS[0], seed=3)
    folder = save_hf(hf, tmp_path_factory.mktemp("gpu"))
    return hf, MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers", device_map="cuda")


def on_gpu(inputs: dict) -> dict:
    return {k: v.cuda() for k, v in inputs.items()}


def test_graphed_decoding_gives_the_eager_tokens_request_after_request(gpu_model):
    hf, ours = gpu_model
    requests = [make_inputs(hf, **spec) for spec in (
        dict(samples=[[ImageSpec(1, 2)]], length=9, seed=1),
        dict(samples=[[ImageSpec(2, 4)]], length=13, seed=2),  # same shapes: replays the same graph
        dict(samples=[[]], length=7),
        dict(samples=[[ImageSpec(2, 1)], [ImageSpec(1, 3)]], length=11, pad_left=[5, 0]),
    )]
    graphs = []
    for i, inputs in enumerate(map(on_gpu, requests)):
        eager = ours.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=None, compile=False)
        graphed = ours.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=None, compile=True)
        assert torch.equal(graphed, eager), f"request {i}: first difference at {(graphed != eager).nonzero()[:1].tolist()}"
        kept = [c for c in ours._decode_caches.values() if inputs["input_ids"].shape[0] in c.decode_graphs]
        assert kept and isinstance(kept[-1].decode_graphs[inputs["input_ids"].shape[0]], DecodeGraph), "no graph captured"
        graphs.append(next(iter(kept[-1].decode_graphs.values())))
    assert graphs[1] is graphs[0], "a request of the same shapes must replay the captured graph"


def test_a_graph_replay_never_syncs_the_host(gpu_model):
    hf, ours = gpu_model
    inputs = on_gpu(make_inputs(hf, samples=[[ImageSpec(1, 2)]], length=9))
    ours.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None, compile=True)
    cache = next(c for c in ours._decode_caches.values() if 1 in c.decode_graphs)
    graph = cache.decode_graphs[1]
    tokens, positions = torch.tensor([5], device="cuda"), torch.tensor([9], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            graph(ours, cache, tokens, positions)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_graphed_engine_answers_like_generate_alone(tmp_path):
    folder = str(write_engine_checkpoint(tmp_path / "ck"))
    graphed = ChatEngine.load(folder, device_map="cuda", max_batch=4, context_tokens=256, compile=True)
    try:
        check_mix(graphed, Oracle(graphed.model, graphed.processor), seed=4, count=8)
        assert graphed.runner.cache.decode_graphs, "no graph captured"
        assert all(isinstance(g, DecodeGraph) for g in graphed.runner.cache.decode_graphs.values())
    finally:
        graphed.close()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_weights_on_the_gpu_stay_close_and_graph_like_eager(tmp_path, quantization):
    """torchao's CUDA kernels (int4: tinygemm, bfloat16): logits within the CPU-measured bounds of
    the same weights unquantized, and compiled, graphed decoding gives the eager tokens."""
    from quantization_quality import measure, write_checkpoint
    from test_quantization import MAX_LOGITS_ERROR

    folder, prompts = write_checkpoint("wide_128", seed=0, folder=tmp_path)
    options = dict(dtype=torch.bfloat16, device_map="cuda")
    reference = MllamaForConditionalGeneration.from_pretrained(folder, **options)
    quantized = MllamaForConditionalGeneration.from_pretrained(folder, quantization=quantization, **options)
    for kind, inputs in prompts.items():
        inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in on_gpu(inputs).items()}
        quality = measure(reference, quantized, inputs)
        assert quality.logits_error <= MAX_LOGITS_ERROR[quantization], f"{kind}: {quality}"
        eager = quantized.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=[], compile=False)
        graphed = quantized.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=[], compile=True)
        assert torch.equal(graphed, eager), f"{kind}: first difference at {(graphed != eager).nonzero()[:1].tolist()}"
