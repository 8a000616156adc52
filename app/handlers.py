"""What the page's events do: each method takes the session's conversation (and the page's values)
and returns the new conversation and what the page shows of it.

User mistakes are caught by `check_*` steps that have no outputs and run first: their `gr.Error`
shows a message and stops the chain before anything changes (an error raised by a step with
outputs would cover those outputs, the conversation among them). Engine failures are written into
the turn they happened in and shown as a warning.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import gradio as gr

from model.image_io import ImageLoadError
from serving import EngineError, ReplyStats

from .answering import RunningAnswers, drain, failure_message, read_picture, settings_from
from .conversation import (STOPPED_BEFORE_START, Conversation, ConversationError, ask, engine_messages, finish,
                           interrupted, record_piece, retry, undo)
from .display import chat_messages, picture_card

if TYPE_CHECKING:
    from serving import Engine

log = logging.getLogger(__name__)

NEW_THREAD_INFO = ("New picture: the model now looks at this one only. Earlier messages stay on the page, "
                   "marked out of view.")


def textbox_ready(value: dict | None = None) -> Any:
    """The message box ready for a question (Send shown, Stop hidden). Without `value` it keeps what
    the user may have typed meanwhile."""
    if value is None:
        return gr.MultimodalTextbox(submit_btn=True, stop_btn=False)
    return gr.MultimodalTextbox(value=value, submit_btn=True, stop_btn=False)


def textbox_answering() -> Any:
    """The message box while an answer streams: emptied, Stop instead of Send."""
    return gr.MultimodalTextbox(value=None, submit_btn=False, stop_btn=True)


class ChatHandlers:
    def __init__(self, engine: Engine, max_new_tokens: int, running: RunningAnswers):
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        side = engine.info.tile_size * engine.info.max_tiles  # the model sees no more pixels
        self.read_picture = functools.partial(read_picture, max_side=side)
        self.running = running

    # -- reading the picture -------------------------------------------------------------------
    def card(self, conversation: Conversation) -> tuple[str | None, str]:
        """Thumbnail path and caption of the picture the model sees."""
        picture = conversation.picture
        if picture is None:
            return None, picture_card(None, self.engine.info.tile_size)
        info = self.engine.describe_image(self.read_picture(picture))
        return picture, picture_card(info, self.engine.info.tile_size)

    def _asked(self, conversation: Conversation, message: dict | None) -> tuple[Conversation, str | None, str]:
        message = message or {}
        try:
            updated = ask(conversation, message.get("text") or "", list(message.get("files") or []))
            return (updated, *self.card(updated))
        except (ConversationError, ImageLoadError) as error:
            raise gr.Error(str(error), title="Not sent") from None

    # -- events --------------------------------------------------------------------------------
    def check_message(self, conversation: Conversation, message: dict | None) -> None:
        """Refuse a message that cannot be sent (empty, two pictures, an unreadable picture...)."""
        self._asked(conversation, message)

    def submit(self, conversation: Conversation, message: dict | None) -> tuple:
        updated, thumbnail, caption = self._asked(conversation, message)
        if updated.turns[-1].picture is not None and len(updated.turns) > 1:
            gr.Info(NEW_THREAD_INFO, title="New thread")
        return updated, chat_messages(updated), textbox_answering(), thumbnail, caption

    def answer(self, conversation: Conversation, system_prompt: str, temperature: float, top_p: float,
               top_k: float, max_new_tokens: float, repetition_penalty: float, seed: float | None,
               request: gr.Request) -> Iterator[tuple]:
        """Stream the answer to the last question into the conversation, one piece at a time."""
        turn = conversation.turns[-1]
        session = request.session_hash or "anonymous"
        cancel = self.running.start(session)
        pieces = None
        try:
            settings = settings_from(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                                     limit=self.max_new_tokens)
            messages = engine_messages(conversation, system_prompt or "", self.read_picture)
            pieces = self.engine.chat(messages, settings, cancel=cancel,
                                      session_id=f"{session}/{conversation.thread_key}")
            for item in pieces:
                if isinstance(item, ReplyStats):
                    finish(turn, stats=item)
                else:
                    record_piece(turn, item)
                yield conversation, chat_messages(conversation)
        except Exception as error:  # noqa: BLE001 - every failure becomes a message; the history stays
            if isinstance(error, (ConversationError, ImageLoadError, EngineError)):
                log.info("answer refused: %s", error)  # the user's to fix: one line, no traceback
            else:
                log.exception("answer failed")
            message = failure_message(error)
            finish(turn, error=message)
            gr.Warning(message, title="No answer")
            yield conversation, chat_messages(conversation)
        finally:
            # Reached on Stop and on a closed tab too (Gradio closes this generator): the engine
            # stops within one decode step, and the stopped answer keeps its figures.
            cancel.set()
            if not turn.done:
                stats = drain(pieces) if pieces is not None else None
                finish(turn, stats=stats, error=None if stats else "Stopped." if turn.answer else STOPPED_BEFORE_START)
            if pieces is not None:
                pieces.close()
            self.running.end(session, cancel)

    def stop(self, conversation: Conversation, request: gr.Request) -> tuple:
        self.running.stop(request.session_hash or "anonymous")
        # What is still open now never started: it waited in the queue or was refused there.
        conversation = interrupted(conversation)
        return conversation, chat_messages(conversation), textbox_ready()

    def check_retry(self, conversation: Conversation) -> None:
        try:
            retry(conversation)
        except ConversationError as error:
            raise gr.Error(str(error), title="Cannot retry") from None

    def retry(self, conversation: Conversation) -> tuple:
        updated = retry(conversation)
        return updated, chat_messages(updated), textbox_answering()

    def undo(self, conversation: Conversation) -> tuple:
        try:
            updated, removed = undo(conversation)
        except ConversationError as error:
            gr.Warning(str(error), title="Cannot undo")
            return (gr.skip(),) * 5
        thumbnail, caption = self.card(updated)
        files = [removed.picture] if removed.picture else []
        return updated, chat_messages(updated), textbox_ready({"text": removed.question, "files": files}), \
            thumbnail, caption

    def clear(self, request: gr.Request) -> tuple:
        self.running.stop(request.session_hash or "anonymous")
        empty = Conversation()
        thumbnail, caption = self.card(empty)
        return empty, [], textbox_ready(), thumbnail, caption

    def leave(self, request: gr.Request) -> None:
        """The tab was closed: stop its answer, if one is running."""
        self.running.stop(request.session_hash or "anonymous", wait_s=0)
