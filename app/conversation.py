"""The conversation of one browser session and the picture policy, as plain data and pure functions.

Picture policy: Llama 3.2 Vision looks at one picture at a time. A question that comes with a
picture starts a new *thread*; the model is given that thread only (its picture, its questions
and answers). Earlier turns stay on screen, marked out of view. Questions without a picture
continue the current thread, so text-only chat works as well.

Functions return new `Conversation` objects; the one exception is the answer being streamed,
which `record_piece`/`finish` write into the last turn in place, so that whatever ends a stream
(Stop, a closed tab, an error) leaves the partial answer in the session's history.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_QUESTION = "Describe the image."
STOPPED_BEFORE_START = "Stopped before the model started answering. Press Retry to ask again."
FINISH_TEXT = {"stop": "finished", "length": "reached the max new tokens", "cancelled": "stopped"}


class ConversationError(ValueError):
    """A chat action that cannot be done now; the message says why and what to do instead."""


@dataclass
class Turn:
    question: str
    picture: str | None = None   # path of the picture sent with this question; it opens a new thread
    answer: str = ""
    stats: Any = None            # the engine's ReplyStats once the answer has ended
    error: str | None = None     # why the answer failed, shown instead of (or after) the answer

    @property
    def done(self) -> bool:
        return self.stats is not None or self.error is not None


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)

    @property
    def thread_start(self) -> int:
        """Index of the first turn the model sees: the last turn with a picture (0 if none)."""
        for index in range(len(self.turns) - 1, -1, -1):
            if self.turns[index].picture is not None:
                return index
        return 0

    @property
    def picture(self) -> str | None:
        """The picture the model currently sees, if any."""
        return self.turns[self.thread_start].picture if self.turns else None

    def in_view(self, index: int) -> bool:
        return index >= self.thread_start

    @property
    def thread_key(self) -> str:
        """Names the current thread (its first turn and picture) so the engine can keep its image cache."""
        start = self.thread_start
        picture = self.turns[start].picture if self.turns else None
        return f"{start}:{hashlib.sha1(str(picture).encode()).hexdigest()[:12]}"

    @property
    def answering(self) -> bool:
        return bool(self.turns) and not self.turns[-1].done


def ask(conversation: Conversation, text: str, files: list[str]) -> Conversation:
    """Add a question (and maybe a picture) waiting for its answer."""
    if conversation.answering:
        raise ConversationError("The model is still answering. Press Stop first, or wait for the answer.")
    if len(files) > 1:
        raise ConversationError(f"You attached {len(files)} files, but Llama 3.2 Vision looks at one picture at "
                                "a time. Send one picture per message.")
    text = text.strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # an unpaired surrogate: nothing can tokenize or show it
        raise ConversationError(f"The message has a character that is not valid Unicode (U+{ord(text[error.start]):04X} "
                                f"at character {error.start + 1}). Remove it and send the message again.") from None
    picture = files[0] if files else None
    if not text and picture is None:
        raise ConversationError("Type a question, or add a picture (clip button, paste, or drag and drop).")
    return Conversation([*conversation.turns, Turn(question=text or DEFAULT_QUESTION, picture=picture)])


def retry(conversation: Conversation) -> Conversation:
    """Forget the last answer so that the last question is answered again."""
    if not conversation.turns:
        raise ConversationError("There is no question to retry yet. Ask something first.")
    if conversation.answering:
        raise ConversationError("The model is still answering. Press Stop first, then Retry.")
    last = replace(conversation.turns[-1], answer="", stats=None, error=None)
    return Conversation([*conversation.turns[:-1], last])


def undo(conversation: Conversation) -> tuple[Conversation, Turn]:
    """Remove the last question and its answer; the removed turn is returned to refill the input."""
    if not conversation.turns:
        raise ConversationError("There is nothing to undo: the conversation is empty.")
    if conversation.answering:
        raise ConversationError("The model is still answering. Press Stop first, then Undo.")
    return Conversation(conversation.turns[:-1]), conversation.turns[-1]


def interrupted(conversation: Conversation) -> Conversation:
    """Close a question whose answer never started (stopped while queued, or its request was refused)."""
    if not conversation.answering:
        return conversation
    last = replace(conversation.turns[-1], error=STOPPED_BEFORE_START)
    return Conversation([*conversation.turns[:-1], last])


def record_piece(turn: Turn, piece: str) -> None:
    """Append a streamed piece of text to the answer (in place, see the module docstring)."""
    turn.answer += piece


def finish(turn: Turn, stats: Any = None, error: str | None = None) -> None:
    """Close the answer of `turn` with the engine's figures or an error (in place)."""
    turn.stats = stats
    turn.error = error


def engine_messages(conversation: Conversation, system_prompt: str,
                    load_picture: Callable[[str], Any]) -> list[dict]:
    """The transformers-style chat the model is given for the last question: the current thread only.

    Turns of the thread that failed without any text are left out (the model would otherwise see
    a question without an answer); the thread's picture goes with its first remaining question.
    """
    if not conversation.turns:
        raise ConversationError("There is no question to answer yet.")
    start = conversation.thread_start
    picture = conversation.turns[start].picture
    last = len(conversation.turns) - 1
    messages: list[dict] = []
    if system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for index in range(start, last + 1):
        turn = conversation.turns[index]
        if index < last and not turn.answer:
            continue
        content: list[dict] = [{"type": "text", "text": turn.question}]
        if picture is not None:
            content.insert(0, {"type": "image", "image": load_picture(picture)})
            picture = None
        messages.append({"role": "user", "content": content})
        if index < last:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
    return messages


def figures(stats: Any) -> str:
    """One line of per-answer figures: time to first token, speed, length and why it ended."""
    reason = FINISH_TEXT.get(stats.finish_reason, stats.finish_reason)
    if not stats.tokens:
        return f"{reason} before the first token"
    return (f"{stats.time_to_first_token_s:.2f} s to first token · {stats.tokens_per_s:.1f} tokens/s · "
            f"{stats.tokens} token{'s' if stats.tokens != 1 else ''} · {reason}")
