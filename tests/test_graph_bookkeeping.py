"""The CUDA-graph bookkeeping of model/compiled_step.py, run on the CPU with a stand-in for
torch.cuda's graph API.

A real graph records kernels once and replays them on the same buffers; the stand-in records the
step as a call over DecodeGraph's static inputs and replays it by calling it again and copying
the result into the output tensor of the capture. What this checks: inputs are copied into the
static buffers before each replay, the warm-up and capture steps are rewound, one graph per batch
size is kept and replayed request after request, the consumers read a replay's output before
the next one overwrites it, and no buffer the step reads is replaced between capture and replay
(a real graph would keep reading the old one). (Real capture and replay: tests/test_gpu.py.)
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import model.generation as generation_module
from engine_checkpoint import write_engine_checkpoint
from model import MllamaForConditionalGeneration
from model.compiled_step import DecodeGraph, graphed
from model.generation import decode_step
from reference import VARIANTS, ImageSpec, build_hf_model, make_inputs, save_hf
from serving import ChatEngine
from test_engine import check_mix


class FakeGraph:
    def __init__(self) -> None:
        self.step = None
        self.output: torch.Tensor | None = None
        self.replays = 0
        self.inputs = lambda: []  # the tensors the recorded kernels read and write, as they are now
        self.addresses: list[int] = []

    def replay(self) -> None:
        self.replays += 1
        assert [t.data_ptr() for t in self.inputs()] == self.addresses, "a buffer of the captured step was replaced"
        self.output.copy_(self.step())


class FakeCuda:
    """torch.cuda's stream and graph calls that DecodeGraph makes; `recording` is the graph
    being captured."""

    def __init__(self) -> None:
        self.recording: FakeGraph | None = None
        self.graphs: list[FakeGraph] = []

    def install(self, monkeypatch) -> None:
        class Stream:
            def wait_stream(self, other) -> None:
                pass

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(torch.cuda, "graph", self._capture)

    @contextlib.contextmanager
    def _capture(self, graph: FakeGraph):
        self.recording = graph
        try:
            yield
        finally:
            self.recording = None
            self.graphs.append(graph)

    def recorded(self, step_fn):
        """`step_fn`, recorded as the graph's work when called during a capture."""

        def step(model, cache, tokens, positions):
            out = step_fn(model, cache, tokens, positions)
            if self.recording is not None:
                self.recording.step = lambda: step_fn(model, cache, tokens, positions)
                self.recording.output = out
                self.recording.inputs = lambda: [tokens, positions, *cache.buffers()]
                self.recording.addresses = [t.data_ptr() for t in self.recording.inputs()]
            return out

        return step


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    return fake


def test_graphed_generate_gives_the_eager_tokens_request_after_request(fake_cuda, tmp_path):
    hf = build_hf_model(VARIANTS[0], seed=3)
    ours = MllamaForConditionalGeneration.from_pretrained(save_hf(hf, tmp_path), semantics="transformers")
    ours.__dict__["_compiled_decode_steps"] = {"cpu": graphed(fake_cuda.recorded(decode_step))}
    requests = [make_inputs(hf, samples=[[ImageSpec(1, 2)]], length=9, seed=1),
                make_inputs(hf, samples=[[ImageSpec(2, 4)]], length=13, seed=2),
                make_inputs(hf, samples=[[]], length=7),
                make_inputs(hf, samples=[[ImageSpec(2, 1)], [ImageSpec(1, 3)]], length=11, pad_left=[5, 0])]
    for i, inputs in enumerate(requests):
        eager = ours.generate(**inputs, max_new_tokens=15, do_sample=False, eos_token_id=None, compile=False)
        graphed_run = ours.generate(**inputs, max_new_tokens=15, do_sample=False, eos_token_id=None, compile=True)
        assert torch.equal(graphed_run, eager), f"request {i}: first difference at {(graphed_run != eager).nonzero()[:1].tolist()}"
    # Picture, picture of the same shapes (replayed), text only, batch of two: three captures.
    assert len(fake_cuda.graphs) == 3
    assert all(isinstance(g, DecodeGraph) for c in ours._decode_caches.values() for g in c.decode_graphs.values())
    assert fake_cuda.graphs[0].replays == 2 * 14, "both requests with a picture replay the first capture"


def test_graphed_engine_answers_like_generate_alone(fake_cuda, monkeypatch, tmp_path):
    monkeypatch.setattr(generation_module, "accelerated", lambda step, device: graphed(fake_cuda.recorded(step)))
    folder = str(write_engine_checkpoint(tmp_path / "ck"))
    graphed_engine = ChatEngine.load(folder, max_batch=4, queue_size=32, context_tokens=256, compile=True)
    try:
        assert sorted(graphed_engine.runner.cache.decode_graphs) == [1, 2, 4], "one capture per bucket, while loading"
        from serving_oracle import Oracle

        check_mix(graphed_engine, Oracle(graphed_engine.model, graphed_engine.processor), seed=3, count=8)
        assert len(fake_cuda.graphs) == 3, "serving replays the captured graphs, it captures none"
        assert sum(g.replays for g in fake_cuda.graphs) > 0
    finally:
        graphed_engine.close()


def test_graphed_beam_search_reorders_the_cache_in_place(fake_cuda, tmp_path):
    """Beam search copies cache rows between steps; replayed from a graph (which would keep
    reading replaced buffers), it must still give the eager beams and scores."""
    hf = build_hf_model(VARIANTS[0], seed=3)
    ours = MllamaForConditionalGeneration.from_pretrained(save_hf(hf, tmp_path), semantics="transformers")
    ours.__dict__["_compiled_decode_steps"] = {"cpu": graphed(fake_cuda.recorded(decode_step))}
    inputs = make_inputs(hf, samples=[[ImageSpec(2, 1)], [ImageSpec(1, 3)]], length=11, pad_left=[5, 0])
    kwargs = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None,
                  return_dict_in_generate=True, output_scores=True)
    eager = ours.generate(**inputs, compile=False, **kwargs)
    graphed_run = ours.generate(**inputs, compile=True, **kwargs)
    assert torch.equal(graphed_run.sequences, eager.sequences)
    torch.testing.assert_close(graphed_run.sequences_scores, eager.sequences_scores, rtol=1e-5, atol=1e-6)
    assert len(fake_cuda.graphs) == 1 and fake_cuda.graphs[0].replays == 9, "every decode step replays the one capture"
