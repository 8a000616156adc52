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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from model.image_io import ImageLoadError
from serving import EngineError, ReplyStats
from serving.engine import MAX_SEED

from .answering import RANDOM_SEED, RunningAnswers, drain, failure_message, read_picture, settings_from
from .conversation import (STOPPED_BEFORE_START, Conversation, ConversationError, ask, engine_messages, finish,
                           interrupted, record_piece, retry, undo)
from .display import chat_messages, picture_card
from .saved import restored, saved

if TYPE_CHECKING:
    from serving import Engine

log = logging.getLogger(__name__)

UPDATE_EVERY_S = 0.1  # at most ten updates a second while an answer streams
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


def actions(conversation: Conversation) -> tuple[Any, Any]:
    """Retry and Undo, enabled only when they can run: a finished last turn to act on."""
    ready = bool(conversation.turns) and not conversation.answering
    return gr.Button(interactive=ready), gr.Button(interactive=ready)


def check_seed(seed: float | None) -> None:
    """The seed field takes -1 (random) or a whole number from 0 to MAX_SEED."""
    if seed is None or seed == "":
        return
    if not (RANDOM_SEED <= int(seed) <= MAX_SEED):
        raise gr.Error(f"Seed: {int(seed)} is not a seed. Use -1 for a new random seed for every answer, or a "
                       f"whole number from 0 to {MAX_SEED} to repeat answers.", title="Check the settings")


class ChatHandlers:
    def __init__(self, engine: Engine, max_new_tokens: int, running: RunningAnswers,
                 picture_folders: list[Path] | None = None, examples: list[dict] | None = None):
        self.engine = engine
        self.picture_folders = picture_folders or []  # where pictures restored after a reload may be
        self.examples = examples or []  # message box values, in the order the empty chat shows them
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
    def check_message(self, conversation: Conversation, message: dict | None, seed: float | None) -> None:
        """Refuse a message that cannot be sent (empty, two pictures, an unreadable picture, a bad
        seed...). A second Send of the message being answered (a double click) is dropped quietly."""
        if conversation.answering and _same_message(conversation, message):
            raise gr.Error("already sent", visible=False, print_exception=False)
        check_seed(seed)
        self._asked(conversation, message)

    def submit(self, conversation: Conversation, message: dict | None) -> tuple:
        updated, thumbnail, caption = self._asked(conversation, message)
        if updated.turns[-1].picture is not None and len(updated.turns) > 1:
            gr.Info(NEW_THREAD_INFO, title="New thread", duration=4)
        return (updated, chat_messages(updated), textbox_answering(), thumbnail, caption, *actions(updated),
                saved(updated))

    def send_example(self, seed: float | None, chosen: gr.SelectData) -> dict:
        """An example picked in the empty chat is sent as it is: the message box's value for it. Its
        picture is taken from the examples folder, not from the page's copy, which Gradio's cache
        cleaning may have deleted since."""
        check_seed(seed)
        return self.examples[chosen.index]

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
            shown_at, unshown = None, False
            for item in pieces:
                if isinstance(item, ReplyStats):
                    if unshown:  # the end of the text first, then its figures
                        yield conversation, chat_messages(conversation)
                    finish(turn, stats=item)
                else:
                    record_piece(turn, item)
                    # The browser redraws the whole answer for each update: a fast model's tokens are
                    # sent in batches, so that the page stays responsive while it streams.
                    unshown = shown_at is not None and time.monotonic() - shown_at < UPDATE_EVERY_S
                    if unshown:
                        continue
                    shown_at = time.monotonic()
                yield conversation, chat_messages(conversation)
        except Exception as error:
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
        return conversation, chat_messages(conversation), textbox_ready(), *actions(conversation), \
            saved(conversation)

    def answered(self, conversation: Conversation) -> tuple:
        """After an answer: the message box ready (keeping what was typed meanwhile), the actions
        enabled, the browser's copy updated."""
        return textbox_ready(), *actions(conversation), saved(conversation)

    def check_retry(self, conversation: Conversation, seed: float | None) -> None:
        try:
            retry(conversation)
        except ConversationError as error:
            raise gr.Error(str(error), title="Cannot retry") from None
        check_seed(seed)

    def retry(self, conversation: Conversation) -> tuple:
        updated = retry(conversation)
        return updated, chat_messages(updated), textbox_answering(), *actions(updated)

    def undo(self, conversation: Conversation) -> tuple:
        try:
            updated, removed = undo(conversation)
        except ConversationError as error:
            gr.Warning(str(error), title="Cannot undo")
            return (gr.skip(),) * 8
        thumbnail, caption = self.card(updated)
        files = [removed.picture] if removed.picture else []
        return updated, chat_messages(updated), textbox_ready({"text": removed.question, "files": files}), \
            thumbnail, caption, *actions(updated), saved(updated)

    def clear(self, request: gr.Request) -> tuple:
        """Clear (the button or the chat's own trash icon): a new conversation, here and in the browser."""
        self.running.stop(request.session_hash or "anonymous")
        empty = Conversation()
        thumbnail, caption = self.card(empty)
        return empty, [], textbox_ready(), thumbnail, caption, *actions(empty), saved(empty)

    def restore(self, conversation: Conversation, kept: Any) -> tuple:
        """On page load: the conversation the browser kept, if any, as it was left. Nothing changes
        when there is none, or when the user was quicker and has already sent a question."""
        kept_conversation = restored(kept, self.picture_folders)
        if conversation.turns or not kept_conversation.turns:
            return (gr.skip(),) * 6
        conversation = kept_conversation
        thumbnail, caption = self.card(conversation)
        return conversation, chat_messages(conversation), thumbnail, caption, *actions(conversation)

    def leave(self, request: gr.Request) -> None:
        """The tab was closed: stop its answer, if one is running."""
        self.running.stop(request.session_hash or "anonymous", wait_s=0)


def _same_message(conversation: Conversation, message: dict | None) -> bool:
    """Whether `message` is the question being answered (or empty): a repeated Send, not a new one."""
    message = message or {}
    text, files = (message.get("text") or "").strip(), list(message.get("files") or [])
    last = conversation.turns[-1]
    return not files and (not text or text == last.question)
