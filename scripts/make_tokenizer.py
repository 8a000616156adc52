"""Build Llama-3-style byte-level BPE tokenizers and write them in the Hub's checkpoint layout.

Two flavours, both with the Llama 3.2 Vision special-token names:
- `build_llama3_tokenizer(corpus)`: the REAL ids. Ordinary tokens fill ids 0..127999 (a small
  trained vocabulary padded with unreachable filler entries), then the 256 reserved/special
  tokens at 128000..128255 and `<|image|>` at 128256, like meta-llama/Llama-3.2-11B-Vision-Instruct.
- `build_small_tokenizer(corpus, vocab_size)`: a small trained vocabulary, the same special
  names right after it (for training a tiny model with a small embedding table).

`write_tokenizer_files(tokenizer, folder, chat_template)` writes tokenizer.json,
tokenizer_config.json, special_tokens_map.json and chat_template.json.

Usage: python scripts/make_tokenizer.py OUT_DIR [--small VOCAB] [--corpus FILE] [--chat-template FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS_BASE, EOT, PAD, IMAGE = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|image|>")
NUM_ORDINARY_REAL = 128000
# Llama 3's pre-tokenizer split (tiktoken's cl100k-style pattern).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")

DEFAULT_CORPUS = (
    "What color is the shape? The shape is red. What shape is this? It is a circle.",
    "How many shapes are there? There are three shapes: a square, a triangle and a circle.",
    "Describe the image. A green square and a blue triangle on a light background.",
    "If I had to write a haiku for this one, it would be about the sea and the sky.",
    "Describe this image in two sentences. The picture shows a cat sleeping on a sofa.",
    "Hello! How are you today? I'm fine, thanks. Let's talk about images, colors and numbers 0123456789.",
    "yellow purple orange red green blue circle square triangle one two three shapes image picture",
)


def special_tokens() -> list[str]:
    """The 256 special tokens of ids 128000..128255 in order, then `<|image|>`."""
    named = [BOS, EOS_BASE, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", PAD,
             "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", EOT, "<|python_tag|>"]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(named))]
    return named + reserved + [IMAGE]


def _train_bpe(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return tokenizer


def _with_specials(trained: Tokenizer, num_ordinary: int) -> Tokenizer:
    """Pad the vocabulary to `num_ordinary` entries, then append the specials and the BOS template."""
    state = json.loads(trained.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    if len(vocab) > num_ordinary:
        raise ValueError(f"trained vocabulary has {len(vocab)} entries, more than the {num_ordinary} asked for")
    # Filler entries are never produced: no merge builds them, and '\u0100'-prefixed strings of
    # this shape cannot come out of a merge of the trained pairs either.
    for i in range(len(vocab), num_ordinary):
        vocab[f"\u0100filler{i}\u0100"] = i
    state["model"]["vocab"] = vocab
    tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()])
    bos_id = tokenizer.token_to_id(BOS)
    if bos_id != num_ordinary:
        raise AssertionError(f"{BOS} landed at id {bos_id}, expected {num_ordinary}")
    # The Hub's Llama 3 tokenizer.json adds BOS in its post-processor (llama-cookbook issue #826).
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def build_llama3_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, trained_size: int = 1000) -> Tokenizer:
    """A tokenizer with the real Llama 3.2 Vision special-token ids (128000..128256)."""
    return _with_specials(_train_bpe(corpus, trained_size), NUM_ORDINARY_REAL)


def build_small_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 512) -> Tokenizer:
    """A small vocabulary (`vocab_size` ordinary tokens) followed by the same 257 special names."""
    return _with_specials(_train_bpe(corpus, vocab_size), vocab_size)


def write_tokenizer_files(tokenizer: Tokenizer, folder: str | Path, chat_template: str | None = None,
                          model_max_length: int = 131072) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (and chat_template.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": True} for t in special_tokens()}
    special_map = {"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}
    config = {"added_tokens_decoder": added, **special_map, "clean_up_tokenization_spaces": True,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": model_max_length,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--small", type=int, metavar="VOCAB", help="small vocabulary of VOCAB ordinary tokens")
    parser.add_argument("--corpus", help="text file, one document per line (default: a built-in sample)")
    parser.add_argument("--chat-template", help="chat_template.json to copy into the folder")
    args = parser.parse_args()
    corpus = Path(args.corpus).read_text().splitlines() if args.corpus else DEFAULT_CORPUS
    tokenizer = build_small_tokenizer(corpus, args.small) if args.small else build_llama3_tokenizer(corpus)
    template = json.loads(Path(args.chat_template).read_text())["chat_template"] if args.chat_template else None
    write_tokenizer_files(tokenizer, args.out_dir, template)


if __name__ == "__main__":
    main()
