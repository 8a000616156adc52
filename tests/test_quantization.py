"""Weight-only int8 / int4 quantization of the text decoder (`from_pretrained(quantization=...)`).

The oracle is the same checkpoint loaded unquantized: quantized models must stay within bounds
measured on random configs (tests/quantization_quality.py; the table is in benchmarks/RESULTS.md),
and the shipped tiny model must answer its behaviour questions as well in int8 as in float32.
"""
from __future__ import annotations

import gc
import json
import random
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import model.loading as loading
from model import MllamaForConditionalGeneration
from model.checkpoint import CheckpointError
from model.quantization import (
    QuantizationError,
    check_supported,
    quantized_weight_names,
    stored_bytes,
    tensor_bytes,
)
from quantization_quality import INT4_VARIANTS, measure, write_checkpoint

QUALITY_CASES = INT4_VARIANTS  # base, two_tiles_42px_mha_no_rope_scaling, wide_128: both methods run on them
# Bounds from the measurements in benchmarks/RESULTS.md (3 configs x 3 seeds x picture/text):
# int8: logits error at most 0.016, greedy agreement 0.94 at worst and 1.00 in 16 of 18 cases;
# int4: logits error at most 0.24, mean agreement per seed 0.78 to 0.91 (random weights have
# near-flat logits, so close calls flip easily). Bounds leave ~1.5-2x margin for other CPUs'
# rounding; a broken quantizer (wrong scales, wrong layout) is off by ~100% and fails them.
MAX_LOGITS_ERROR = {"int8": 0.03, "int4": 0.35}
MIN_MEAN_AGREEMENT = {"int8": 0.95, "int4": 0.6}


@pytest.fixture(scope="module")
def quality_checkpoints(tmp_path_factory):
    return {name: write_checkpoint(name, seed=0, folder=tmp_path_factory.mktemp(name)) for name in QUALITY_CASES}


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_logits_and_greedy_tokens_stay_close_to_the_unquantized_model(quality_checkpoints, quantization):
    results = {}
    for name, (folder, prompts) in quality_checkpoints.items():
        reference = MllamaForConditionalGeneration.from_pretrained(folder)
        quantized = MllamaForConditionalGeneration.from_pretrained(folder, quantization=quantization)
        for kind, inputs in prompts.items():
            results[f"{name}/{kind}"] = measure(reference, quantized, inputs)
    too_far = {case: round(q.logits_error, 4) for case, q in results.items()
               if q.logits_error > MAX_LOGITS_ERROR[quantization]}
    assert not too_far, f"{quantization}: relative logits error above {MAX_LOGITS_ERROR[quantization]}: {too_far}"
    mean = sum(q.agreement for q in results.values()) / len(results)
    assert mean >= MIN_MEAN_AGREEMENT[quantization], (
        f"{quantization}: greedy tokens agree in {mean:.0%} of steps (bound {MIN_MEAN_AGREEMENT[quantization]:.0%}): "
        f"{ {case: q.agreement for case, q in results.items()} }")


@pytest.mark.parametrize("quantization, share", [("int8", 0.27), ("int4", 0.16)])
def test_only_the_text_decoder_linears_are_quantized(quality_checkpoints, quantization, share):
    """Decoder linears become torchao tensors of about a quarter (int8) or an eighth (int4) of their
    float32 bytes; everything else (vision tower, projector, embeddings, lm_head, norms) is the
    checkpoint's tensor, bit for bit."""
    folder, _ = quality_checkpoints["wide_128"]
    reference = MllamaForConditionalGeneration.from_pretrained(folder)
    quantized = MllamaForConditionalGeneration.from_pretrained(folder, quantization=quantization)
    names = set(quantized_weight_names(quantized))
    assert len(names) == 4 * 7  # 4 decoder layers (1 cross-attention), each q, k, v, o, gate, up, down
    assert quantized.quantization == quantization
    for name, tensor in quantized.state_dict().items():
        if name in names:
            assert type(tensor) is not torch.Tensor, f"{name} was not quantized"
        else:
            assert torch.equal(tensor, reference.state_dict()[name]), f"{name} changed"
    linears = [quantized.get_parameter(n) for n in names]
    full = sum(reference.get_parameter(n).numel() * 4 for n in names)
    stored = sum(tensor_bytes(p) for p in linears)
    assert stored <= share * full, f"{quantization} decoder linears take {stored / full:.0%} of their float32 bytes"


def test_loading_quantized_never_holds_the_full_precision_decoder(tiny_hf_checkpoint, monkeypatch):
    """Each decoder linear is quantized as soon as it is read: the full-precision decoder never
    exists at once. Whenever the loader reads a decoder weight, the probe counts the distinct
    float32 tensors of decoder-linear shapes alive in the process (a count, not a timing or a
    memory figure that varies by machine). Each reading thread holds one weight and, while
    torchao quantizes it, working copies of it: measured 4 with 4 threads, bound at 3 per
    thread. The decoder has 56 such weights; after an unquantized load the probe sees all 56."""
    PER_THREAD = 3
    # Shapes no other tensor of this model has (hidden 40, MLP 88), so the probe counts only these.
    folder = tiny_hf_checkpoint(text=dict(hidden_size=40, intermediate_size=88, num_hidden_layers=8,
                                          cross_attention_layers=[3]), seed=5)
    with torch.device("meta"):
        skeleton = MllamaForConditionalGeneration(_config(folder))
    shapes = {tuple(skeleton.get_parameter(name).shape) for name in quantized_weight_names(skeleton)}

    probing = threading.Lock()

    def full_precision_alive() -> int:
        # One snapshot at a time: a snapshot (gc's list of every object) keeps what it lists alive.
        with probing:
            return len({o.untyped_storage().data_ptr() for o in gc.get_objects()
                        if type(o) in (torch.Tensor, torch.nn.Parameter) and o.device.type == "cpu"
                        and o.dtype == torch.float32 and tuple(o.shape) in shapes})

    def load(quantization) -> tuple[int, int]:
        peak = [0]
        real_open = loading.safe_open

        class CountingReader:
            def __init__(self, *args, **kwargs):
                self.reader = real_open(*args, **kwargs)

            def __enter__(self):
                self.file = self.reader.__enter__()
                return self

            def __exit__(self, *exc):
                return self.reader.__exit__(*exc)

            def get_tensor(self, key):
                tensor = self.file.get_tensor(key)
                if quantization and tuple(tensor.shape) in shapes:
                    peak[0] = max(peak[0], full_precision_alive())
                return tensor

        monkeypatch.setattr(loading, "safe_open", CountingReader)
        model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, quantization=quantization)
        monkeypatch.undo()
        left = full_precision_alive()
        del model
        return peak[0], left

    assert full_precision_alive() == 0
    peak, left = load("int8")
    assert peak <= PER_THREAD * loading._READ_THREADS and left == 0, (
        f"{peak} full-precision decoder weights alive at once while loading int8 (bound: {PER_THREAD} per reading "
        f"thread, {loading._READ_THREADS} threads); {left} still alive after loading")
    _, left = load(None)
    assert left == 8 * 7, f"the probe must see the weights an unquantized model keeps: {left} of 56"


def _logits(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits


def test_device_map_planning_counts_quantized_bytes(quality_checkpoints, tmp_path):
    """With a memory budget that holds the int8 model but not the float32 one, device_map='auto'
    keeps every weight in memory (planned at int8 sizes), and answers as the resident model does."""
    folder, prompts = quality_checkpoints["wide_128"]
    resident = MllamaForConditionalGeneration.from_pretrained(folder, quantization="int8")
    full = stored_bytes(MllamaForConditionalGeneration.from_pretrained(folder))
    budget = (stored_bytes(resident) + full) // 2
    planned = MllamaForConditionalGeneration.from_pretrained(
        folder, quantization="int8", device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path)
    assert not getattr(planned, "hf_device_map", None), f"offloaded: {planned.hf_device_map}"
    assert torch.equal(_logits(planned, prompts["picture"]), _logits(resident, prompts["picture"]))


def test_quantized_decoder_runs_under_accelerate_hooks_next_to_offloaded_layers(quality_checkpoints, tmp_path):
    """A device_map that sends the (unquantized) vision tower to disk dispatches the model through
    accelerate's hooks; the quantized decoder stays resident and the logits do not change."""
    folder, prompts = quality_checkpoints["base"]
    resident = MllamaForConditionalGeneration.from_pretrained(folder, quantization="int8")
    dispatched = MllamaForConditionalGeneration.from_pretrained(
        folder, quantization="int8", device_map={"": "cpu", "vision_model": "disk"}, offload_folder=tmp_path)
    assert dispatched.hf_device_map["vision_model"] == "disk"
    torch.testing.assert_close(_logits(dispatched, prompts["picture"]), _logits(resident, prompts["picture"]),
                               rtol=1e-5, atol=1e-5)


def test_quantized_weights_offloaded_to_disk_are_refused(quality_checkpoints, tmp_path):
    folder, _ = quality_checkpoints["base"]
    with pytest.raises(QuantizationError, match="must stay on the device that runs them"):
        MllamaForConditionalGeneration.from_pretrained(
            folder, quantization="int8", device_map={"": "cpu", "language_model.model.layers.2": "disk"},
            offload_folder=tmp_path)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_compiled_decode_of_a_quantized_model_gives_the_eager_tokens(quality_checkpoints, caplog, quantization):
    folder, prompts = quality_checkpoints["base"]
    model = MllamaForConditionalGeneration.from_pretrained(folder, quantization=quantization)
    with caplog.at_level("WARNING"):
        for inputs in prompts.values():
            kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=[])
            assert torch.equal(model.generate(**inputs, compile=True, **kwargs), model.generate(**inputs, **kwargs))
    assert not [r for r in caplog.records if "compile failed" in r.getMessage()], "the step fell back to eager"


def test_int4_on_layers_its_kernel_cannot_pack_says_to_use_int8(tiny_hf_checkpoint):
    folder = tiny_hf_checkpoint(text=dict(num_key_value_heads=1))  # k/v projections: 8 output channels
    with pytest.raises(QuantizationError, match="use quantization='int8'"):
        MllamaForConditionalGeneration.from_pretrained(folder, quantization="int4")


def test_int4_on_a_device_torchao_has_no_int4_kernel_for_says_what_to_use(quality_checkpoints):
    folder, _ = quality_checkpoints["base"]
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(_config(folder))
    names = quantized_weight_names(model)
    with pytest.raises(QuantizationError, match="not on mps: use quantization='int8'"):
        check_supported("int4", model, dict.fromkeys(names, torch.device("mps")), torch.float16)
    check_supported("int8", model, dict.fromkeys(names, torch.device("mps")), torch.float16)


def _config(folder):
    from model import MllamaConfig

    return MllamaConfig.from_pretrained(str(folder))


@pytest.mark.parametrize("dtype", [torch.float64])
def test_quantizing_a_dtype_torchao_cannot_take_is_refused(quality_checkpoints, dtype):
    folder, _ = quality_checkpoints["base"]
    with pytest.raises(QuantizationError, match="pass dtype=torch.bfloat16"):
        MllamaForConditionalGeneration.from_pretrained(folder, quantization="int8", dtype=dtype)


def test_unknown_quantization_is_refused(quality_checkpoints):
    folder, _ = quality_checkpoints["base"]
    with pytest.raises(ValueError, match="'int8' or 'int4'"):
        MllamaForConditionalGeneration.from_pretrained(folder, quantization="nf4")


def test_a_checkpoint_with_a_quantization_config_is_refused_with_what_to_load(quality_checkpoints, tmp_path):
    folder, _ = quality_checkpoints["base"]
    copy = shutil.copytree(folder, tmp_path / "bnb")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (copy / "config.json").write_text(json.dumps(config))
    for quantization in (None, "int4"):
        with pytest.raises(CheckpointError, match=r"already-quantized.*bitsandbytes.*load the original checkpoint"):
            MllamaForConditionalGeneration.from_pretrained(copy, quantization=quantization)


def test_a_checkpoint_holding_quantized_tensors_is_refused_with_what_to_load(quality_checkpoints, tmp_path):
    folder, _ = quality_checkpoints["base"]
    copy = shutil.copytree(folder, tmp_path / "int8")
    state = load_file(copy / "model.safetensors")
    key = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[key] = state[key].to(torch.int8)
    state[key.replace(".weight", ".SCB")] = torch.ones(state[key].shape[0])
    save_file(state, copy / "model.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"already-quantized.*quantized tensors.*quantization='int8' or 'int4'"):
        MllamaForConditionalGeneration.from_pretrained(copy, quantization="int8")


def test_saving_a_quantized_model_is_refused(quality_checkpoints, tmp_path):
    folder, _ = quality_checkpoints["base"]
    model = MllamaForConditionalGeneration.from_pretrained(folder, quantization="int8")
    with pytest.raises(ValueError, match="save the original checkpoint"):
        model.save_pretrained(tmp_path / "out")


# --- the shipped tiny model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_int8():
    from test_tiny_model import ASSET

    from model import MllamaProcessor

    return (MllamaForConditionalGeneration.from_pretrained(ASSET, quantization="int8"),
            MllamaProcessor.from_pretrained(ASSET))


@pytest.mark.parametrize("task, bar", [("color", 0.97), ("shape", 0.90), ("count", 0.90), ("describe", 0.85)])
def test_tiny_model_in_int8_keeps_its_behaviour_accuracy(tiny_int8, task, bar):
    """The bars of test_tiny_model.py, on the same 200 fresh pictures."""
    from test_tiny_model import SEED, accuracy

    from scripts import synthetic

    rng = random.Random(SEED)
    samples = [synthetic.make_sample(rng, parity=1) for _ in range(200)]
    score, wrong = accuracy(tiny_int8, samples, task)
    assert score >= bar, f"int8 {task}: {score:.1%} right on 200 fresh pictures (bar {bar:.0%}); wrong: {wrong[:10]}"


# --- the engine and the app -----------------------------------------------------------------------

def test_fixed_shape_engine_on_a_quantized_model_answers_like_generate_alone(tmp_path, caplog):
    """The engine's compiled, fixed-shape decode over int8 weights gives, for every conversation,
    what generate() alone gives on the same quantized model."""
    from engine_checkpoint import write_engine_checkpoint
    from serving_oracle import Oracle
    from test_engine import check_mix

    from serving import ChatEngine

    engine = ChatEngine.load(str(write_engine_checkpoint(tmp_path)), max_batch=1, queue_size=32, context_tokens=256,
                             compile=True, quantization="int8")
    try:
        assert engine.runner.static and engine.info.quantization == "int8"
        with caplog.at_level("WARNING"):
            check_mix(engine, Oracle(engine.model, engine.processor), seed=3, count=3)
        assert not [r for r in caplog.records if "compile failed" in r.getMessage()], "decoding fell back to eager"
    finally:
        engine.close()


def test_quantize_flag_and_variable_choose_the_weights():
    from app.config import FlagError, parse_config

    assert parse_config(["--model", "x/y"], {}).quantize is None
    assert parse_config(["--model", "x/y", "--quantize", "int4"], {}).quantize == "int4"
    assert parse_config(["--model", "x/y"], {"MLLAMA_QUANTIZE": "int8"}).quantize == "int8"
    with pytest.raises(FlagError, match="use int8 or int4"):
        parse_config(["--model", "x/y", "--quantize", "8bit"], {})


def test_the_page_header_says_the_model_runs_quantized():
    from test_tiny_model import ASSET

    from app.config import parse_config
    from app.ui import build_demo
    from serving import ChatEngine

    engine = ChatEngine.load(str(ASSET), max_batch=1, queue_size=1, context_tokens=256, quantization="int8")
    try:
        demo = build_demo(engine, parse_config(["--model", str(ASSET), "--quantize", "int8"], {}))
        headers = [b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) is None
                   and isinstance(getattr(b, "value", None), str) and b.value.startswith("# Llama 3.2 Vision chat")]
        assert headers and headers[0].endswith("· int8 weights"), headers
    finally:
        engine.close()
