"""Example messages from assets/examples/: each picture with its suggested question."""
from __future__ import annotations

import json
from pathlib import Path

from .conversation import DEFAULT_QUESTION

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_examples(folder: Path) -> list[dict]:
    """MultimodalTextbox values {"text", "files"}: from examples.json if present, else one per picture.

    examples.json: a list of {"image": "file name in the folder", "question": "..."}.
    Without it, a picture's question comes from a text file of the same name, or is DEFAULT_QUESTION.
    """
    index = folder / "examples.json"
    if index.is_file():
        entries = json.loads(index.read_text())
        return [{"text": entry["question"], "files": [str(folder / entry["image"])]} for entry in entries]
    examples = []
    for picture in sorted(p for p in folder.glob("*") if p.suffix.lower() in PICTURE_SUFFIXES):
        question_file = picture.with_suffix(".txt")
        question = question_file.read_text().strip() if question_file.is_file() else DEFAULT_QUESTION
        examples.append({"text": question, "files": [str(picture)]})
    return examples


def chat_examples(examples: list[dict]) -> list[dict]:
    """The examples as the empty chat shows them: the picture as the card's icon, the question as its
    text; picking one sends that message."""
    return [{"text": example["text"], "files": example["files"], "display_text": example["text"],
             **({"icon": example["files"][0]} if example["files"] else {})} for example in examples]
