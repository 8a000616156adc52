"""What the page shows of a conversation: Gradio 6 chat messages and the picture card's text.

Only presentation: which turns the model sees is decided in conversation.py.
"""
from __future__ import annotations

from html import escape
from typing import Any

from .conversation import Conversation, Turn, figures

OUT_OF_VIEW = ('<span class="oov-badge" title="The model no longer sees this: a newer picture started a new thread">'
               'out of view</span>')
NEW_THREAD = ('<span class="thread-badge" title="The model sees this picture and the messages after it">'
              'new picture · new thread</span>')

POLICY = ("Llama 3.2 Vision looks at **one picture at a time**. A message with a new picture starts a new "
          "thread: the model then sees only that picture and the messages after it. Earlier messages stay "
          "here, marked *out of view*. Questions without a picture continue the current thread.")


def chat_messages(conversation: Conversation) -> list[dict]:
    """The Chatbot value: per turn a user message, then the answer and a line of figures."""
    messages: list[dict] = []
    for index, turn in enumerate(conversation.turns):
        in_view = conversation.in_view(index)
        messages.append(_question(turn, in_view, starts_thread=index > 0 and turn.picture is not None))
        messages.extend(_answer(turn, in_view))
    return messages


def _question(turn: Turn, in_view: bool, starts_thread: bool) -> dict:
    content: list[Any] = []
    if turn.picture is not None:
        content.append({"path": turn.picture, "alt_text": "picture sent with this question"})
    content.append(turn.question)
    if not in_view:
        content.append(OUT_OF_VIEW)
    elif starts_thread:
        content.append(NEW_THREAD)
    return {"role": "user", "content": content}


def _answer(turn: Turn, in_view: bool) -> list[dict]:
    messages = []
    if turn.answer:
        messages.append({"role": "assistant", "content": turn.answer})
    footer = []
    if turn.stats is not None:
        footer.append(escape(figures(turn.stats)))
    if turn.error is not None:
        footer.append(f'<span class="answer-error">⚠ {escape(turn.error)}</span>')
    if not in_view:
        footer.append(OUT_OF_VIEW)
    if footer:
        # A titled message with no body renders as one subdued line under the answer, outside the
        # answer's text, so the copy button copies the answer alone.
        messages.append({"role": "assistant", "content": "", "metadata": {"title": " · ".join(footer)}})
    return messages


def picture_card(info: Any | None, tile_size: int) -> str:
    """Caption of 'What the model sees': size and tiles of the active picture, or how to add one."""
    if info is None:
        return ("**No picture yet.** Add one with the clip button, paste it or drop it on the message box, "
                "or pick an example below. Text-only questions work too.")
    rows, cols = info.grid
    tiles = f"{info.tiles} tile{'s' if info.tiles != 1 else ''}"
    return (f"**{info.width} × {info.height} px** · {tiles} of {tile_size} px "
            f"({rows} × {cols} grid)")
