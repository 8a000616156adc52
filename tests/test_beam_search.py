"""generate()'s beam search, returned scores, several sequences per prompt and use_cache=False,
against transformers' generate called the same way on the same random checkpoint (float32).

Beam search chooses with top-k over summed log-probabilities. float32 rounding makes each step's
log-probabilities differ between the two implementations (by ~1e-6, and the test checks how
much), so two candidates whose summed scores are closer than the summed differences could swap
without any defect. transformers' own choices are recorded (every torch.topk its beam search
makes): steps are compared up to the first choice that rounding could have flipped, and the
final hypotheses only when no choice could have.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers.generation.utils as reference_generation

from model import MllamaForConditionalGeneration
from model.cache import MllamaCache
from model.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from model.sampling import SamplingConfig, process_logits
from reference import VARIANTS, ImageSpec, build_hf_model, make_inputs, save_hf

NEW = 12
IMPOSSIBLE = -1.0e8  # scores pushed down by transformers' -1e9 masks tie exactly in both; not a choice
LENGTH_FACTOR = 4  # finished scores are scaled by new_length ** -length_penalty: at most 12 ** 0.5 here

CASES = {
    "text_only": dict(samples=[[]], length=7),
    "one_image": dict(samples=[[ImageSpec(1, 2)]], length=9),
    "left_padded_batch": dict(samples=[[ImageSpec(2, 1)], [ImageSpec(1, 3)]], length=11, pad_left=[5, 0]),
}
BEAM_SETTINGS = {
    "three_beams_two_returned": dict(num_beams=3, num_return_sequences=2),
    "early_stopping_short_favoured": dict(num_beams=4, num_return_sequences=4, early_stopping=True, length_penalty=-0.5),
    "never_stop_long_favoured": dict(num_beams=2, early_stopping="never", length_penalty=2.0),
}


@pytest.fixture(scope="module", params=VARIANTS[:2], ids=lambda v: v.name)
def pair(request, tmp_path_factory):
    hf = build_hf_model(request.param, seed=3)
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param.name))
    return hf, MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers")


def reference_generate(hf, inputs, record: bool = False, **kwargs):
    """transformers' generate (a dict); with `record`, also the smallest gap between neighbours
    among the candidates each of its top-k choices kept (and the first one left out), in call order."""
    gaps = []
    topk = torch.topk

    def recording_topk(values, k, *args, **kw):
        best = torch.sort(values, dim=-1, descending=True).values[..., : k + 1]
        gap = (best[..., :-1] - best[..., 1:]).masked_fill(best[..., 1:] <= IMPOSSIBLE, float("inf"))
        gaps.append(float(gap.min()) if gap.numel() else float("inf"))
        return topk(values, k, *args, **kw)

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        if record:
            patch.setattr(reference_generation.torch, "topk", recording_topk)
        out = hf.generate(**inputs, pad_token_id=0, return_dict_in_generate=True, **kwargs)
    return out, gaps


def compare_steps(ours, ref, gaps: list[float], calls_per_step: int) -> bool:
    """Assert each step's raw logits and processed log-probabilities equal transformers', up to
    the first step whose choices rounding could have flipped. True when no choice could have."""
    assert len(ours.scores) == len(ref.scores) and len(ours.logits) == len(ref.logits)
    drift = 0.0
    for step in range(len(ref.scores)):
        for what, mine, theirs in (("raw logits", ours.logits, ref.logits), ("log-probabilities", ours.scores, ref.scores)):
            torch.testing.assert_close(mine[step], theirs[step], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, what=what, step=step: f"{what} of step {step} differ from transformers: {m}")
        finite = torch.isfinite(ref.scores[step])
        drift += float((ours.scores[step] - ref.scores[step])[finite].abs().max())
        if min(gaps[step * calls_per_step:(step + 1) * calls_per_step]) <= LENGTH_FACTOR * drift + 1e-6:
            return False
    return True


def eos_seen_early(hf, inputs, **kwargs) -> int:
    """A token the reference produces early, so that some hypotheses end before the last step."""
    out, _ = reference_generate(hf, inputs, max_new_tokens=NEW, eos_token_id=None, do_sample=False, **kwargs)
    return int(out.sequences[0, inputs["input_ids"].shape[1] + 2])


def assert_steps_close(ours: tuple, ref: tuple, steps: int, what: str) -> None:
    for step in range(steps):
        torch.testing.assert_close(ours[step], ref[step], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, step=step: f"{what} of step {step} differ from transformers: {m}")


@pytest.mark.parametrize("settings", BEAM_SETTINGS, ids=list(BEAM_SETTINGS))
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_beam_search_equals_transformers(pair, case, settings):
    hf, ours = pair
    inputs = make_inputs(hf, **CASES[case])
    kwargs = dict(max_new_tokens=NEW, do_sample=False, output_scores=True, output_logits=True, **BEAM_SETTINGS[settings])
    kwargs["eos_token_id"] = eos_seen_early(hf, inputs, num_beams=kwargs["num_beams"])
    want, gaps = reference_generate(hf, inputs, record=True, **kwargs)
    got = ours.generate(**inputs, return_dict_in_generate=True, **kwargs)

    assert isinstance(got, GenerateBeamDecoderOnlyOutput)
    if not compare_steps(got, want, gaps, calls_per_step=3):
        return  # a choice was within rounding of another: the final hypotheses may differ
    assert torch.equal(got.sequences, want.sequences), f"sequences differ:\n{got.sequences}\n{want.sequences}"
    assert torch.equal(got.beam_indices, want.beam_indices), f"beam indices differ:\n{got.beam_indices}\n{want.beam_indices}"
    assert got.beam_indices.dtype == want.beam_indices.dtype
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-4, atol=1e-5)
    plain = ours.generate(**inputs, **kwargs)
    assert torch.equal(plain, want.sequences), "without return_dict_in_generate: the same sequences, as a tensor"


def test_returned_fields_follow_transformers(pair):
    hf, ours = pair
    inputs = make_inputs(hf, **CASES["text_only"])
    for kwargs in (dict(), dict(num_beams=2)):
        want, _ = reference_generate(hf, inputs, max_new_tokens=3, do_sample=False, **kwargs)
        got = ours.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, **kwargs)
        assert [f.name for f in dataclasses.fields(got)] == [f.name for f in dataclasses.fields(want)]
        assert list(got.keys()) == list(want.keys()), "the same fields are set (beam_indices even without scores)"
        assert got.past_key_values is got.cache
    assert [f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)] == [
        f.name for f in dataclasses.fields(reference_generation.GenerateDecoderOnlyOutput)]


@pytest.mark.parametrize("case", ["one_image", "left_padded_batch"])
def test_greedy_scores_and_logits_equal_transformers(pair, case):
    hf, ours = pair
    inputs = make_inputs(hf, **CASES[case])
    kwargs = dict(max_new_tokens=NEW, do_sample=False, repetition_penalty=1.3, eos_token_id=None,
                  output_scores=True, output_logits=True)
    want, _ = reference_generate(hf, inputs, **kwargs)
    got = ours.generate(**inputs, return_dict_in_generate=True, **kwargs)
    assert isinstance(got, GenerateDecoderOnlyOutput)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) == NEW
    assert_steps_close(got.logits, want.logits, NEW, "raw logits")
    assert_steps_close(got.scores, want.scores, NEW, "processed scores")
    assert not torch.equal(got.scores[1], got.logits[1]), "the repetition penalty should make scores differ from logits"


@pytest.mark.parametrize("num_beams", [1, 3], ids=["sampling", "beam_sampling"])
def test_several_samples_per_prompt_draw_what_transformers_draws_from_the_same_seed(pair, num_beams):
    """Both draw from torch's global generator with the same calls: the same seed gives the
    same tokens (a draw could flip only if it landed within ~1e-6 of a boundary)."""
    hf, ours = pair
    inputs = make_inputs(hf, **CASES["left_padded_batch"])
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.3, top_k=20, num_beams=num_beams,
                  num_return_sequences=3, eos_token_id=None, output_scores=True, output_logits=True)
    torch.manual_seed(11)
    want, _ = reference_generate(hf, inputs, **kwargs)
    torch.manual_seed(11)
    got = ours.generate(**inputs, return_dict_in_generate=True, **kwargs)
    assert got.sequences.shape == want.sequences.shape == (6, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(got.sequences, want.sequences), f"{got.sequences}\n{want.sequences}"
    assert_steps_close(got.logits, want.logits, 8, "raw logits")
    assert_steps_close(got.scores, want.scores, 8, "processed scores (filtered tokens at -inf)")
    first = got.sequences[:3, inputs["input_ids"].shape[1]:]
    assert len({tuple(row.tolist()) for row in first}) > 1, "three samples of one prompt should not all agree"


def test_several_samples_per_prompt_follow_the_seed_like_a_repeated_batch(pair):
    """num_return_sequences=n samples the prompt's rows exactly as a batch holding each prompt n
    times (transformers' definition), draw for draw."""
    hf, ours = pair
    inputs = make_inputs(hf, **CASES["left_padded_batch"])
    repeated = {k: v.repeat_interleave(2, dim=0) for k, v in inputs.items()}
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=0, eos_token_id=None)
    expanded = ours.generate(**inputs, num_return_sequences=2, seed=5, **kwargs)
    assert torch.equal(expanded, ours.generate(**repeated, seed=5, **kwargs))


@pytest.mark.parametrize("kwargs", [
    dict(num_return_sequences=2, do_sample=False),
    dict(num_beams=2, num_return_sequences=3),
    dict(num_beams=2, early_stopping="sometimes"),
], ids=["greedy_with_two_sequences", "more_sequences_than_beams", "unknown_early_stopping"])
def test_settings_transformers_refuses_are_refused(pair, kwargs):
    hf, ours = pair
    inputs = make_inputs(hf, **CASES["text_only"])
    with pytest.raises(ValueError), torch.no_grad():
        hf.generate(**inputs, max_new_tokens=3, pad_token_id=0, **kwargs)
    with pytest.raises(ValueError, match="num_beams|early_stopping|do_sample"):
        ours.generate(**inputs, max_new_tokens=3, **kwargs)


def test_a_streamer_cannot_follow_beams(pair):
    hf, ours = pair

    class Sink:
        def put(self, value): ...
        def end(self): ...

    with pytest.raises(ValueError, match="num_beams=1"):
        ours.generate(**make_inputs(hf, **CASES["text_only"]), max_new_tokens=3, num_beams=2, streamer=Sink())


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beams"])
def test_without_a_cache_the_tokens_are_the_cached_ones_and_transformers_ones(pair, num_beams):
    hf, ours = pair
    inputs = make_inputs(hf, **CASES["left_padded_batch"])
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=num_beams, eos_token_id=None, output_scores=True,
                  output_logits=True)
    want, gaps = reference_generate(hf, inputs, record=True, use_cache=False, **kwargs)
    if num_beams == 1:  # greedy chooses by argmax: its gaps are the best-two gaps of each step
        gaps = [float(step.topk(2).values.diff(dim=-1).abs().min()) for step in want.scores]
    uncached = ours.generate(**inputs, use_cache=False, return_dict_in_generate=True, **kwargs)
    cached = ours.generate(**inputs, use_cache=True, return_dict_in_generate=True, **kwargs)
    assert uncached.cache is None
    calls = 3 if num_beams > 1 else 1
    uncached_clear = compare_steps(uncached, want, gaps, calls_per_step=calls)
    cached_clear = compare_steps(cached, want, gaps, calls_per_step=calls)
    if uncached_clear and cached_clear:
        assert torch.equal(uncached.sequences, want.sequences), f"{uncached.sequences}\n{want.sequences}"
        assert torch.equal(uncached.sequences, cached.sequences)


def test_the_vision_tower_runs_once_per_prompt_whatever_the_beams(pair):
    hf, ours = pair
    calls = []
    hook = ours.vision_model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        ours.generate(**make_inputs(hf, **CASES["left_padded_batch"]), max_new_tokens=4, num_beams=3, eos_token_id=None)
    finally:
        hook.remove()
    assert calls == [2], f"the vision tower ran on {calls} rows; its K/V should be copied into the beams"


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_reorder_rows_copies_rows_and_keeps_static_buffers(static):
    """Every per-row tensor of the cache follows the new order (plain indexing is the oracle);
    a static cache keeps its buffers (a captured graph replays on their addresses)."""
    g = torch.Generator().manual_seed(0)
    cache = MllamaCache(3, batch=4, capacity=6, static=static)
    cache.begin(4, 5, None, torch.device("cpu"))
    for layer in (0, 2):
        cache.update(layer, torch.randn(4, 2, 5, 3, generator=g), torch.randn(4, 2, 5, 3, generator=g))
    cache.end(4, 5)
    cache.store_cross(1, torch.randn(2, 2, 7, 3, generator=g), torch.randn(2, 2, 7, 3, generator=g))
    cache.set_cross_mask_row(torch.ones(2, 1, 1, 1), num_vision_tokens=7, dtype=torch.float32)
    cache.valid[1, 0] = False  # a hole, as left padding leaves
    before = {name: t.clone() for name, t in
              dict(k0=cache.keys[0], v2=cache.values[2], valid=cache.valid, lengths=cache.lengths,
                   xk=cache.cross_keys[1], xv=cache.cross_values[1], xmask=cache.cross_mask, xrows=cache.cross_rows).items()}
    addresses = [t.data_ptr() for t in cache.buffers()]
    index = torch.tensor([1, 1, 0, 1])
    cache.reorder_rows(index)
    after = dict(k0=cache.keys[0], v2=cache.values[2], valid=cache.valid, lengths=cache.lengths,
                 xk=cache.cross_keys[1], xv=cache.cross_values[1], xmask=cache.cross_mask, xrows=cache.cross_rows)
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name][index]), f"{name} did not follow the new row order"
    assert cache.image_rows == [True, True, True, True]
    if static:
        assert [t.data_ptr() for t in cache.buffers()] == addresses
    else:
        assert cache.host_lengths == [5, 5, 5, 5]


def test_compiled_beam_search_gives_the_eager_beams(tmp_path):
    """The fixed-shape compiled step decodes beams whose cache rows are reordered in place
    between steps: same hypotheses and scores as eager decoding."""
    hf = build_hf_model(VARIANTS[0], seed=3)
    ours = MllamaForConditionalGeneration.from_pretrained(save_hf(hf, tmp_path), semantics="transformers")
    inputs = make_inputs(hf, **CASES["left_padded_batch"])
    kwargs = dict(max_new_tokens=6, num_beams=2, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                  output_scores=True)
    eager = ours.generate(**inputs, **kwargs)
    compiled = ours.generate(**inputs, compile=True, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.sequences_scores, eager.sequences_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", [dict(min_p=0.1), dict(constraints=[]), dict(assistant_model=None),
                                    dict(output_attentions=True)], ids=lambda o: next(iter(o)))
def test_options_not_implemented_are_refused_by_name(pair, option):
    hf, ours = pair
    with pytest.raises(TypeError, match=next(iter(option))):
        ours.generate(**make_inputs(hf, **CASES["text_only"]), max_new_tokens=2, **option)


@pytest.mark.parametrize("setting", [dict(top_k=1), dict(top_p=0.05)], ids=["top_k", "top_p"])
def test_beam_sampling_keeps_one_token_more_than_the_eos_ids_like_transformers(setting):
    """Beam sampling filters with min_tokens_to_keep = number of eos ids + 1 (transformers'
    warpers), so that a beam can go on when the best token ends it."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    log_probs = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)).mul(4).log_softmax(-1)
    eos = [3, 7]
    warper = (TopKLogitsWarper(setting["top_k"], min_tokens_to_keep=3) if "top_k" in setting
              else TopPLogitsWarper(setting["top_p"], min_tokens_to_keep=3))
    cfg = SamplingConfig(do_sample=True, top_k=setting.get("top_k", 0), top_p=setting.get("top_p", 1.0))
    ours = process_logits(log_probs, torch.zeros(4, 1, dtype=torch.long), cfg, new_tokens=0, eos_token_ids=eos,
                          min_tokens_to_keep=len(eos) + 1)
    want = warper(None, log_probs.clone())
    assert torch.equal(ours, want)
    assert (torch.isfinite(ours).sum(-1) == 3).all(), "three tokens should survive the filter"


def reference_beam_search(next_log_probs, ids, *, num_beams, max_length, eos, length_penalty, early_stopping, n):
    """transformers' `_beam_search` loop around its own beam helpers, with `next_log_probs(ids,
    length)` in place of the model (the loop glue as in transformers 5.24, minus the model call)."""
    from transformers.generation.utils import GenerationMixin

    ref = object.__new__(type("Reference", (GenerationMixin,), {}))
    batch, cur_len = ids.shape[0] // num_beams, ids.shape[1]
    prompt_len, eos_t = cur_len, torch.tensor(eos)
    keep = max(2, 1 + len(eos)) * num_beams
    top_num_beam_mask = torch.arange(keep) < num_beams
    fill = eos[0]  # transformers' `pad_token_id or eos_token_id[0]` with pad id 0
    running = torch.full((batch, num_beams, max_length), fill, dtype=torch.int64)
    running[:, :, :cur_len] = ids.view(batch, num_beams, -1)
    sequences = running.clone()
    running_scores = torch.zeros(batch, num_beams)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch, num_beams), -1e9)
    finished = torch.zeros(batch, num_beams, dtype=torch.bool)
    unsatisfied = torch.ones(batch, 1, dtype=torch.bool)
    running_indices = torch.full((batch, num_beams, max_length - cur_len), -1, dtype=torch.int32)
    beam_indices = running_indices.clone()
    while True:
        log_probs = next_log_probs(running.flatten(0, 1), cur_len).view(batch, num_beams, -1)
        log_probs = (log_probs + running_scores[:, :, None]).reshape(batch, -1)
        top_lp, top_seq, top_idx = ref._get_top_k_continuations(
            accumulated_log_probs=log_probs, running_sequences=running, running_beam_indices=running_indices,
            cur_len=cur_len, decoder_prompt_len=prompt_len, do_sample=False, beams_to_keep=keep,
            num_beams=num_beams, batch_size=batch)
        hits = torch.isin(top_seq[:, :, cur_len], eos_t) | (cur_len + 1 >= max_length)
        running, running_scores, running_indices = ref._get_running_beams_for_next_iteration(
            topk_log_probs=top_lp, topk_running_sequences=top_seq, topk_running_beam_indices=top_idx,
            next_token_hits_stopping_criteria=hits, num_beams=num_beams)
        sequences, beam_scores, beam_indices, finished = ref._update_finished_beams(
            sequences=sequences, topk_running_sequences=top_seq, beam_scores=beam_scores, topk_log_probs=top_lp,
            beam_indices=beam_indices, topk_running_beam_indices=top_idx, is_early_stop_heuristic_unsatisfied=unsatisfied,
            is_sent_finished=finished, next_token_hits_stopping_criteria=hits, top_num_beam_mask=top_num_beam_mask,
            num_beams=num_beams, cur_len=cur_len, decoder_prompt_len=prompt_len, length_penalty=length_penalty,
            early_stopping=early_stopping)
        cur_len += 1
        unsatisfied = ref._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=unsatisfied, running_beam_scores=running_scores,
            beam_scores=beam_scores, is_sent_finished=finished, cur_len=cur_len, max_length=max_length,
            decoder_prompt_len=prompt_len, early_stopping=early_stopping, length_penalty=length_penalty)
        if not ref._beam_search_has_unfinished_sequences(unsatisfied, finished, hits, early_stopping):
            break
    sequences, beam_scores = sequences[:, :n].flatten(0, 1), beam_scores[:, :n].flatten()
    beam_indices = beam_indices[:, :n].flatten(0, 1)
    longest = int((beam_indices + 1).bool().sum(dim=1).max())
    return sequences[:, : prompt_len + longest], beam_scores, beam_indices[:, :longest]


@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False, "never"], ids=str)
@pytest.mark.parametrize("seed", range(10))
def test_beam_bookkeeping_equals_transformers_helpers_where_hypotheses_end_often(seed, early_stopping, length_penalty):
    """A bigram 'model' whose end token is likely: many hypotheses end early, so the finished
    set, length penalty and every early-stopping rule decide the result. Same inputs, same
    float operations: the results must be identical."""
    from model.beam_search import BeamSearch

    g = torch.Generator().manual_seed(seed)
    vocab, eos, num_beams, prompt_len, max_length = 12, [3], 3, 4, 16
    table = torch.randn(vocab, vocab, generator=g).mul(2)
    table[:, 3] += 1.5  # the end token is often among the best
    table = table.log_softmax(-1)
    ids = torch.randint(4, vocab, (4, prompt_len), generator=g).repeat_interleave(num_beams, dim=0)

    def next_log_probs(sequences, length):
        return table[sequences[:, length - 1]]

    want = reference_beam_search(next_log_probs, ids, num_beams=num_beams, max_length=max_length, eos=eos,
                                 length_penalty=length_penalty, early_stopping=early_stopping, n=2)
    beams = BeamSearch(ids, num_beams=num_beams, max_length=max_length, eos_token_ids=eos, pad_token_id=0,
                       length_penalty=length_penalty, early_stopping=early_stopping, do_sample=False)
    for length in range(prompt_len, max_length):
        beams.step(next_log_probs(beams.ids, length), length, last=length + 1 == max_length)
        if beams.done:
            break
    got = beams.result(2)
    for what, mine, theirs in zip(("sequences", "scores", "beam indices"), got, want):
        assert torch.equal(mine, theirs), f"{what} differ:\n{mine}\n{theirs}"
