"""`pipeline("image-text-to-text", model=...)`: processor + model + generate in one call."""
from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image

from .mllama import MllamaForConditionalGeneration
from .processing import MllamaProcessor

TASK = "image-text-to-text"


class ImageTextToTextPipeline:
    """`pipe(images=..., text=...)` or `pipe(text=messages)` -> [{"generated_text": ...}].

    Plain text with images and no `<|image|>` token is wrapped into one user turn with the images
    first and rendered with the checkpoint's chat template (Instruct models); a text that holds
    its own `<|image|>` tokens is used as the prompt as it is (base models). Chat messages come
    back with the assistant's reply appended, like transformers does.
    """

    def __init__(self, model: MllamaForConditionalGeneration, processor: MllamaProcessor) -> None:
        self.model = model
        self.processor = processor

    def __call__(self, images: Any = None, text: Any = None, *, max_new_tokens: int = 256,
                 return_full_text: bool = True, generate_kwargs: dict | None = None,
                 **more_generate_kwargs: Any) -> list[dict] | list[list[dict]]:
        """One result per prompt; a list of conversations gives one list per conversation, as
        transformers does. `pipe("What does this image show?", "cat.png")` (text first, as the
        model card writes it) works too: the argument that is a picture is taken as the picture."""
        kwargs = {**(generate_kwargs or {}), **more_generate_kwargs}
        if _is_picture(text) and not _is_picture(images):
            images, text = text, images
        if text is None and _is_chat(images):
            images, text = None, images  # pipe(messages)
        if text is None:
            raise ValueError('pass text=... (a prompt string or a list of chat messages), e.g. pipe(images="cat.png", text="What is this?")')
        if _is_chat(text):
            return [self._chat(text, max_new_tokens, return_full_text, kwargs)]
        if isinstance(text, (list, tuple)) and text and all(_is_chat(t) for t in text):
            return [[self._chat(conversation, max_new_tokens, return_full_text, kwargs)] for conversation in text]
        images = [images] if images is not None and not isinstance(images, (list, tuple)) else images
        return [self._prompt(images, text, max_new_tokens, return_full_text, kwargs)]

    def _chat(self, messages: list[dict], max_new_tokens: int, full: bool, kwargs: dict) -> dict:
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        reply = self._generate(inputs, max_new_tokens, kwargs)
        answer = {"role": "assistant", "content": reply}
        return {"input_text": messages, "generated_text": [*messages, answer] if full else reply}

    def _prompt(self, images: list | None, text: str, max_new_tokens: int, full: bool, kwargs: dict) -> dict:
        if images and self.processor.image_token not in text and self.processor.chat_template:
            content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
            result = self._chat([{"role": "user", "content": content}], max_new_tokens, False, kwargs)
            reply = result["generated_text"]
        else:
            inputs = self.processor(images=images or None, text=text, return_tensors="pt")
            reply = self._generate(inputs, max_new_tokens, kwargs)
        return {"input_text": text, "generated_text": text + reply if full else reply}

    def _generate(self, inputs, max_new_tokens: int, kwargs: dict) -> str:
        inputs = inputs.to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new_tokens, skip_special_tokens=True)


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _is_picture(value: Any) -> bool:
    """A PIL image, an existing file, or an http(s)/data URL of an image."""
    if isinstance(value, Image.Image):
        return True
    if isinstance(value, str):
        return value.startswith(("http://", "https://", "data:image/")) or os.path.isfile(value)
    return False


def pipeline(task: str, model: Any, processor: MllamaProcessor | None = None, *, dtype: Any = "auto",
             device_map: Any = None, **model_kwargs: Any) -> ImageTextToTextPipeline:
    """Build the pipeline from a checkpoint folder or hub id (or an already loaded model)."""
    if task != TASK:
        raise ValueError(f"only the {TASK!r} task is available, got {task!r}")
    if isinstance(model, MllamaForConditionalGeneration):
        if processor is None:
            raise ValueError("pass processor=... together with an already loaded model")
        return ImageTextToTextPipeline(model, processor)
    loaded = MllamaForConditionalGeneration.from_pretrained(model, dtype=dtype, device_map=device_map, **model_kwargs)
    if processor is None:
        from .hub import CHECKPOINT_FILES, resolve_checkpoint

        processor = MllamaProcessor.from_pretrained(resolve_checkpoint(model, allow_patterns=CHECKPOINT_FILES))
    return ImageTextToTextPipeline(loaded, processor)
