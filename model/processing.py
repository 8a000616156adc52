"""MllamaProcessor: tokenizer + image processor + chat template + cross-attention mask.

Follows transformers' MllamaProcessor: one `<|image|>` token per
image, BOS inserted after any leading image tokens unless the text already has one, and a
cross-attention mask (B, L, N, max_image_tiles) built from the positions of the image tokens.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .batch_feature import BatchFeature, convert_tensors
from .chat_template import ChatTemplateError, load_chat_template, render_chat_template
from .image_io import load_image
from .image_processing import CALL_SETTINGS, MllamaImageProcessor, make_nested_images
from .image_processing_fast import MllamaImageProcessorFast
from .tokenizer import MllamaTokenizer

__all__ = ["BatchFeature", "MllamaProcessor", "get_cross_attention_token_mask",
           "convert_sparse_cross_attention_mask_to_dense", "build_string_from_input"]

# The text options of a call and their defaults; every other option is an image setting.
TEXT_OPTIONS = {"padding": False, "padding_side": None, "truncation": False, "max_length": None,
                "add_special_tokens": True}
IMAGE_OPTIONS = (*CALL_SETTINGS, "input_data_format")


def split_call_options(options: dict[str, Any]) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """(return_tensors, text options, image options) of a processor call, from flat keywords and
    transformers' nested `text_kwargs` / `images_kwargs` / `common_kwargs` dicts."""
    options = dict(options)
    merged: dict[str, Any] = {}
    for group in ("text_kwargs", "images_kwargs", "common_kwargs"):
        nested = options.pop(group, None) or {}
        if not isinstance(nested, dict):
            raise TypeError(f"{group} must be a dict of options, got {type(nested).__name__}")
        for key, value in nested.items():
            if key in options or key in merged:
                raise ValueError(f"{key!r} was given twice (in {group} and elsewhere); give it once")
            merged[key] = value
    merged.update(options)
    return_tensors = merged.pop("return_tensors", None)
    text = {key: merged.pop(key, default) for key, default in TEXT_OPTIONS.items()}
    unknown = sorted(k for k in merged if k not in IMAGE_OPTIONS)
    if unknown:
        raise TypeError(f"Unexpected arguments {unknown}; the processor takes return_tensors, the text options "
                        f"{', '.join(TEXT_OPTIONS)} and the image options {', '.join(IMAGE_OPTIONS)} (flat, or in "
                        "text_kwargs / images_kwargs / common_kwargs)")
    return return_tensors, text, merged


def get_cross_attention_token_mask(input_ids: Sequence[int], image_token_id: int) -> list[list[int]]:
    """[start, end) token span of each image; end -1 = to the end. An image sees the text after it up to
    the next image; a run of adjacent image tokens all see the text that follows the run."""
    locations = [i for i, token in enumerate(input_ids) if token == image_token_id]
    if not locations:
        return []
    if len(locations) == 1:
        return [[locations[0], -1]]
    spans = [[start, end] for start, end in zip(locations[:-1], locations[1:])]
    spans.append([locations[-1], len(input_ids)])
    last_end = spans[-1][1]
    for span in reversed(spans):
        if span[0] == span[1] - 1:  # the next token is an image too: share the group's end
            span[1] = last_end
        last_end = span[1]
    return spans


def convert_sparse_cross_attention_mask_to_dense(spans: list[list[list[int]]], num_tiles: list[list[int]],
                                                 max_num_tiles: int, length: int) -> np.ndarray:
    """(B, length, N, max_num_tiles) int64: 1 where token t may attend to tile k of image n."""
    mask = np.zeros((len(spans), length, max(map(len, spans)), max_num_tiles), dtype=np.int64)
    for b, (sample_spans, sample_tiles) in enumerate(zip(spans, num_tiles)):
        for n, ((start, end), tiles) in enumerate(zip(sample_spans, sample_tiles)):
            end = length if end == -1 else min(end, length)
            mask[b, start:end, n, :tiles] = 1
    return mask


def build_string_from_input(prompt: str, bos_token: str, image_token: str) -> str:
    """Insert BOS after the leading image tokens, unless the prompt already contains BOS."""
    if bos_token in prompt:
        return prompt
    leading = 0
    while prompt.startswith(image_token):
        prompt = prompt[len(image_token):]
        leading += 1
    return f"{image_token * leading}{bos_token}{prompt}"


def message_images(conversation: list[dict]) -> list[Any]:
    """The images of one conversation, in order, decoded from their image/url/path/base64 entries."""
    images = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        for part in content:
            if part.get("type") != "image":
                continue
            sources = [part[key] for key in ("image", "url", "path", "base64") if key in part]
            if len(sources) != 1:
                raise ChatTemplateError("Each image part needs exactly one of 'image', 'url', 'path' or 'base64' "
                                        f"when tokenize=True; got {sorted(k for k in part if k != 'type')}.")
            source = sources[0]
            if "base64" in part:
                source = base64.b64decode(source)
            images.append(source if hasattr(source, "ndim") else load_image(source))
    return images


class MllamaProcessor:
    """Turns text, images and chat messages into the inputs of MllamaForConditionalGeneration."""

    def __init__(self, image_processor: MllamaImageProcessor | MllamaImageProcessorFast, tokenizer: MllamaTokenizer,
                 chat_template: str | None = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = "<|image|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None:
            raise ValueError("The tokenizer has no <|image|> token; this is not a Mllama (Llama 3.2 Vision) tokenizer.")
        self.bos_token = tokenizer.bos_token

    @classmethod
    def from_pretrained(cls, folder: str | Path, use_fast: bool = False, device: str = "cpu") -> MllamaProcessor:
        """Load from a checkpoint folder; `use_fast` picks the torch image processor (running on `device`)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder. Pass the local folder of a Mllama checkpoint.")
        image_processor = (MllamaImageProcessorFast.from_pretrained(folder, device=device) if use_fast
                           else MllamaImageProcessor.from_pretrained(folder))
        return cls(image_processor, MllamaTokenizer.from_pretrained(folder), load_chat_template(folder))

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                "cross_attention_mask"]

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """What processor_config.json holds (the tokenizer and chat template have their own files)."""
        return {"image_processor": self.image_processor.to_dict(), "processor_class": type(self).__name__}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, folder: str | Path, hub_layout: bool = False) -> list[str]:
        """Write the processor's files. Default: what transformers 5 writes (processor_config.json,
        chat_template.jinja, tokenizer.json, tokenizer_config.json); `hub_layout=True`: the official
        checkpoints' files (preprocessor_config.json, chat_template.json, special_tokens_map.json and
        the tokenizer files). Both load here and in transformers."""
        folder = Path(folder)
        files = self.tokenizer.save_pretrained(folder, special_tokens_map=hub_layout)
        if hub_layout:
            config = {**self.image_processor.to_dict(), "processor_class": type(self).__name__}
            files.append(str(folder / "preprocessor_config.json"))
            (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if self.chat_template is not None:
                files.append(str(folder / "chat_template.json"))
                (folder / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template},
                                                                      indent=2) + "\n")
        else:
            files.append(str(folder / "processor_config.json"))
            (folder / "processor_config.json").write_text(self.to_json_string())
            if self.chat_template is not None:
                files.append(str(folder / "chat_template.jinja"))
                (folder / "chat_template.jinja").write_text(self.chat_template)
        return files

    # ------------------------------------------------------------------ __call__
    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None, **options: Any) -> BatchFeature:
        """Tokenize `text` and process `images` (one per `<|image|>`, nested per sample for a batch).

        Options, flat or in transformers' nested `text_kwargs` / `images_kwargs` / `common_kwargs`:
        return_tensors (None: token ids as lists and image fields as the image processor returns them,
        as transformers does; "pt"; "np"), padding, padding_side, truncation, max_length,
        add_special_tokens, and the image processor's settings (max_image_tiles, size, do_rescale,
        rescale_factor, do_normalize, image_mean, image_std, input_data_format, ...). Raises when a
        prompt is longer than max_length (default: the tokenizer's model_max_length) unless
        truncation=True."""
        return_tensors, text_options, image_options = split_call_options(options)
        padding, padding_side, truncation, max_length, add_special_tokens = text_options.values()
        if text is None and images is None:
            raise ValueError("Give text, images or both.")
        data: dict[str, Any] = {}
        nested = None if images is None else make_nested_images(images)
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise TypeError("text must be a string or a non-empty list of strings.")
            texts = [build_string_from_input(t, self.bos_token, self.image_token) for t in texts]
            self._check_image_counts(texts, nested)
            data.update(self.tokenizer(texts, add_special_tokens=add_special_tokens, padding=padding,
                                       truncation=truncation, max_length=max_length, padding_side=padding_side))
            self._check_lengths(data["input_ids"], texts, max_length, truncation)
        if nested is not None:
            data.update(self.image_inputs(nested, data.get("input_ids"), **image_options))
        if return_tensors is not None and text is not None and len({len(ids) for ids in data["input_ids"]}) > 1:
            raise ValueError("The texts tokenize to different lengths, so they cannot be stacked into one tensor. "
                             "Pass padding=True (and padding_side='left' for generation).")
        return convert_tensors(data, return_tensors)

    def image_inputs(self, images: list[list[Any]], input_ids: list[list[int]] | None = None,
                     **image_options: Any) -> dict[str, Any]:
        """pixel_values, aspect_ratio_ids and aspect_ratio_mask of the images (one list per sample),
        and with the samples' token ids also their cross_attention_mask (a numpy array)."""
        data = self.image_processor(images, return_tensors=None, **image_options)
        num_tiles = data.pop("num_tiles")
        if input_ids is not None:
            tiles = image_options.get("max_image_tiles") or self.image_processor.max_image_tiles
            spans = [get_cross_attention_token_mask(ids, self.image_token_id) for ids in input_ids]
            data["cross_attention_mask"] = convert_sparse_cross_attention_mask_to_dense(
                spans, num_tiles, tiles, max(map(len, input_ids)))
        return data

    def _check_image_counts(self, texts: list[str], nested: list[list[Any]] | None) -> None:
        in_text = [t.count(self.image_token) for t in texts]
        if nested is None:
            if any(in_text):
                raise ValueError(f"The text has {in_text} {self.image_token} tokens per sample but no images were "
                                 f"given. Pass one image per {self.image_token}, or remove the tokens.")
            return
        given = [len(sample) for sample in nested]
        if in_text != given:
            raise ValueError(f"Found {in_text} {self.image_token} tokens in the text but {given} images per sample. "
                             f"Each {self.image_token} needs exactly one image: add or remove images or tokens "
                             "(for a batch, pass images as a list with one list per text).")

    def _check_lengths(self, input_ids: list[list[int]], texts: list[str], max_length: int | None,
                       truncation: bool) -> None:
        limit = max_length or self.tokenizer.model_max_length
        longest = max(sum(1 for t in ids if t != self.tokenizer.pad_token_id) for ids in input_ids)
        if longest > limit and not truncation:
            raise ValueError(f"The prompt is {longest} tokens long, more than the {limit} tokens the model can take "
                             "(max_length / the tokenizer's model_max_length). Shorten the text or drop earlier "
                             "turns of the conversation.")
        if truncation:
            cut = [t.count(self.image_token) != ids.count(self.image_token_id) for t, ids in zip(texts, input_ids)]
            if any(cut):
                raise ValueError(f"Truncating to {limit} tokens removed {self.image_token} tokens. Raise max_length "
                                 "or shorten the text after the image.")

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict] | list[list[dict]], add_generation_prompt: bool = False,
                            tokenize: bool = False, return_dict: bool = False, return_tensors: str | None = None,
                            chat_template: str | None = None, padding: bool | str = False,
                            padding_side: str | None = None, truncation: bool = False,
                            max_length: int | None = None, tools: list[dict] | None = None,
                            **template_kwargs: Any) -> str | list[str] | list | BatchFeature:
        """Render the chat template (e.g. date_string=... in template_kwargs); with tokenize=True, also load
        the images named in the messages and run the processor (return_dict=True: the whole BatchFeature)."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("This checkpoint has no chat template (base models have none). Write the prompt "
                             "yourself, e.g. '<|image|>If I had to write a haiku for this one', and call the "
                             "processor directly, or pass chat_template=...")
        batched = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batched else [messages]
        kwargs = {**self.tokenizer.special_tokens_map, **template_kwargs}
        prompts = [render_chat_template(template, conversation, add_generation_prompt, tools=tools, **kwargs)
                   for conversation in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [message_images(conversation) for conversation in conversations]
        # The rendered prompt already starts with BOS: adding special tokens would double it.
        starts_with_bos = self.bos_token is not None and prompts[0].startswith(self.bos_token)
        out = self(text=prompts, images=images if any(images) else None, return_tensors=return_tensors,
                   padding=padding, padding_side=padding_side, truncation=truncation, max_length=max_length,
                   add_special_tokens=not starts_with_bos)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens)
