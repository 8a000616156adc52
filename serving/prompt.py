"""The tokens of a conversation: the chat template's control tokens, and whatever people wrote as
ordinary text.

Rendering a chat template gives one string, and tokenizing it turns every spelling of a special
token into that token, so a user who types `<|eot_id|><|start_header_id|>assistant...` would end
their turn and forge the assistant's. Here the texts of the messages are tokenized as plain text
(their special-token spellings become ordinary tokens, as any other characters) and only the
template's own text yields control tokens. Conversations without such spellings take the
processor's usual path, token for token what `apply_chat_template` gives.
"""
from __future__ import annotations

import copy
import re
from datetime import datetime

import torch
from tokenizers import Tokenizer

from model.batch_feature import convert_tensors
from model.processing import MllamaProcessor, message_images

from .errors import EngineError

_MARK = "\ue000{}\ue001"  # private-use characters: the template never writes them
_MARKS = re.compile("\ue000(\\d+)\ue001")


class PromptEncoder:
    def __init__(self, processor: MllamaProcessor) -> None:
        self.processor = processor
        self._tokenizer = processor.tokenizer.backend_tokenizer
        self._plain = Tokenizer.from_str(self._tokenizer.to_str())
        self._plain.encode_special_tokens = True  # special-token spellings are text here
        self.control_spellings = [t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special]

    def encode(self, messages: list[dict]) -> dict[str, torch.Tensor]:
        """input_ids (1, L) and, with a picture, its pixel_values, aspect_ratio_ids,
        aspect_ratio_mask and cross_attention_mask, as the model takes them."""
        texts = [text for _, text in message_texts(messages)]
        if not any(spelling in text for text in texts for spelling in self.control_spellings):
            inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt")
            return {k: v for k, v in dict(inputs).items() if torch.is_tensor(v) and k != "attention_mask"}
        ids = self._token_ids(messages, texts)
        data: dict = {"input_ids": [ids]}
        images = message_images(messages)
        if images:
            data.update(self.processor.image_inputs([images], [ids]))
        return dict(convert_tensors(data, "pt"))

    def _token_ids(self, messages: list[dict], texts: list[str]) -> list[int]:
        """Render the template twice, with the texts and with numbered marks in their place; the
        marked rendering tells which characters of the real one are the template's."""
        date = datetime.now().strftime("%d %b %Y")  # both renderings must carry the same date
        rendered = self.processor.apply_chat_template(messages, add_generation_prompt=True, date_string=date)
        marked = self.processor.apply_chat_template(_with_marks(messages), add_generation_prompt=True,
                                                    date_string=date)
        parts = _MARKS.split(marked)  # template, index, template, index, ..., template
        pieces, at = [(parts[0], False)], len(parts[0])
        if not rendered.startswith(parts[0]):
            raise EngineError("The chat template renders this conversation in a way the server cannot follow.")
        for index, after in zip(parts[1::2], parts[2::2]):
            text = texts[int(index)]
            # Templates may trim a message; the text as rendered is the one followed by the template.
            for candidate in dict.fromkeys((text, text.strip(), text.lstrip(), text.rstrip())):
                if rendered.startswith(candidate, at) and rendered.startswith(after, at + len(candidate)):
                    break
            else:
                raise EngineError("The chat template renders this conversation in a way the server cannot follow.")
            pieces += [(candidate, True), (after, False)]
            at += len(candidate) + len(after)
        ids: list[int] = []
        for piece, is_text in pieces:
            if piece:
                ids += (self._plain if is_text else self._tokenizer).encode(piece, add_special_tokens=False).ids
        return ids


def message_texts(messages: list[dict]) -> list[tuple[tuple, str]]:
    """(where, text) of every text in the messages, in order."""
    found = []
    for m, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            found.append(((m, None), content))
        elif isinstance(content, list):
            for p, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    found.append(((m, p), part["text"]))
    return found


def _with_marks(messages: list[dict]) -> list[dict]:
    marked = copy.copy(messages)
    for index, ((m, p), _) in enumerate(message_texts(messages)):
        message = marked[m] = dict(marked[m])
        if p is None:
            message["content"] = _MARK.format(index)
        else:
            message["content"] = list(message["content"])
            message["content"][p] = {**message["content"][p], "text": _MARK.format(index)}
    return marked
