"""model.sampling: logits processing and token selection, proved against transformers' own
processors, built by transformers' own `_get_logits_processor` so that the order is theirs too."""
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerationMixin

from model.sampling import SamplingConfig, process_logits, select_next_tokens

V = 64  # vocabulary size of the random cases
EOS = [3, 7, 200]  # 200 lies outside the vocabulary, as in transformers it must be ignored


class _ReferenceModel(GenerationMixin):
    config = SimpleNamespace(is_encoder_decoder=False)


def reference_scores(
    cfg: SamplingConfig,
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    prompt_len: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """What transformers' generate() feeds to argmax / multinomial for these settings."""
    gc = GenerationConfig(
        do_sample=not cfg.greedy,
        temperature=cfg.temperature if not cfg.greedy else None,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty,
        min_new_tokens=cfg.min_new_tokens,
    )
    gc.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    gc._eos_token_tensor = torch.tensor(EOS)
    model_kwargs = {} if attention_mask is None else {"attention_mask": attention_mask[:, :prompt_len]}
    processors = _ReferenceModel()._get_logits_processor(
        gc, input_ids_seq_length=prompt_len, model_kwargs=model_kwargs
    )
    return processors(input_ids, logits.clone())


def random_case(seed: int, batch: int = 4, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, V, generator=g) * 3
    input_ids = torch.randint(0, V, (batch, length), generator=g)
    return logits, input_ids


def assert_same_scores(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), f"{what}: a different set of tokens was filtered"
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6, msg=lambda m: f"{what}: scores differ from transformers: {m}")


# --- each processor against transformers -----------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    logits, ids = random_case(0)
    cfg = SamplingConfig(repetition_penalty=penalty)
    ours = process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=EOS)
    assert_same_scores(ours, reference_scores(cfg, logits, ids, prompt_len=ids.shape[1]), f"penalty {penalty}")
    assert not torch.equal(ours, logits), "the penalty changed nothing"


def test_repetition_penalty_lowers_the_probability_of_seen_tokens_only():
    logits, ids = random_case(1, batch=1)
    ours = process_logits(logits, ids, SamplingConfig(repetition_penalty=1.5), new_tokens=0, eos_token_ids=[])
    before, after = logits.softmax(-1)[0], ours.softmax(-1)[0]
    seen = torch.zeros(V, dtype=torch.bool)
    seen[ids[0]] = True
    assert (after[seen] < before[seen]).all(), "a seen token did not lose probability"
    assert (after[~seen] > before[~seen]).all(), "an unseen token did not gain probability"


def test_repetition_penalty_ignores_ids_the_lm_head_cannot_produce():
    # Mllama's <|image|> id equals the lm head's vocabulary size.
    logits, ids = random_case(2)
    ids[:, 0] = V
    cfg = SamplingConfig(repetition_penalty=1.3)
    ours = process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=EOS)
    assert_same_scores(ours, reference_scores(cfg, logits, ids, prompt_len=ids.shape[1]), "id == vocab size")


def test_repetition_penalty_skips_left_padding_like_transformers():
    logits, ids = random_case(3)
    pad = 9
    ids[ids == pad] = pad + 1
    ids[0, :5] = pad  # row 0 has 5 pads, row 2 has 2; only real tokens count as repeated
    ids[2, :2] = pad
    mask = (ids != pad).long()
    cfg = SamplingConfig(repetition_penalty=1.3)
    ours = process_logits(logits, ids, cfg, new_tokens=2, eos_token_ids=EOS, attention_mask=mask)
    ref = reference_scores(cfg, logits, ids, prompt_len=ids.shape[1] - 2, attention_mask=mask)
    assert_same_scores(ours, ref, "left padding")
    assert ours[0, pad] == logits[0, pad], "a padding position was penalised"


def test_repetition_penalty_rejects_a_mask_of_another_shape():
    logits, ids = random_case(4)
    with pytest.raises(ValueError, match="one mask entry per input id"):
        process_logits(logits, ids, SamplingConfig(repetition_penalty=1.2), new_tokens=0,
                       eos_token_ids=EOS, attention_mask=torch.ones(ids.shape[0], ids.shape[1] - 1))


@pytest.mark.parametrize("new_tokens", [0, 2, 3, 5])
def test_min_new_tokens_blocks_eos_until_reached_like_transformers(new_tokens):
    logits, ids = random_case(5)
    cfg = SamplingConfig(min_new_tokens=3)
    ours = process_logits(logits, ids, cfg, new_tokens=new_tokens, eos_token_ids=EOS)
    ref = reference_scores(cfg, logits, ids, prompt_len=ids.shape[1] - new_tokens)
    assert_same_scores(ours, ref, f"{new_tokens} new tokens")
    blocked = bool(torch.isinf(ours[:, EOS[:2]]).all())
    assert blocked == (new_tokens < 3), f"eos blocked={blocked} after {new_tokens} of min 3 new tokens"


def test_min_new_tokens_counts_per_row_when_given_a_tensor():
    logits, ids = random_case(6, batch=2)
    cfg = SamplingConfig(min_new_tokens=3)
    ours = process_logits(logits, ids, cfg, new_tokens=torch.tensor([1, 4]), eos_token_ids=EOS)
    short = process_logits(logits, ids, cfg, new_tokens=1, eos_token_ids=EOS)
    long = process_logits(logits, ids, cfg, new_tokens=4, eos_token_ids=EOS)
    assert torch.equal(ours[0], short[0]), "row 0 (1 new token) must have eos blocked"
    assert torch.equal(ours[1], long[1]), "row 1 (4 new tokens) must keep eos"


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature_matches_transformers(temperature):
    logits, ids = random_case(7)
    cfg = SamplingConfig(do_sample=True, temperature=temperature, top_k=0)
    ours = process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=EOS)
    assert_same_scores(ours, reference_scores(cfg, logits, ids, ids.shape[1]), f"temperature {temperature}")


@pytest.mark.parametrize("top_k", [1, 5, V, 1000])
def test_top_k_matches_transformers(top_k):
    logits, ids = random_case(8)
    cfg = SamplingConfig(do_sample=True, top_k=top_k)
    ours = process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=EOS)
    assert_same_scores(ours, reference_scores(cfg, logits, ids, ids.shape[1]), f"top_k {top_k}")
    kept = torch.isfinite(ours).sum(-1)
    assert (kept == min(top_k, V)).all(), f"top_k={top_k} kept {kept.tolist()} tokens"


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(top_p):
    logits, ids = random_case(9)
    cfg = SamplingConfig(do_sample=True, top_k=0, top_p=top_p)
    ours = process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=EOS)
    assert_same_scores(ours, reference_scores(cfg, logits, ids, ids.shape[1]), f"top_p {top_p}")


def test_top_p_keeps_the_smallest_set_of_best_tokens_holding_that_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    ours = process_logits(logits, torch.zeros(1, 1, dtype=torch.long),
                          SamplingConfig(do_sample=True, top_k=0, top_p=0.75), new_tokens=0, eos_token_ids=[])
    assert torch.isfinite(ours[0]).tolist() == [True, True, False, False], "top_p=0.75 must keep 0.5 and 0.3"


def test_top_p_drops_tokens_whose_mass_lands_exactly_on_the_boundary_like_transformers():
    # Uniform over 4: the ascending cumulative mass is exactly [0.25, 0.5, 0.75, 1.0].
    logits, ids = torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.long)
    cfg = SamplingConfig(do_sample=True, top_k=0, top_p=0.5)
    ours = process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=[])
    assert int(torch.isfinite(ours).sum()) == 2, "top_p=0.5 over 4 equal tokens must keep exactly 2"
    assert_same_scores(ours, reference_scores(cfg, logits, ids, 1), "exact boundary")


def test_top_p_always_keeps_the_best_token():
    # float32 mass sums to just under 1, so a tiny top_p would otherwise drop every token.
    logits, ids = random_case(18)
    cfg = SamplingConfig(do_sample=True, top_k=0, top_p=1e-9)
    ours = process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=[])
    assert torch.equal(torch.isfinite(ours), logits == logits.max(-1, keepdim=True).values), "not only the best kept"
    assert_same_scores(ours, reference_scores(cfg, logits, ids, ids.shape[1]), "tiny top_p")


COMBINED = {
    "llama-3.2-vision-instruct defaults": dict(do_sample=True, temperature=0.6, top_p=0.9),
    "everything": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.8, repetition_penalty=1.2, min_new_tokens=4),
    "hot and penalised": dict(do_sample=True, temperature=1.5, top_k=5, repetition_penalty=0.8, min_new_tokens=1),
    "greedy ignores warpers": dict(do_sample=False, temperature=0.5, top_k=3, top_p=0.5, repetition_penalty=1.3, min_new_tokens=4),
}


@pytest.mark.parametrize("settings", COMBINED.values(), ids=COMBINED.keys())
def test_settings_combined_match_transformers_in_its_order(settings):
    cfg = SamplingConfig(**settings)
    for seed in range(5):
        logits, ids = random_case(100 + seed, batch=3, length=15)
        ours = process_logits(logits, ids, cfg, new_tokens=2, eos_token_ids=EOS)
        assert_same_scores(ours, reference_scores(cfg, logits, ids, prompt_len=13), f"{settings}, seed {seed}")


def test_process_logits_leaves_its_inputs_untouched():
    logits, ids = random_case(10)
    logits_copy, ids_copy = logits.clone(), ids.clone()
    cfg = SamplingConfig(**COMBINED["everything"])
    process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=EOS)
    assert torch.equal(logits, logits_copy) and torch.equal(ids, ids_copy), "process_logits modified its inputs"


def test_process_logits_works_in_float32_like_transformers_generate():
    logits, ids = random_case(11)
    cfg = SamplingConfig(do_sample=True, temperature=0.7)
    ours = process_logits(logits.bfloat16(), ids, cfg, new_tokens=0, eos_token_ids=EOS)
    ref = reference_scores(cfg, logits.bfloat16().float(), ids, ids.shape[1])
    assert ours.dtype == torch.float32
    assert_same_scores(ours, ref, "bfloat16 logits")


# --- token selection --------------------------------------------------------------------------


def test_greedy_selects_the_argmax_of_the_processed_scores():
    logits, ids = random_case(12)
    cfg = SamplingConfig(repetition_penalty=1.3)
    scores = process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=EOS)
    assert torch.equal(select_next_tokens(scores, cfg), scores.argmax(-1))


def test_sampling_draws_what_transformers_draws_from_the_same_seed():
    cfg = SamplingConfig(**COMBINED["everything"])
    logits, ids = random_case(13, batch=16)
    ours = select_next_tokens(process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=EOS), cfg,
                              torch.Generator().manual_seed(1234))
    torch.manual_seed(1234)  # transformers samples from the global generator
    ref_scores = reference_scores(cfg, logits, ids, ids.shape[1])
    ref = torch.multinomial(torch.softmax(ref_scores, dim=-1), num_samples=1).squeeze(1)
    assert ours.dtype == torch.long and ours.shape == (16,)
    assert torch.equal(ours, ref), f"sampled {ours.tolist()}, transformers {ref.tolist()}"


def test_a_fixed_seed_reproduces_the_tokens_and_another_seed_does_not():
    cfg = SamplingConfig(do_sample=True, top_k=0)
    logits = torch.zeros(64, V)  # uniform: every draw is a fresh coin
    draw = lambda seed: select_next_tokens(logits, cfg, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(7), draw(7)), "the same seed gave different tokens"
    assert not torch.equal(draw(7), draw(8)), "different seeds gave the same 64 tokens"


def test_sampled_tokens_follow_the_processed_distribution():
    cfg = SamplingConfig(do_sample=True, temperature=0.8, top_k=4)
    logits = torch.log(torch.tensor([0.3, 0.25, 0.2, 0.1, 0.08, 0.07])).repeat(20000, 1)
    scores = process_logits(logits, torch.zeros(20000, 1, dtype=torch.long), cfg, new_tokens=0, eos_token_ids=[])
    tokens = select_next_tokens(scores, cfg, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=6).double()
    expected = scores[0].softmax(-1).double()
    assert counts[4:].sum() == 0, "a token removed by top_k was sampled"
    # 5 standard deviations of a binomial count: fails only if the sampler is biased.
    sigma = (20000 * expected * (1 - expected)).sqrt()
    assert ((counts - 20000 * expected).abs() <= 5 * sigma + 1e-9).all(), f"counts {counts.tolist()} vs {expected.tolist()}"


def test_temperature_zero_is_greedy():
    cfg = SamplingConfig(do_sample=True, temperature=0.0, top_k=3)
    assert cfg.greedy
    logits, ids = random_case(14)
    scores = process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=EOS)
    assert torch.equal(scores, logits), "greedy decoding must not apply temperature or top-k"
    assert torch.equal(select_next_tokens(scores, cfg, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_a_tiny_temperature_samples_the_argmax():
    cfg = SamplingConfig(do_sample=True, temperature=1e-4, top_k=0)
    logits, ids = random_case(15, batch=64)
    scores = process_logits(logits, ids, cfg, new_tokens=0, eos_token_ids=EOS)
    for seed in range(5):
        tokens = select_next_tokens(scores, cfg, torch.Generator().manual_seed(seed))
        assert torch.equal(tokens, logits.argmax(-1)), f"seed {seed}: a tiny temperature sampled a non-argmax token"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_a_decode_step_on_the_gpu_never_syncs_the_host():
    cfg = SamplingConfig(**COMBINED["everything"])
    logits, ids = (t.cuda() for t in random_case(16))
    generator = torch.Generator(device="cuda").manual_seed(0)
    new_tokens = torch.tensor([0, 1, 5, 9], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scores = process_logits(logits, ids, cfg, new_tokens=new_tokens, eos_token_ids=EOS,
                                attention_mask=torch.ones_like(ids))
        select_next_tokens(scores, cfg, generator)
        process_logits(logits, ids, cfg, new_tokens=2, eos_token_ids=EOS)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_gpu_scores_equal_cpu_scores():
    cfg = SamplingConfig(**COMBINED["everything"])
    logits, ids = random_case(17)
    cpu = process_logits(logits, ids, cfg, new_tokens=1, eos_token_ids=EOS)
    gpu = process_logits(logits.cuda(), ids.cuda(), cfg, new_tokens=1, eos_token_ids=EOS).cpu()
    assert torch.equal(torch.isinf(cpu), torch.isinf(gpu))
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5)


# --- configuration ----------------------------------------------------------------------------


def test_defaults_are_transformers_defaults():
    hf = GenerationConfig._get_default_generation_params()
    cfg = SamplingConfig()
    for name in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
        assert getattr(cfg, name) == hf[name], f"default {name}={getattr(cfg, name)}, transformers {hf[name]}"
    assert cfg.min_new_tokens == 0 and cfg.greedy


def test_checkpoint_generation_config_is_read_and_other_keys_ignored():
    instruct = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004,
                "do_sample": True, "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0.dev0"}
    cfg = SamplingConfig.from_generation_config(instruct)
    assert cfg == SamplingConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=50)


def test_user_overrides_win_and_none_means_not_set():
    ckpt = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    cfg = SamplingConfig.from_generation_config(ckpt, temperature=1.2, top_p=None, top_k=7)
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.do_sample) == (1.2, 0.9, 7, True)


@pytest.mark.parametrize("ckpt, overrides", [
    ({"do_sample": True, "temperature": 0.6}, {"temperature": 0}),
    ({"do_sample": True, "temperature": 0.6}, {"do_sample": False}),
    ({"temperature": 0.6, "top_p": 0.9}, {}),  # base checkpoints: no do_sample -> greedy
])
def test_temperature_zero_or_no_sampling_means_greedy(ckpt, overrides):
    assert SamplingConfig.from_generation_config(ckpt, **overrides).greedy


def test_an_unknown_override_is_an_error_that_lists_the_options():
    with pytest.raises(TypeError, match=r"unknown sampling option\(s\) \['top_a'\].*temperature"):
        SamplingConfig.from_generation_config({}, top_a=3)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature=-0.1 .*>= 0"),
    ("top_p", 0.0, r"top_p=0.0 .*\(0, 1\]"),
    ("top_p", 1.5, r"top_p=1.5 .*\(0, 1\]"),
    ("top_k", -1, "top_k=-1 .*integer >= 0"),
    ("top_k", 2.5, "top_k=2.5 .*integer >= 0"),
    ("repetition_penalty", 0.0, "repetition_penalty=0.0 .*> 0"),
    ("min_new_tokens", -2, "min_new_tokens=-2 .*integer >= 0"),
    ("do_sample", "yes", "do_sample='yes' .*true or false"),
])
def test_invalid_settings_are_rejected_with_the_field_and_its_origin(field, value, message):
    with pytest.raises(ValueError, match=message + ".*") as direct:
        SamplingConfig(**{field: value})
    assert "SamplingConfig" in str(direct.value)
    with pytest.raises(ValueError, match=r"from generation_config\.json"):
        SamplingConfig.from_generation_config({field: value})
    with pytest.raises(ValueError, match="from the generation options"):
        SamplingConfig.from_generation_config({}, **{field: value})
