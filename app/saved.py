"""A conversation as the browser keeps it between reloads (plain JSON), and back.

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
