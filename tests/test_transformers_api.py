"""What a transformers user calls on configs, embeddings, image processors and the processor:
each test makes the same call on transformers and on ours and compares the results."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import (
    MllamaConfig,
    MllamaForCausalLM,
    MllamaForConditionalGeneration,
    MllamaModel,
    MllamaTextConfig,
    MllamaTextModel,
    MllamaVisionConfig,
    MllamaVisionModel,
)
from model.activations import ACTIVATIONS
from model.image_processing import MllamaImageProcessor
from model.image_processing_fast import MllamaImageProcessorFast
from model.tokenizer import MllamaTokenizer
from reference import VOCAB, ImageSpec, Variant, make_inputs, relative_error

TOL = 1e-4
TINY_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-mllama"


def without_version(data: dict) -> dict:
    """A config dict without the keys that name the writer, not the model."""
    data = {k: v for k, v in data.items() if k != "transformers_version"}
    for key in ("text_config", "vision_config"):
        if isinstance(data.get(key), dict):
            data[key] = without_version(data[key])
    return data


# ----------------------------------------------------------------------------------------- config
def test_config_keeps_unknown_keys_through_our_save_and_load(tmp_path):
    from transformers import MllamaConfig as HFConfig

    reference = Variant("base").hf_config()
    reference.future_field = {"a": [1, 2]}
    reference.text_config.new_text_knob = 3
    reference.save_pretrained(tmp_path / "hf")
    ours = MllamaConfig.from_pretrained(tmp_path / "hf")
    assert ours.future_field == {"a": [1, 2]} and ours.text_config.new_text_knob == 3
    ours.save_pretrained(tmp_path / "ours")
    again = HFConfig.from_pretrained(tmp_path / "ours")
    assert without_version(again.to_dict()) == without_version(reference.to_dict())
    assert MllamaConfig.from_pretrained(tmp_path / "ours").to_dict() == ours.to_dict()


def test_constructors_take_model_type_and_unknown_keywords_like_transformers():
    from transformers import MllamaTextConfig as HFText
    from transformers import MllamaVisionConfig as HFVision

    text = dict(model_type="mllama_text_model", vocab_size=99, num_hidden_layers=2, cross_attention_layers=[1],
                some_new_key="x")
    vision = dict(model_type="mllama_vision_model", num_hidden_layers=4, intermediate_layers_indices=[1],
                  vision_output_dim=2560, some_new_key=[1])
    for ours, theirs in ((MllamaTextConfig(**text), HFText(**text)), (MllamaVisionConfig(**vision), HFVision(**vision))):
        assert ours.some_new_key == theirs.some_new_key
        assert ours.to_dict()["model_type"] == theirs.to_dict()["model_type"]
        assert ours.num_hidden_layers == theirs.num_hidden_layers
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        MllamaTextConfig(model_type="llama")


def test_to_json_string_is_read_by_transformers():
    from transformers import MllamaConfig as HFConfig

    reference = Variant("base").hf_config()
    ours = MllamaConfig.from_dict(reference.to_dict())
    rebuilt = HFConfig(**json.loads(ours.to_json_string()))
    assert without_version(rebuilt.to_dict()) == without_version(reference.to_dict())
    assert json.loads(ours.text_config.to_json_string())["model_type"] == reference.text_config.model_type


def test_get_text_config_returns_what_transformers_returns():
    reference = Variant("base").hf_config()
    ours = MllamaConfig.from_dict(reference.to_dict())
    assert ours.get_text_config() is ours.text_config and reference.get_text_config() is reference.text_config
    assert ours.get_text_config(decoder=True).to_dict()["vocab_size"] == reference.get_text_config(decoder=True).vocab_size
    for ours_sub, ref_sub in ((ours.text_config, reference.text_config), (ours.vision_config, reference.vision_config)):
        assert (ours_sub.get_text_config() is ours_sub) == (ref_sub.get_text_config() is ref_sub) == True  # noqa: E712


def test_sub_config_from_pretrained_reads_its_part_of_a_full_config(tmp_path):
    from transformers import MllamaTextConfig as HFText

    Variant("base").hf_config().save_pretrained(tmp_path)
    assert MllamaTextConfig.from_pretrained(tmp_path).hidden_size == HFText.from_pretrained(tmp_path).hidden_size


def test_non_default_semantics_survives_config_and_model_save(tmp_path, tiny_hf_checkpoint):
    from transformers import MllamaConfig as HFConfig

    config = MllamaConfig()
    config.semantics = "transformers"
    config.save_pretrained(tmp_path / "config")
    assert MllamaConfig.from_pretrained(tmp_path / "config").semantics == "transformers"
    assert HFConfig.from_pretrained(tmp_path / "config").text_config.num_hidden_layers == 40  # still readable there
    model = MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint(), semantics="transformers")
    model.save_pretrained(tmp_path / "model")
    again = MllamaForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert again.config.semantics == again.config.vision_config.semantics == "transformers"
    assert "semantics" not in json.loads(MllamaConfig().to_json_string())["text_config"]  # the default stays implicit


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_matches_transformers(name):
    from transformers.activations import ACT2FN

    x = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    torch.testing.assert_close(ACTIVATIONS[name](x), ACT2FN[name](x), rtol=1e-12, atol=1e-12)


def test_unknown_activation_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="hidden_act 'swiglu' is not supported; use one of .*gelu"):
        MllamaTextConfig(hidden_act="swiglu")


@pytest.mark.parametrize("text_act,vision_act", [("gelu_pytorch_tanh", "quick_gelu"), ("relu", "gelu_new")])
def test_model_uses_the_configured_activation(tiny_hf_checkpoint, text_act, vision_act):
    from transformers import MllamaForConditionalGeneration as HFModel

    folder = tiny_hf_checkpoint(text={"hidden_act": text_act}, vision={"hidden_act": vision_act})
    hf = HFModel.from_pretrained(folder).eval()
    ours = MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers")
    silu_config = MllamaConfig.from_pretrained(folder)
    silu_config.text_config.hidden_act = silu_config.vision_config.hidden_act = "silu"
    silu = MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers", config=silu_config)
    inputs = make_inputs(hf, [[ImageSpec(2, 3)]], length=10)
    with torch.no_grad():
        want, got, other = hf(**inputs).logits, ours(**inputs).logits, silu(**inputs).logits
    assert relative_error(got, want) < TOL
    assert relative_error(other, want) > 10 * TOL  # the activation is not a no-op choice


def test_cross_attention_layers_past_the_last_layer_name_no_layer(tiny_hf_checkpoint, tmp_path):
    from transformers import MllamaForConditionalGeneration as HFModel

    folder = tiny_hf_checkpoint(text={"cross_attention_layers": [1, 4, 9]})  # 4 layers: 4 and 9 are none
    hf = HFModel.from_pretrained(folder).eval()
    ours = MllamaForConditionalGeneration.from_pretrained(folder, semantics="transformers")
    kinds = [type(layer).__name__ for layer in ours.language_model.model.layers]
    assert kinds == [type(layer).__name__ for layer in hf.model.language_model.layers]
    assert ours.config.text_config.cross_attention_layers == [1, 4, 9]
    inputs = make_inputs(hf, [[ImageSpec(1, 2)], [ImageSpec(3, 0)]], length=9)
    with torch.no_grad():
        assert relative_error(ours(**inputs).logits, hf(**inputs).logits) < TOL


# ------------------------------------------------------------------------------------- embeddings
CLASS_PAIRS = [
    ("MllamaForConditionalGeneration", MllamaForConditionalGeneration),
    ("MllamaModel", MllamaModel),
    ("MllamaForCausalLM", MllamaForCausalLM),
    ("MllamaTextModel", MllamaTextModel),
    ("MllamaVisionModel", MllamaVisionModel),
]


@pytest.mark.parametrize("name,ours_class", CLASS_PAIRS, ids=[n for n, _ in CLASS_PAIRS])
def test_get_and_set_embeddings_like_transformers(tiny_hf_checkpoint, name, ours_class):
    import transformers

    folder = tiny_hf_checkpoint()
    theirs = getattr(transformers, name).from_pretrained(folder)
    ours = ours_class.from_pretrained(folder)
    assert torch.equal(ours.get_input_embeddings().weight, theirs.get_input_embeddings().weight)
    assert type(ours.get_input_embeddings()) is type(theirs.get_input_embeddings())
    ref_head, our_head = theirs.get_output_embeddings(), ours.get_output_embeddings()
    assert (our_head is None) == (ref_head is None)
    if our_head is not None:
        assert torch.equal(our_head.weight, ref_head.weight)
        new_head = torch.nn.Linear(our_head.in_features, our_head.out_features, bias=False)
        ours.set_output_embeddings(new_head)
        assert ours.get_output_embeddings() is new_head
    replacement = torch.nn.Embedding(*ours.get_input_embeddings().weight.shape)
    if name != "MllamaVisionModel":
        ours.set_input_embeddings(replacement)
        theirs.set_input_embeddings(replacement)
        assert ours.get_input_embeddings() is replacement is theirs.get_input_embeddings()


def resized_pair(folder, new_num_tokens, seed=0, ours_class=MllamaForConditionalGeneration, **kwargs):
    import transformers

    theirs = getattr(transformers, ours_class.__name__).from_pretrained(folder)
    ours = ours_class.from_pretrained(folder, semantics="transformers")
    old = {"embed": ours.get_input_embeddings().weight.clone(), "head": ours.get_output_embeddings().weight.clone()}
    torch.manual_seed(seed)
    theirs.resize_token_embeddings(new_num_tokens, **kwargs)
    torch.manual_seed(seed)
    returned = ours.resize_token_embeddings(new_num_tokens, **kwargs)
    assert returned is ours.get_input_embeddings()
    return theirs, ours, old


@pytest.mark.parametrize("new_num_tokens", [VOCAB + 3, VOCAB + 20])  # within Meta's 8 image rows, and past them
def test_resize_grows_like_transformers(tiny_hf_checkpoint, new_num_tokens):
    theirs, ours, old = resized_pair(tiny_hf_checkpoint(), new_num_tokens)
    assert ours.config.text_config.vocab_size == theirs.config.text_config.vocab_size == new_num_tokens
    assert ours.language_model.vocab_size == new_num_tokens
    our_embed, ref_embed = ours.get_input_embeddings().weight, theirs.get_input_embeddings().weight
    our_head, ref_head = ours.get_output_embeddings().weight, theirs.get_output_embeddings().weight
    assert our_head.shape == ref_head.shape == (new_num_tokens, 32)
    # Our table keeps Meta's 8 image rows after the vocabulary (transformers cuts the table to the vocabulary).
    assert our_embed.shape == (new_num_tokens + 8, 32) and ref_embed.shape[0] == new_num_tokens
    # Every row both keep is the old row; every new row is drawn at the old rows' mean (covariance x 1e-9).
    kept = min(VOCAB + 8, new_num_tokens)
    assert torch.equal(our_embed[:kept], ref_embed[:kept]) and torch.equal(our_embed[:kept], old["embed"][:kept])
    assert torch.equal(our_head[:VOCAB], ref_head[:VOCAB]) and torch.equal(our_head[:VOCAB], old["head"])
    for new_rows, table in ((our_embed[VOCAB + 8:], old["embed"]), (ref_embed[VOCAB + 8:], old["embed"]),
                            (our_head[VOCAB:], old["head"]), (ref_head[VOCAB:], old["head"])):
        mean = table.mean(0)
        torch.testing.assert_close(new_rows, mean.expand_as(new_rows), rtol=0, atol=1e-5)
    torch.testing.assert_close(our_head[VOCAB:], ref_head[VOCAB:], rtol=0, atol=1e-5)


def test_resize_without_mean_resizing_draws_from_the_initializer_range(tiny_hf_checkpoint):
    theirs, ours, old = resized_pair(tiny_hf_checkpoint(), VOCAB + 200, mean_resizing=False)
    std = ours.config.text_config.initializer_range
    for new_rows in (ours.get_output_embeddings().weight[VOCAB:], theirs.get_output_embeddings().weight[VOCAB:],
                     ours.get_input_embeddings().weight[VOCAB + 8:], theirs.get_input_embeddings().weight[VOCAB + 8:]):
        # 6400 draws of N(0, std): the sample mean and std are within 5 standard errors (seeded, so fixed).
        assert abs(new_rows.mean().item()) < 5 * std / 80
        assert abs(new_rows.std().item() / std - 1) < 5 / 113


def test_resize_pads_to_a_multiple_and_shrinks_like_transformers(tiny_hf_checkpoint):
    theirs, ours, _ = resized_pair(tiny_hf_checkpoint(), VOCAB + 1, pad_to_multiple_of=64)
    assert ours.config.text_config.vocab_size == theirs.config.text_config.vocab_size == 320
    assert ours.get_output_embeddings().weight.shape == theirs.get_output_embeddings().weight.shape
    theirs, ours, old = resized_pair(tiny_hf_checkpoint(), VOCAB - 10, ours_class=MllamaForCausalLM)
    assert ours.config.vocab_size == theirs.config.vocab_size == VOCAB - 10
    assert torch.equal(ours.get_output_embeddings().weight, theirs.get_output_embeddings().weight)
    assert torch.equal(ours.get_input_embeddings().weight, old["embed"][: VOCAB - 2])
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()  # no size: nothing changes


def test_resize_refuses_to_drop_the_image_token(tiny_hf_checkpoint):
    ours = MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint())
    with pytest.raises(ValueError, match="would remove the <\\|image\\|> token"):
        ours.resize_token_embeddings(VOCAB - 100)


def test_added_token_works_end_to_end(tmp_path):
    """Add a token to the tokenizer, resize, run a prompt with it, save and reload: the same logits
    as transformers doing the same, and our saved checkpoint loads in transformers."""
    from transformers import AutoTokenizer
    from transformers import MllamaForConditionalGeneration as HFModel

    ref_tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    tokenizer = MllamaTokenizer.from_pretrained(TINY_MODEL)
    assert tokenizer.add_tokens(["<|shape_tag|>"]) == ref_tokenizer.add_tokens(["<|shape_tag|>"]) == 1
    assert len(tokenizer) == len(ref_tokenizer)
    text = "<|begin_of_text|>A <|shape_tag|> circle"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == ref_tokenizer(text, add_special_tokens=False)["input_ids"] and len(tokenizer) - 1 in ids
    theirs = HFModel.from_pretrained(TINY_MODEL).eval()
    ours = MllamaForConditionalGeneration.from_pretrained(TINY_MODEL, semantics="transformers")
    torch.manual_seed(0)
    theirs.resize_token_embeddings(len(ref_tokenizer))
    ours.resize_token_embeddings(len(tokenizer))
    inputs = {"input_ids": torch.tensor([ids])}
    with torch.no_grad():
        want, got = theirs(**inputs).logits, ours(**inputs).logits
    assert got.shape == want.shape == (1, len(ids), len(tokenizer))
    assert relative_error(got, want) < TOL
    ours.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(MllamaForConditionalGeneration.from_pretrained(tmp_path, semantics="transformers")(**inputs).logits, got)
        assert relative_error(HFModel.from_pretrained(tmp_path).eval()(**inputs).logits, want) < TOL


# -------------------------------------------------------------------------------- image processors
def _noise_images(seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 80), (300, 900))]


def _reference_image_processor(**kwargs):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(**kwargs)


def _json(processor) -> dict:
    data = json.loads(processor.to_json_string())
    data.pop("image_processor_type", None)
    return data


def _assert_same_images(ours, ref, atol: float) -> None:
    import numpy as np

    assert ours["num_tiles"] == [list(n) for n in ref["num_tiles"]]
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        assert np.array_equal(np.asarray(ours[key]), np.asarray(ref[key])), key
    got, want = np.asarray(ours["pixel_values"]), np.asarray(ref["pixel_values"])
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.abs(got - want).max() <= atol


def _fast_atol(processor) -> float:
    """The fast processor's documented bound: its resize may land 2 levels away from PIL's."""
    table = processor.settings.table()
    return 2 * float((table[:, 1] - table[:, 0]).max()) + 1e-5


IMAGE_PROCESSORS = [("pil", MllamaImageProcessor), ("fast", MllamaImageProcessorFast)]


@pytest.mark.parametrize("kind,ours_class", IMAGE_PROCESSORS, ids=[k for k, _ in IMAGE_PROCESSORS])
def test_image_processor_defaults_and_attributes_match_transformers(kind, ours_class):
    ours, ref = ours_class(), _reference_image_processor()
    assert _json(ours) == _json(ref)
    for name in ("size", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "do_pad", "max_image_tiles",
                 "do_convert_rgb"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert list(ours.image_mean) == list(ref.image_mean) and list(ours.image_std) == list(ref.image_std)
    assert ours.resample == ref.resample
    ours.max_image_tiles = 2
    ours.size = {"height": 28, "width": 28}
    ref = _reference_image_processor(max_image_tiles=2, size={"height": 28, "width": 28})
    assert _json(ours) == _json(ref)
    _assert_same_images(ours(_noise_images(), return_tensors="np"), ref(_noise_images(), return_tensors="np"),
                        1e-5 if kind == "pil" else _fast_atol(ours))


@pytest.mark.parametrize("kind,ours_class", IMAGE_PROCESSORS, ids=[k for k, _ in IMAGE_PROCESSORS])
def test_image_processor_round_trips_through_transformers_files(kind, ours_class, tmp_path):
    from conftest import HUB_PREPROCESSOR_CONFIG

    settings = {k: v for k, v in HUB_PREPROCESSOR_CONFIG.items() if k not in ("image_processor_type", "processor_class")}
    ref = _reference_image_processor(**{**settings, "max_image_tiles": 2})
    ref.save_pretrained(tmp_path / "ref")
    ours = ours_class.from_pretrained(tmp_path / "ref")
    assert _json(ours) == _json(ref)
    assert _json(ours_class.from_dict(ref.to_dict())) == _json(ref)
    ours.save_pretrained(tmp_path / "ours")
    assert _json(type(ref).from_pretrained(tmp_path / "ours")) == _json(ref)
    assert _json(ours_class.from_pretrained(tmp_path / "ours")) == _json(ours)


CALL_OVERRIDES = [
    {},
    {"size": {"height": 42, "width": 42}},
    {"do_rescale": False},
    {"rescale_factor": 1 / 127.5},
    {"do_normalize": False},
    {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1]},
    {"max_image_tiles": 2},
    {"do_resize": True, "do_pad": True, "do_convert_rgb": True},
]


@pytest.mark.parametrize("kind,ours_class", IMAGE_PROCESSORS, ids=[k for k, _ in IMAGE_PROCESSORS])
@pytest.mark.parametrize("overrides", CALL_OVERRIDES, ids=lambda o: ",".join(o) or "defaults")
def test_image_processor_call_overrides_match_transformers(kind, ours_class, overrides):
    ours, ref = ours_class(), _reference_image_processor()
    got = ours(_noise_images(), return_tensors="np", **overrides)
    want = ref(_noise_images(), return_tensors="np", **overrides)
    _assert_same_images(got, want, 1e-5 if kind == "pil" else _fast_atol(ours_class(**overrides)))
    assert _json(ours) == _json(ref)  # a call's settings are for that call only


@pytest.mark.parametrize("kind,ours_class", IMAGE_PROCESSORS, ids=[k for k, _ in IMAGE_PROCESSORS])
@pytest.mark.parametrize("setting", ["do_resize", "do_pad"])
def test_image_processor_refuses_what_transformers_refuses(kind, ours_class, setting):
    import numpy as np

    with pytest.raises(ValueError, match=setting):
        _reference_image_processor(**{setting: False})
    with pytest.raises(ValueError, match=setting):
        ours_class(**{setting: False})
    # In a call, transformers ignores the setting (its output is the default one); we say so instead.
    ref = _reference_image_processor()
    ignored = ref(_noise_images(), return_tensors="np", **{setting: False})["pixel_values"]
    assert np.array_equal(ignored, ref(_noise_images(), return_tensors="np")["pixel_values"])
    with pytest.raises(ValueError, match=setting):
        ours_class()(_noise_images(), **{setting: False})


@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
def test_image_processor_return_types_match_transformers(return_tensors):
    got = MllamaImageProcessor()(_noise_images(), return_tensors=return_tensors)
    want = _reference_image_processor()(_noise_images(), return_tensors=return_tensors)
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}
    fast = MllamaImageProcessorFast()(_noise_images(), return_tensors=return_tensors)
    expected = {"np": {k: type(v) for k, v in want.items()}}.get(
        return_tensors, {k: type(v) for k, v in MllamaImageProcessor()(_noise_images(), return_tensors="pt").items()})
    assert {k: type(v) for k, v in fast.items()} == expected  # torch tensors where it ran unless "np"


@pytest.mark.parametrize("kind,ours_class", IMAGE_PROCESSORS, ids=[k for k, _ in IMAGE_PROCESSORS])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_input_data_format_matches_transformers(kind, ours_class, layout):
    import numpy as np

    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (3, 40, 3), dtype=np.uint8)  # either layout could be meant
    got = ours_class()(array, input_data_format=layout, return_tensors="np")
    want = _reference_image_processor()(array, input_data_format=layout, return_tensors="np")
    _assert_same_images(got, want, 1e-5 if kind == "pil" else _fast_atol(ours_class()))


# -------------------------------------------------------------------------------------- processor
def _pictures(seed: int = 5):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))] for h, w in ((60, 80), (700, 300))]


PROCESSOR_TEXTS = ["<|image|>Short one", "A much longer text with <|image|> one image here"]


def _assert_same_features(ours, ref) -> None:
    import numpy as np

    assert set(ours.keys()) == set(ref.keys())
    for key in ref.keys():
        assert type(ours[key]) is type(ref[key]), key
        got, want = np.asarray(ours[key]), np.asarray(ref[key])
        assert got.shape == want.shape and got.dtype == want.dtype, key
        assert np.allclose(got, want, rtol=0, atol=1e-5), key


@pytest.fixture(scope="module")
def our_processor(mllama_processor_dir):
    from model import MllamaProcessor

    return MllamaProcessor.from_pretrained(mllama_processor_dir)


def test_processor_default_return_type_is_transformers(our_processor, reference_processor):
    from transformers import BatchFeature as HFBatchFeature

    for call in (dict(text=PROCESSOR_TEXTS, images=_pictures(), padding=True), dict(text="Hello there")):
        ours, ref = our_processor(**call), reference_processor(**call)
        assert isinstance(ref, HFBatchFeature)
        _assert_same_features(ours, ref)  # token ids as lists, image fields as numpy arrays


CALL_OPTIONS = {
    "flat_image_options": dict(padding=True, max_image_tiles=2, size={"height": 280, "width": 280},
                               do_normalize=False),
    "rescale_options": dict(padding=True, do_rescale=True, rescale_factor=1 / 127.5,
                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
    "nested": dict(text_kwargs={"padding": True, "padding_side": "left"},
                   images_kwargs={"max_image_tiles": 3, "do_rescale": False}, common_kwargs={"return_tensors": "np"}),
    "nested_and_flat": dict(text_kwargs={"padding": "longest"}, images_kwargs={"max_image_tiles": 1},
                            return_tensors="pt"),
}


@pytest.mark.parametrize("case", sorted(CALL_OPTIONS))
def test_processor_call_options_match_transformers(our_processor, reference_processor, case):
    import numpy as np

    ours = our_processor(text=PROCESSOR_TEXTS, images=_pictures(), **CALL_OPTIONS[case])
    ref = reference_processor(text=PROCESSOR_TEXTS, images=_pictures(), **CALL_OPTIONS[case])
    # transformers sizes cross_attention_mask by the processor's max_image_tiles even when the call
    # asks for fewer (then it no longer fits pixel_values); ours has the call's tile count. The
    # tiles both have are equal, and transformers' extra ones are all 0.
    tiles = np.asarray(ours["pixel_values"]).shape[2]
    assert np.asarray(ours["cross_attention_mask"]).shape[-1] == tiles
    assert not np.asarray(ref["cross_attention_mask"])[..., tiles:].any()
    ref["cross_attention_mask"] = ref["cross_attention_mask"][..., :tiles]
    _assert_same_features(ours, ref)


def test_processor_refuses_an_option_given_twice_or_unknown(our_processor):
    with pytest.raises(ValueError, match="'padding' was given twice"):
        our_processor(text="hi", padding=True, text_kwargs={"padding": True})
    with pytest.raises(TypeError, match="Unexpected arguments \\['paddin'\\]"):
        our_processor(text="hi", paddin=True)


def test_processor_to_json_string_is_transformers(our_processor, reference_processor):
    assert json.loads(our_processor.to_json_string()) == json.loads(reference_processor.to_json_string())


def _chat_call(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, date_string="26 Jul 2024")
    return processor(text=prompt, images=_pictures()[1], add_special_tokens=False, return_tensors="np")


@pytest.mark.parametrize("hub_layout", [False, True], ids=["transformers_layout", "hub_layout"])
def test_processor_save_pretrained_round_trips_in_both_layouts(our_processor, reference_processor,
                                                                mllama_processor_dir, tmp_path, hub_layout):
    import os

    from transformers import AutoProcessor

    from model import MllamaProcessor

    our_processor.save_pretrained(tmp_path / "ours", hub_layout=hub_layout)
    reference_processor.save_pretrained(tmp_path / "ref")
    expected_files = sorted(os.listdir(mllama_processor_dir if hub_layout else tmp_path / "ref"))
    assert sorted(os.listdir(tmp_path / "ours")) == expected_files
    want = _chat_call(reference_processor)
    for loaded in (AutoProcessor.from_pretrained(tmp_path / "ours"), MllamaProcessor.from_pretrained(tmp_path / "ours"),
                   MllamaProcessor.from_pretrained(tmp_path / "ref")):
        assert loaded.chat_template == reference_processor.chat_template
        assert json.loads(loaded.to_json_string()) == json.loads(reference_processor.to_json_string())
        _assert_same_features(_chat_call(loaded), want)


def test_saved_processor_keeps_an_added_token(mllama_processor_dir, tmp_path):
    from transformers import AutoProcessor

    from model import MllamaProcessor

    processor = MllamaProcessor.from_pretrained(mllama_processor_dir)
    processor.tokenizer.add_tokens(["<|shape_tag|>"])
    processor.save_pretrained(tmp_path)
    theirs = AutoProcessor.from_pretrained(tmp_path)
    assert len(theirs.tokenizer) == len(processor.tokenizer) == len(MllamaProcessor.from_pretrained(tmp_path).tokenizer)
    text = "a <|shape_tag|> b"
    assert theirs(text=text)["input_ids"] == processor(text=text)["input_ids"]


def test_tie_word_embeddings_ties_nothing_as_in_transformers(tiny_hf_checkpoint):
    from transformers import MllamaForConditionalGeneration as HFModel

    folder = tiny_hf_checkpoint(text={"tie_word_embeddings": True})
    for model in (HFModel.from_pretrained(folder), MllamaForConditionalGeneration.from_pretrained(folder)):
        assert model.config.text_config.tie_word_embeddings
        head, table = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        assert head.data_ptr() != table.data_ptr() and table.shape[0] == head.shape[0] + 8
