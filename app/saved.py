"""A conversation and the generation settings as the browser keeps them between reloads (plain
JSON), and back.

The browser's copy is encrypted by Gradio, but it still comes from outside: a restored picture must
be a file that this server could have handed out (an upload or an example); anything else, or a
picture deleted since, is left out and the question is kept.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from serving import ReplyStats

from .conversation import Conversation, Turn, interrupted

PICTURE_GONE = "(The picture sent with this question is no longer on the server.)"
_STATS_FIELDS = {field.name for field in fields(ReplyStats)}


def saved(conversation: Conversation) -> dict:
    """The browser's copy of `conversation`."""
    return {"turns": [{"question": turn.question, "picture": turn.picture, "answer": turn.answer,
                       "stats": asdict(turn.stats) if turn.stats is not None else None, "error": turn.error}
                      for turn in conversation.turns]}


def restored(data: Any, picture_folders: list[Path]) -> Conversation:
    """The conversation in `data` (from `saved`); pictures outside `picture_folders` or gone are left
    out. An answer that was still running when the page went away is closed as interrupted."""
    if not isinstance(data, dict) or not isinstance(data.get("turns"), list):
        return Conversation()
    folders = [folder.resolve() for folder in picture_folders]
    turns = []
    for item in data["turns"]:
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            continue
        picture, question = _picture(item.get("picture"), folders), item["question"]
        if item.get("picture") is not None and picture is None:
            question = f"{question}\n\n{PICTURE_GONE}"
        stats = item.get("stats")
        turns.append(Turn(question=question, picture=picture, answer=str(item.get("answer") or ""),
                          stats=ReplyStats(**stats) if isinstance(stats, dict) and set(stats) == _STATS_FIELDS
                          else None,
                          error=item["error"] if isinstance(item.get("error"), str) else None))
    return interrupted(Conversation(turns))


def _picture(path: Any, folders: list[Path]) -> str | None:
    if not isinstance(path, str) or not path:
        return None
    resolved = Path(path).resolve()
    inside = any(resolved.is_relative_to(folder) for folder in folders)
    return str(resolved) if inside and resolved.is_file() else None


def saved_settings(names: list[str], values: list[Any]) -> dict:
    """The browser's copy of the generation settings: each value by its name."""
    return dict(zip(names, values))


def restored_settings(data: Any, defaults: dict[str, Any], bounds: dict[str, tuple[float, float]]) -> list[Any]:
    """The settings in `data` (from `saved_settings`), in the order of `defaults`; a value that is
    missing, of the wrong kind or outside its `bounds` (the server may have been started with a
    smaller limit since) is its default."""
    data = data if isinstance(data, dict) else {}
    values = []
    for name, default in defaults.items():
        value = data.get(name)
        if isinstance(default, str):
            values.append(value if isinstance(value, str) else default)
            continue
        low, high = bounds.get(name, (float("-inf"), float("inf")))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        values.append(value if number and low <= value <= high else default)
    return values
