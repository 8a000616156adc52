"""A complete random checkpoint folder the engine can load: a small transformers Mllama saved
with save_pretrained, a small byte-level BPE tokenizer with the Llama 3 special tokens, the
official Instruct chat template and a preprocessor config whose tile size fits the model."""
from __future__ import annotations

import json
from pathlib import Path

from reference import Variant, build_hf_model, save_hf

ORDINARY = 300
VOCAB = ORDINARY + 256  # + the 256 reserved/special tokens; <|image|> comes right after
TEMPLATE = Path(__file__).parent / "data" / "chat_template.json"


def write_engine_checkpoint(folder: Path, seed: int = 0) -> Path:
    from scripts.make_tokenizer import build_small_tokenizer, write_tokenizer_files

    variant = Variant("engine", text=dict(vocab_size=VOCAB, bos_token_id=ORDINARY, eos_token_id=ORDINARY + 9,
                                          pad_token_id=ORDINARY + 4), image_token=VOCAB)
    hf = build_hf_model(variant, seed=seed)
    save_hf(hf, folder)
    tokenizer = build_small_tokenizer(vocab_size=ORDINARY)
    assert tokenizer.token_to_id("<|image|>") == VOCAB
    write_tokenizer_files(tokenizer, folder, json.loads(TEMPLATE.read_text())["chat_template"])
    size = hf.config.vision_config.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "max_image_tiles": hf.config.vision_config.max_num_tiles, "resample": 2,
        "rescale_factor": 1 / 255, "size": {"height": size, "width": size},
        "image_processor_type": "MllamaImageProcessor",
    }))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ORDINARY, "eos_token_id": [ORDINARY + 1, ORDINARY + 8, ORDINARY + 9],
        "pad_token_id": ORDINARY + 4, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
    }))
    return folder


def write_talkative_checkpoint(folder: Path) -> Path:
    """The same checkpoint without an end token: every answer runs to its token budget."""
    write_engine_checkpoint(folder)
    generation = folder / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "eos_token_id": []}))
    return folder
