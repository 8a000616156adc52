"""Forward outputs as a transformers user reads them, against transformers on random small
checkpoints saved with `save_pretrained`: the output classes and their ModelOutput behaviour,
`return_dict=False`, `output_hidden_states`, `output_attentions`, and the cache a forward returns
(fed back into the next forward, read per layer).

The reference runs with eager attention, the one that returns attention weights. Values are
compared on the real (non-padding) rows, float32, 1e-4 relative.
"""
from __future__ import annotations

import pytest
import torch
from reference import (
    IMAGE_TOKEN,
    VARIANTS,
    ImageSpec,
    build_hf_model,
    make_inputs,
    relative_error,
    save_hf,
)

from model import (
    MllamaForCausalLM,
    MllamaForConditionalGeneration,
    MllamaModel,
    MllamaTextModel,
    MllamaVisionModel,
)

TOL = 1e-4
VISION_ARGS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
CASES = {
    "text_only": dict(samples=[[], []], length=9, pad_left=[3, 0]),
    "one_picture": dict(samples=[[ImageSpec(1, 2)]], length=8),
    "left_padded_pictures": dict(samples=[[ImageSpec(2, 1)], [ImageSpec(1, 0), ImageSpec(2, 4)]], length=10,
                                 pad_left=[4, 0]),
}


class Pair:
    """The reference's five classes (eager attention, sharing one set of weights) and ours,
    each loaded from the same save_pretrained folder."""

    def __init__(self, hf, folder: str, semantics: str = "transformers") -> None:
        from transformers import MllamaForCausalLM as HFCausalLM
        from transformers import MllamaForConditionalGeneration as HFModel

        full = HFModel.from_pretrained(folder, attn_implementation="eager").eval()
        causal = HFCausalLM(full.config.text_config).eval()
        causal.model, causal.lm_head = full.model.language_model, full.lm_head
        self.hf = hf
        self.ref = {"vision": full.model.vision_model, "text": full.model.language_model, "causal_lm": causal,
                    "model": full.model, "full": full}
        self.ours = {
            "vision": MllamaVisionModel.from_pretrained(folder, semantics=semantics),
            "text": MllamaTextModel.from_pretrained(folder, semantics=semantics),
            "causal_lm": MllamaForCausalLM.from_pretrained(folder, semantics=semantics),
            "model": MllamaModel.from_pretrained(folder, semantics=semantics),
            "full": MllamaForConditionalGeneration.from_pretrained(folder, semantics=semantics),
        }

    def call(self, kind: str, inputs: dict, **options):
        args = arguments(kind, inputs)
        with torch.no_grad():
            return self.ours[kind](**args, **options), self.ref[kind](**args, **options)


def arguments(kind: str, inputs: dict) -> dict:
    if kind == "vision":
        return {k: inputs[k] for k in VISION_ARGS}
    if kind in ("text", "causal_lm"):
        return {k: inputs[k] for k in ("input_ids", "attention_mask")}
    return dict(inputs)


@pytest.fixture(scope="module", params=VARIANTS[:2], ids=lambda v: v.name)
def pair(request, tmp_path_factory) -> Pair:
    hf = build_hf_model(request.param)
    return Pair(hf, save_hf(hf, tmp_path_factory.mktemp(request.param.name)))


def assert_matches(got, want, rows: torch.Tensor | None, where: str = "output") -> None:
    """Same structure (output classes, keys, tuple lengths), shapes and values. `rows` (B, L)
    marks real tokens: tensors over the text sequence are compared on those rows only."""
    if type(want).__name__ == "DynamicCache":
        assert_caches_match(got, want, rows, where)
    elif hasattr(want, "to_tuple"):
        assert type(got).__name__ == type(want).__name__, f"{where}: {type(got).__name__} != {type(want).__name__}"
        assert list(got.keys()) == list(want.keys()), f"{where}: keys {list(got.keys())} != {list(want.keys())}"
        for key in want.keys():
            assert_matches(got[key], want[key], rows, f"{where}.{key}")
    elif isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), f"{where}: {len(got)} items, transformers has {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_matches(g, w, rows, f"{where}[{i}]")
    else:
        assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        got, want = on_rows(got, rows), on_rows(want, rows)
        err = relative_error(got, want)
        assert err < TOL, f"{where}: relative error {err:.2e}"


def on_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The real rows of a (B, L, ...) hidden state or of the queries of a (B, H, L, K) attention."""
    if rows is None or t.dim() < 3:
        return t
    if t.shape[:2] == rows.shape:
        return t[rows]
    if t.dim() == 4 and t.shape[0] == rows.shape[0] and t.shape[2] == rows.shape[1]:
        return t.transpose(1, 2)[rows]
    return t


def assert_caches_match(got, want, rows, where: str) -> None:
    """Per-layer K/V as transformers 5 shows them (`cache.layers[i].keys/.values`)."""
    assert len(got) == len(want), f"{where}: {len(got)} layers, transformers has {len(want)}"
    for i, (g, w) in enumerate(zip(got.layers, want.layers)):
        for name in ("keys", "values"):
            mine, theirs = getattr(g, name), getattr(w, name)
            if theirs is None or theirs.numel() == 0:
                assert mine is None, f"{where}.layers[{i}].{name}: transformers has none"
                continue
            assert mine.shape == theirs.shape, f"{where}.layers[{i}].{name}: {tuple(mine.shape)} != {tuple(theirs.shape)}"
            if rows is not None and theirs.shape[2] == rows.shape[1]:  # self-attention K/V: real positions
                mine, theirs = mine.transpose(1, 2)[rows], theirs.transpose(1, 2)[rows]
            err = relative_error(mine, theirs)
            assert err < TOL, f"{where}.layers[{i}].{name}: relative error {err:.2e}"


def real_rows(kind: str, inputs: dict) -> torch.Tensor | None:
    return None if kind == "vision" else inputs["attention_mask"].bool()


def kinds_for(case: str) -> list[str]:
    return ["text", "causal_lm", "model", "full"] if case == "text_only" else ["model", "full"]


# --- ModelOutput behaviour -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_output_classes_keys_and_values_match(pair, case):
    inputs = make_inputs(pair.hf, **CASES[case])
    for kind in kinds_for(case) + (["vision"] if case != "text_only" else []):
        got, want = pair.call(kind, inputs)
        assert_matches(got, want, real_rows(kind, inputs), kind)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_return_dict_false_gives_the_same_tuple(pair, case):
    inputs = make_inputs(pair.hf, **CASES[case])
    for kind in kinds_for(case):
        got, want = pair.call(kind, inputs, return_dict=False, output_hidden_states=True, output_attentions=True)
        assert isinstance(got, tuple) and isinstance(want, tuple)
        assert_matches(got, want, real_rows(kind, inputs), kind)


def test_model_output_reads_like_transformers(pair):
    inputs = make_inputs(pair.hf, **CASES["one_picture"])
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
    got, want = pair.call("full", inputs, output_hidden_states=True)
    assert list(got) == list(want) == list(got.keys())
    assert [k for k, _ in got.items()] == list(want.keys())
    assert len(got) == len(want)
    for name in ("loss", "logits", "hidden_states", "image_outputs", "cache", "past_key_values"):
        assert (name in got) == (name in want), name
    assert "attentions" not in got and "attentions" not in want
    assert got["past_key_values"] is got.cache is got.past_key_values
    assert torch.equal(got[0], got.loss) and torch.equal(got["logits"], got[1]) and torch.equal(got.logits, got[1])
    assert len(got[1:3]) == len(want[1:3]) == 2
    assert isinstance(got[-1], tuple) and isinstance(want[-1], tuple)  # image_outputs as a tuple
    assert_matches(got.to_tuple(), want.to_tuple(), inputs["attention_mask"].bool())
    assert relative_error(got.loss, want.loss) < TOL
    with pytest.raises(KeyError):
        got["attentions"]


# --- hidden states and attentions --------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hidden_states_and_attentions_match(pair, case):
    inputs = make_inputs(pair.hf, **CASES[case])
    for kind in kinds_for(case):
        got, want = pair.call(kind, inputs, output_hidden_states=True, output_attentions=True)
        layers_run = pair.hf.config.text_config.num_hidden_layers
        if case == "text_only":
            layers_run -= len(pair.hf.config.text_config.cross_attention_layers)
        assert len(got.hidden_states) == layers_run + 1 and len(got.attentions) == layers_run
        assert_matches(got, want, real_rows(kind, inputs), kind)


def test_config_flags_are_the_defaults(pair):
    """An unset output_* argument takes the model config's, as in transformers."""
    inputs = make_inputs(pair.hf, **CASES["text_only"])
    configs = (pair.ours["text"].config, pair.ref["text"].config)
    try:
        for config in configs:
            config.output_hidden_states = True
        got, want = pair.call("text", inputs)
        assert_matches(got, want, real_rows("text", inputs), "text")
        assert "hidden_states" in got
        got, want = pair.call("text", inputs, output_hidden_states=False)
        assert list(got.keys()) == list(want.keys()) == ["last_hidden_state", "cache"]
    finally:
        for config in configs:
            config.output_hidden_states = False


def vision_reference_states(pair: Pair, args: dict) -> tuple[tuple, tuple]:
    """What transformers' two vision encoders compute: each encoder's input and the output of
    each of its layers, and each layer's attention weights (read through forward hooks)."""
    vision = pair.ref["vision"]
    hidden, attentions, hooks = [], [], []

    def encoder_hook(module, args, output):
        hidden.extend([args[0], *output.hidden_states])

    for encoder in (vision.transformer, vision.global_transformer):
        hooks.append(encoder.register_forward_hook(encoder_hook))
        for layer in encoder.layers:
            hooks.append(layer.self_attn.register_forward_hook(lambda m, a, out: attentions.append(out[1])))
    try:
        with torch.no_grad():
            vision(**args)
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(hidden), tuple(attentions)


def test_vision_hidden_states_and_attentions_are_the_encoders(pair):
    """transformers 5.24 returns empty tuples here (it records the text layers only); ours are
    the per-layer values its encoders compute, local then global."""
    inputs = make_inputs(pair.hf, **CASES["left_padded_pictures"])
    args = arguments("vision", inputs)
    got, want = pair.call("vision", inputs, output_hidden_states=True, output_attentions=True)
    assert want.hidden_states == () and want.attentions == ()
    hidden, attentions = vision_reference_states(pair, args)
    vc = pair.hf.config.vision_config
    assert len(got.hidden_states) == vc.num_hidden_layers + vc.num_global_layers + 2
    assert len(got.attentions) == vc.num_hidden_layers + vc.num_global_layers
    assert_matches(got.hidden_states, hidden, None, "hidden_states")
    assert_matches(got.attentions, attentions, None, "attentions")
    assert_matches(got.last_hidden_state, want.last_hidden_state, None, "last_hidden_state")
    ours_tuple = pair.ours["vision"](**args, output_hidden_states=True, return_dict=False)
    assert len(ours_tuple) == 2 and len(ours_tuple[1]) == len(hidden)


@pytest.mark.parametrize("semantics", ["transformers", "meta"])
def test_vision_intermediate_features_are_hidden_states(pair, semantics):
    """The intermediate features in last_hidden_state are the hidden states at the listed
    indices: transformers takes the output of layer i (hidden_states[i + 1]), Meta its input."""
    inputs = make_inputs(pair.hf, **CASES["one_picture"])
    vision = pair.ours["vision"]
    vision.config.semantics = semantics
    try:
        with torch.no_grad():
            out = vision(**arguments("vision", inputs), output_hidden_states=True)
    finally:
        vision.config.semantics = "transformers"
    vc = pair.hf.config.vision_config
    b, n, t, p, _ = out.last_hidden_state.shape
    shift = 1 if semantics == "transformers" else 0
    for k, i in enumerate(vc.intermediate_layers_indices):
        state = out.hidden_states[i + shift].reshape(b, n, t, -1, vc.hidden_size)[:, :, :, :p]
        feature = out.last_hidden_state[..., vc.hidden_size:].unflatten(-1, (vc.hidden_size, -1))[..., k]
        assert torch.equal(feature, state)


def test_meta_semantics_differs_only_where_documented(tmp_path_factory):
    """Under Meta semantics, with every row seeing the picture, hidden states and attentions
    equal transformers' with the vision intermediate indices shifted by one (README, Semantics)."""
    from transformers import MllamaForConditionalGeneration as HFModel

    variant = VARIANTS[0]
    hf = build_hf_model(variant)
    folder = save_hf(hf, tmp_path_factory.mktemp("meta"))
    shifted = variant.hf_config()
    shifted.vision_config.intermediate_layers_indices = [i - 1 for i in shifted.vision_config.intermediate_layers_indices]
    shifted._attn_implementation = "eager"
    oracle = HFModel(shifted).eval()
    oracle.load_state_dict(hf.state_dict())
    ours = MllamaForConditionalGeneration.from_pretrained(folder)
    inputs = make_inputs(hf, [[ImageSpec(1, 0)], [ImageSpec(2, 0)]], length=9)
    with torch.no_grad():
        got = ours(**inputs, output_hidden_states=True, output_attentions=True)
        want = oracle(**inputs, output_hidden_states=True, output_attentions=True)
    assert_matches(got, want, None)


# --- the cache a forward returns ------------------------------------------------------------------


def extend(inputs: dict, new_tokens: torch.Tensor) -> dict:
    """The next forward's inputs in transformers' convention: the new tokens, the attention mask
    and cross-attention mask over the whole sequence (the last row repeated for new tokens)."""
    step = {"input_ids": new_tokens}
    k = new_tokens.shape[1]
    step["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], dim=1)
    if "cross_attention_mask" in inputs:
        cross = inputs["cross_attention_mask"]
        step["cross_attention_mask"] = torch.cat([cross, cross[:, -1:].expand(-1, k, -1, -1)], dim=1)
    return step


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_returned_cache_feeds_the_next_forward_like_transformers(pair, case):
    inputs = make_inputs(pair.hf, **CASES[case])
    batch = inputs["input_ids"].shape[0]
    got, want = pair.call("full", inputs)
    rows = inputs["attention_mask"].bool()
    assert_caches_match(got.cache, want.cache, rows, "prefill cache")
    for step, new in enumerate([torch.randint(3, 300, (batch, 1)), torch.randint(3, 300, (batch, 3))]):
        inputs_step = extend(inputs, new)
        flags = dict(output_hidden_states=True, output_attentions=True)
        with torch.no_grad():
            # Both names of the argument, as transformers 5 takes both.
            got = pair.ours["full"](**inputs_step, past_key_values=got.past_key_values, **flags)
            want = pair.ref["full"](**inputs_step, cache=want.cache, **flags)
        assert type(got.cache).__name__ == "MllamaCache"
        err = relative_error(got.logits, want.logits)
        assert err < TOL, f"step {step}: relative error {err:.2e}"
        assert_matches(got.hidden_states, want.hidden_states, None, f"step {step} hidden_states")
        assert_matches(got.attentions, want.attentions, None, f"step {step} attentions")
        inputs = {**inputs, **inputs_step, "input_ids": torch.cat([inputs["input_ids"], new], dim=1)}
        rows = inputs["attention_mask"].bool()
        assert_caches_match(got.cache, want.cache, rows, f"cache after step {step}")


def test_cache_reads_per_layer_like_dynamic_cache(pair):
    inputs = make_inputs(pair.hf, **CASES["one_picture"])
    got, want = pair.call("full", inputs)
    tc = pair.hf.config.text_config
    assert len(got.cache) == len(want.cache) == tc.num_hidden_layers
    for (k, v, extra), (hk, hv, hextra), layer in zip(got.cache, want.cache, got.cache.layers):
        assert extra is None and hextra is None
        assert k.shape == hk.shape and v.shape == hv.shape
        assert k.shape[1] == tc.num_key_value_heads and k.shape[3] == tc.hidden_size // tc.num_attention_heads
        assert k is not None and torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    assert got.cache.get_seq_length() == want.cache.get_seq_length()


def test_text_model_cache_feeds_back(pair):
    inputs = make_inputs(pair.hf, [[]], length=6)
    got, want = pair.call("causal_lm", inputs)
    new = torch.randint(3, 300, (1, 2))
    step = extend(inputs, new)
    with torch.no_grad():
        got = pair.ours["causal_lm"](**step, cache=got.cache)
        want = pair.ref["causal_lm"](**step, cache=want.cache)
    assert relative_error(got.logits, want.logits) < TOL


def test_cache_given_twice_is_refused(pair):
    inputs = make_inputs(pair.hf, [[]], length=4)
    with torch.no_grad():
        cache = pair.ours["full"](**inputs).cache
        with pytest.raises(ValueError, match="pass the cache once"):
            pair.ours["full"](**extend(inputs, torch.tensor([[5]])), cache=cache, past_key_values=cache)


def test_hidden_state_selection_is_refused_with_a_way_out(pair):
    inputs = make_inputs(pair.hf, [[]], length=4)
    with torch.no_grad(), pytest.raises(TypeError, match="index the returned hidden_states"):
        pair.ours["text"](**arguments("text", inputs), output_hidden_states=[0, 2])
