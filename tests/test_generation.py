"""generate() against transformers' generate, and what the caches promise."""
from __future__ import annotations

import threading

import pytest
import torch

from model import MllamaForCausalLM, MllamaForConditionalGeneration
from reference import VARIANTS, ImageSpec, build_hf_model, make_inputs, save_hf

NEW = 40


@pytest.fixture(scope="module", params=VARIANTS[:2], ids=lambda v: v.name)
def pair(request, tmp_path_factory):
    hf = build_hf_model(request.param, seed=3)
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param.name))
    return hf, MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers"), folder


def hf_greedy(hf, inputs, **kwargs):
    with torch.no_grad():
        return hf.generate(**inputs, do_sample=False, pad_token_id=0, **kwargs)


CASES = {
    "text_only": dict(samples=[[]], length=7),
    "one_image": dict(samples=[[ImageSpec(1, 2)]], length=9),
    "two_images": dict(samples=[[ImageSpec(1, 1), ImageSpec(2, 5)]], length=10),
    "left_padded_batch": dict(samples=[[ImageSpec(2, 1)], [ImageSpec(1, 3)]], length=11, pad_left=[5, 0]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_greedy_tokens_equal_transformers(pair, case):
    hf, ours, _ = pair
    inputs = make_inputs(hf, **CASES[case])
    want = hf_greedy(hf, inputs, max_new_tokens=NEW, eos_token_id=None)
    got = ours.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    assert got.shape == want.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + NEW)
    assert torch.equal(got, want), f"first difference at {(got != want).nonzero()[:1].tolist()}"


@pytest.mark.parametrize("case", ["one_image", "left_padded_batch"])
def test_greedy_stops_at_eos_like_transformers(pair, case):
    hf, ours, _ = pair
    inputs = make_inputs(hf, **CASES[case])
    free_run = hf_greedy(hf, inputs, max_new_tokens=NEW, eos_token_id=None)
    prompt_len = inputs["input_ids"].shape[1]
    eos = int(free_run[0, prompt_len + 5])  # a token sample 0 produces early
    want = hf_greedy(hf, inputs, max_new_tokens=NEW, eos_token_id=eos)
    got = ours.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    if inputs["input_ids"].shape[0] == 1:
        assert got.shape[1] <= prompt_len + 6, "generation should end at the eos token"


def test_causal_lm_generates_like_the_full_model_on_text(pair):
    hf, ours, folder = pair
    lm = MllamaForCausalLM.from_pretrained(folder, semantics="transformers")
    inputs = make_inputs(hf, [[], []], length=8, pad_left=[2, 0])
    want = hf_greedy(hf, inputs, max_new_tokens=12, eos_token_id=None)
    got = lm.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(got, want)


def test_vision_tower_and_cross_kv_run_once_per_prompt(pair):
    hf, ours, _ = pair
    calls = {"vision": 0, "cross_k": 0}
    first_cross = ours.language_model.model.layers[ours.config.text_config.cross_attention_layers[0]]
    hooks = [
        ours.vision_model.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
        first_cross.cross_attn.k_proj.register_forward_hook(lambda *a: calls.__setitem__("cross_k", calls["cross_k"] + 1)),
    ]
    try:
        ours.generate(**make_inputs(hf, **CASES["one_image"]), max_new_tokens=10, eos_token_id=None)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"vision": 1, "cross_k": 1}


def test_sampling_with_a_seed_is_reproducible(pair):
    hf, ours, _ = pair
    inputs = make_inputs(hf, **CASES["one_image"])
    kwargs = dict(max_new_tokens=15, do_sample=True, temperature=1.5, top_k=0, eos_token_id=None)
    first = ours.generate(**inputs, seed=7, **kwargs)
    again = ours.generate(**inputs, seed=7, **kwargs)
    other = ours.generate(**inputs, seed=8, **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, other), "different seeds should give different samples"


def test_temperature_zero_is_greedy(pair):
    hf, ours, _ = pair
    inputs = make_inputs(hf, **CASES["one_image"])
    greedy = ours.generate(**inputs, max_new_tokens=15, do_sample=False, eos_token_id=None)
    cold = ours.generate(**inputs, max_new_tokens=15, do_sample=True, temperature=0.0, seed=3, eos_token_id=None)
    assert torch.equal(greedy, cold)


def test_stop_event_ends_generation_and_model_stays_usable(pair):
    hf, ours, _ = pair
    inputs = make_inputs(hf, **CASES["one_image"])
    stop = threading.Event()
    stop.set()
    stopped = ours.generate(**inputs, max_new_tokens=NEW, eos_token_id=None, stop=stop)
    assert stopped.shape[1] == inputs["input_ids"].shape[1] + 1, "a set stop event allows no decode step"
    want = hf_greedy(hf, inputs, max_new_tokens=NEW, eos_token_id=None)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=None), want)


def test_unknown_generate_argument_is_refused(pair):
    hf, ours, _ = pair
    with pytest.raises(TypeError, match="unexpected arguments"):
        ours.generate(**make_inputs(hf, **CASES["text_only"]), max_new_tokns=3)


def test_compiled_decode_gives_the_same_tokens_and_reuses_its_cache(tmp_path, caplog):
    """The fixed-shape decode step compiled with torch.compile (on a GPU also captured in a CUDA
    graph that lives with the cache) must not change a single greedy token; request after request
    it reuses one cache per shape, overwritten in place (what a captured graph needs), without
    recompiling and without a graph break. (One variant: compiling is slow.)"""
    hf = build_hf_model(VARIANTS[0], seed=3)
    ours = MllamaForConditionalGeneration.from_pretrained(save_hf(hf, tmp_path), semantics="transformers")
    first = make_inputs(hf, **CASES["one_image"], seed=1)
    second = make_inputs(hf, samples=[[ImageSpec(2, 4)]], length=13, seed=2)  # other picture and prompt, same shapes
    requests = [make_inputs(hf, **CASES["left_padded_batch"]), first, make_inputs(hf, **CASES["text_only"]), second]

    def run(inputs, compile):
        return ours.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None, compile=compile)

    with caplog.at_level("WARNING"):
        for i, inputs in enumerate(requests):
            eager = run(inputs, compile=False)
            if inputs is second:
                kept = ours._decode_caches[(1, 256, tuple(first["pixel_values"].shape[1:3]))]
                addresses = [t.data_ptr() for t in kept.buffers()]
                with torch._dynamo.config.patch(error_on_recompile=True):
                    compiled = run(inputs, compile=True)
                assert ours._decode_caches[(1, 256, tuple(second["pixel_values"].shape[1:3]))] is kept
                assert [t.data_ptr() for t in kept.buffers()] == addresses, "a captured graph replays on these addresses"
            else:
                compiled = run(inputs, compile=True)
            assert torch.equal(compiled, eager), f"request {i}"
    assert not [r for r in caplog.records if "compile failed" in r.getMessage()], "the step fell back to eager"
    assert len(ours._decode_caches) == 2, "compiled decoding keeps a bounded number of caches"


def test_compiled_decoding_stays_compiled_past_dynamos_default_recompile_limit(tmp_path, caplog):
    """Every model and shape compiled in a process is the same function to dynamo (decode_step),
    whose per-function recompile limit is small: a process that has used most of it (a test run,
    a server with many batch buckets) must still compile a new model's steps, not fall back."""
    hf = build_hf_model(VARIANTS[0], seed=3)
    ours = MllamaForConditionalGeneration.from_pretrained(save_hf(hf, tmp_path), semantics="transformers")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level("WARNING"):  # budget nearly spent
        for rows in (1, 2, 3, 4):  # a static cache per batch size: one compilation each
            inputs = make_inputs(hf, samples=[[]] * rows, length=7, seed=rows)
            kwargs = dict(max_new_tokens=3, do_sample=False, eos_token_id=None)
            assert torch.equal(ours.generate(**inputs, compile=True, **kwargs), ours.generate(**inputs, **kwargs))
    assert not [r for r in caplog.records if "compile failed" in r.getMessage()], "the step fell back to eager"


def test_text_only_prompts_skip_the_cross_attention_layers(pair):
    hf, ours, _ = pair
    calls = []
    layers = [ours.language_model.model.layers[i] for i in ours.config.text_config.cross_attention_layers]
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in layers]
    try:
        ours.generate(**make_inputs(hf, **CASES["text_only"]), max_new_tokens=5, eos_token_id=None)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def test_a_text_row_batched_with_a_picture_row_decodes_as_it_does_alone(pair):
    """Meta semantics: a row that sees no picture passes every cross-attention layer unchanged,
    so batching it with a picture row changes none of its logits."""
    hf, ours, _ = pair
    inputs = make_inputs(hf, samples=[[], [ImageSpec(1, 3)]], length=9)
    alone = {"input_ids": inputs["input_ids"][:1], "attention_mask": inputs["attention_mask"][:1]}
    ours.config.semantics = "meta"
    try:
        kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                      output_logits=True)
        together = ours.generate(**inputs, **kwargs)
        single = ours.generate(**alone, **kwargs)
    finally:
        ours.config.semantics = "transformers"
    for step, (batched, solo) in enumerate(zip(together.logits, single.logits)):
        torch.testing.assert_close(batched[0], solo[0], rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}: {m}")
