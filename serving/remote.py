"""The engine interface over any OpenAI-compatible server (TGI, SGLang, vLLM, Ollama, another copy
of this app): the page and `/ask` in front of a model that runs elsewhere.

Pictures travel as PNG data URLs (lossless: the server sees the pixels the page shows), replies
come back as a server-sent event stream read with the `openai` client; closing a reply closes
that HTTP stream, which stops the server's work. Every failure of the server becomes an
EngineError whose message names the server and says what to do.
"""
from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator

import openai

from .engine import EngineInfo, GenerationSettings, ImageInfo, describe_tiling
from .errors import EngineBusy, EngineError
from .policy import ReplyStats

# What the page shows about tiling when the model runs elsewhere: Llama 3.2 Vision's processor.
TILE_SIZE, MAX_TILES = 560, 4


class RemoteEngine:
    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 60.0) -> None:
        """`model`: the server's model to use; None takes the first one the server lists (which
        also checks, at start-up, that the server answers)."""
        self.base_url = base_url.rstrip("/")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "none", max_retries=0,
                                    timeout=timeout_s)
        if model is None:
            try:
                listed = [m.id for m in self.client.models.list().data]
            except openai.OpenAIError as error:
                raise EngineError(self._explain(error)) from None
            if not listed:
                raise EngineError(f"The model server at {self.base_url} lists no model: pass --backend-model.")
            model = listed[0]
        self.model = model
        self.info = EngineInfo(model_id=f"{model} at {self.base_url}", tile_size=TILE_SIZE, max_tiles=MAX_TILES,
                               context_tokens=0, defaults=GenerationSettings(temperature=0.6, top_p=0.9))

    def describe_image(self, image) -> ImageInfo:
        return describe_tiling(image, TILE_SIZE, MAX_TILES)

    def chat(self, messages: list[dict], settings: GenerationSettings | None = None,
             cancel: threading.Event | None = None, session_id: str | None = None) -> "RemoteReply":
        """Send the conversation; errors the server gives at once (refused key, busy, bad request)
        are raised here, the reply streams from the returned object."""
        settings = settings or self.info.defaults
        options = dict(model=self.model, messages=[_openai_message(m) for m in messages], stream=True,
                       stream_options={"include_usage": True}, max_tokens=settings.max_new_tokens,
                       temperature=settings.temperature, top_p=settings.top_p)
        if settings.seed is not None:
            options["seed"] = settings.seed
        started = time.perf_counter()
        try:
            stream = self.client.chat.completions.create(**options)
        except openai.OpenAIError as error:
            raise (EngineBusy if isinstance(error, openai.RateLimitError) else EngineError)(self._explain(error)) from None
        return RemoteReply(stream, started, cancel or threading.Event(), self._explain)

    def close(self) -> None:
        self.client.close()

    def _explain(self, error: Exception) -> str:
        server = f"The model server at {self.base_url}"
        if isinstance(error, openai.APITimeoutError):
            return f"{server} did not answer in time. Try again, or ask its operator."
        if isinstance(error, openai.APIConnectionError):
            return f"{server} cannot be reached ({error.__cause__ or error}). Check that it runs and the --backend URL."
        if isinstance(error, openai.AuthenticationError):
            return f"{server} refused the key (401). Check --backend-api-key (MLLAMA_BACKEND_API_KEY)."
        if isinstance(error, openai.RateLimitError):
            return f"{server} is busy (429). Try again in a moment."
        if isinstance(error, openai.BadRequestError):
            return (f"{server} refused the request: {_message(error)}. If it serves a model without vision, "
                    "send text only or point --backend at a vision model.")
        if isinstance(error, openai.APIStatusError):
            return f"{server} failed ({error.status_code}): {_message(error)}. Try again, or ask its operator."
        return f"{server} stopped answering ({type(error).__name__}: {error}). Try again."


class RemoteReply:
    """Text pieces, then ReplyStats, read from the server's event stream (as `serving.Reply`)."""

    def __init__(self, stream, started: float, cancel: threading.Event, explain) -> None:
        self._stream, self._started, self._cancel, self._explain = stream, started, cancel, explain
        self._items = self._read()
        self.stats: ReplyStats | None = None
        self._done = threading.Event()

    def __iter__(self) -> "RemoteReply":
        return self

    def __next__(self) -> str | ReplyStats:
        return next(self._items)

    def _read(self) -> Iterator[str | ReplyStats]:
        first = None
        pieces, finish, usage = 0, "cancelled", None
        try:
            for chunk in self._stream:
                if self._cancel.is_set():
                    break
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        first = first or time.perf_counter()
                        pieces += 1
                        yield choice.delta.content
                    if choice.finish_reason:
                        finish = "stop" if choice.finish_reason == "stop" else "length"
        except openai.OpenAIError as error:
            if not self._cancel.is_set():
                raise EngineError(self._explain(error)) from None
        except Exception as error:  # noqa: BLE001 - a stream cut off can fail inside httpx
            if not self._cancel.is_set():
                raise EngineError(self._explain(error)) from None
        finally:
            self._stream.close()  # stops the server's work when the reply ends early
            self._done.set()
        now = time.perf_counter()
        first = first or now
        tokens = usage.completion_tokens if usage is not None else pieces
        self.stats = ReplyStats(
            time_to_first_token_s=first - self._started,
            tokens=tokens,
            tokens_per_s=(tokens - 1) / (now - first) if tokens > 1 and now > first else 0.0,
            finish_reason=finish,
            prompt_tokens=usage.prompt_tokens if usage is not None else 0,
        )
        yield self.stats

    def close(self) -> None:
        self._cancel.set()
        try:
            self._items.close()
        except ValueError:  # being read in another thread right now: close the stream under it
            self._stream.close()

    def wait(self, timeout: float | None = None) -> ReplyStats | None:
        self._done.wait(timeout)
        return self.stats


def _openai_message(message: dict) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return {"role": message["role"], "content": content}
    parts = []
    for part in content:
        if part.get("type") == "image":
            parts.append({"type": "image_url", "image_url": {"url": _data_url(part["image"])}})
        elif part.get("type") == "text":
            parts.append({"type": "text", "text": part["text"]})
    return {"role": message["role"], "content": parts}


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _message(error: Exception) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(error)
