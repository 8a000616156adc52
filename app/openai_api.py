"""An OpenAI-compatible API on the app's own server: `GET /v1/models`, `POST /v1/chat/completions`.

The same engine serves it as the page and `/ask`, so answers, batching and limits are the same.
Errors come in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the status
an OpenAI client expects. With `--api-key` every call needs `Authorization: Bearer KEY`; when the
page has a login (`--auth`) and no key is set, the API is closed rather than open by accident.
"""
from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from model.image_io import ImageLoadError
from serving import EngineBusy, EngineError, GenerationSettings, ReplyStats
from serving.errors import EngineClosed

from .answering import read_picture
from .config import AppConfig
from .ui import model_name

if TYPE_CHECKING:
    from serving import Engine

MAX_BODY_BYTES = 32 * 2**20  # a picture as a data URL is at most the page's 20 MB upload, in base64
ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    """The request cannot be served as sent; the message says what to change."""


def error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status)


def add_openai_api(app: FastAPI, engine: Engine, config: AppConfig) -> None:
    model_id = model_name(engine.info.model_id)  # a folder by its name, not its path on this server
    largest_picture = engine.info.tile_size * engine.info.max_tiles  # the model sees no more pixels

    def refused(request: Request) -> JSONResponse | None:
        if config.auth and not config.api_key:
            return error(401, "This server's page has a login, so its /v1 API is closed: start it with "
                              "--api-key KEY (MLLAMA_API_KEY) to open the API to holders of that key.",
                         "authentication_error", "invalid_api_key")
        if config.api_key:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {config.api_key}".encode()):
                return error(401, "Pass this server's key as 'Authorization: Bearer KEY'.", "authentication_error",
                             "invalid_api_key")
        return None

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        denied = refused(request)
        if denied:
            return denied
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "mllama-chat"}]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        denied = refused(request)
        if denied:
            return denied
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return error(413, f"The request is {len(body) / 2**20:.0f} MB; this server takes at most "
                              f"{MAX_BODY_BYTES // 2**20} MB (send a smaller picture).", "invalid_request_error")
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise BadRequest("The body must be a JSON object.")
            messages = await run_in_threadpool(read_messages, payload.get("messages"), largest_picture)
            settings, stops, stream, usage = read_options(payload, engine.info.defaults, config.max_new_tokens)
            reply = await run_in_threadpool(engine.chat, messages, settings)
        except json.JSONDecodeError as problem:
            return error(400, f"The body is not valid JSON ({problem}).", "invalid_request_error")
        except (BadRequest, ImageLoadError) as problem:
            return error(400, str(problem), "invalid_request_error")
        except EngineBusy as problem:
            return error(429, str(problem), "rate_limit_error")
        except EngineClosed as problem:
            return error(503, str(problem), "server_error")
        except EngineError as problem:  # too long, two pictures, bad settings, invalid text
            return error(400, str(problem), "invalid_request_error")
        completion = Completion(model_id, stops)
        if stream:
            return StreamingResponse(completion.events(reply, usage), media_type="text/event-stream")
        return JSONResponse(await completion.whole(reply))


def read_messages(messages: Any, largest_picture: int) -> list[dict]:
    """OpenAI chat messages -> the engine's (transformers' chat format, pictures decoded)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"} objects.")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "developer":
            role = "system"  # newer OpenAI clients send the system prompt under this name
        if role not in ROLES:
            raise BadRequest(f"messages[{i}] has role {role!r}; this server takes {', '.join(ROLES)}.")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = [read_part(part, f"messages[{i}]", largest_picture) for part in content]
        else:
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts.")
        out.append({"role": role, "content": parts if role != "system" else "".join(p["text"] for p in parts
                                                                                   if p["type"] == "text")})
    return out


def read_part(part: Any, where: str, largest_picture: int) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url.startswith(("data:", "http://", "https://")):
            raise BadRequest(f"{where}: an image_url part needs a data URL or an http(s) URL.")
        return {"type": "image", "image": read_picture(url, largest_picture)}
    raise BadRequest(f"{where}: parts are {{\"type\": \"text\", \"text\": ...}} or "
                     f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}; got {kind!r}.")


def read_options(payload: dict, defaults: GenerationSettings, limit: int) -> tuple:
    """(settings, stop strings, stream?, include usage in the stream?)"""
    def number(name: str, default, kind=float):
        value = payload.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"'{name}' must be a number, got {value!r}.")
        return kind(value)

    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    max_tokens = min(defaults.max_new_tokens, limit) if max_tokens is None else number("max_tokens", None, int)
    if max_tokens < 1 or max_tokens > limit:
        raise BadRequest(f"'max_tokens' must be from 1 to {limit} on this server, got {max_tokens}.")
    stop = payload.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings.")
    seed = payload.get("seed")
    settings = GenerationSettings(
        max_new_tokens=max_tokens,
        temperature=number("temperature", defaults.temperature),
        top_p=number("top_p", defaults.top_p),
        top_k=defaults.top_k,
        repetition_penalty=defaults.repetition_penalty,
        seed=None if seed is None else number("seed", None, int),
    )
    options = payload.get("stream_options") or {}
    return settings, stop, bool(payload.get("stream")), bool(options.get("include_usage"))


class Completion:
    """One reply in OpenAI's shapes, cut at the first stop string (which is not returned)."""

    def __init__(self, model_id: str, stops: list[str]) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id, self.stops = model_id, stops
        self.text, self.sent = "", 0
        self.stopped = False  # a stop string was found

    def add(self, piece: str) -> str:
        """Take a piece of the reply; return the text that is safe to send now."""
        self.text += piece
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True
            return self._flush()
        # Hold back what could still become the start of a stop string.
        hold = max((len(s) - 1 for s in self.stops), default=0)
        ready = self.text[: max(self.sent, len(self.text) - hold)]
        out, self.sent = ready[self.sent:], len(ready)
        return out

    def _flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def finish_reason(self, stats: ReplyStats | None) -> str:
        return "stop" if self.stopped or stats is None or stats.finish_reason == "stop" else "length"

    @staticmethod
    def usage(stats: ReplyStats | None) -> dict:
        prompt, completion = (stats.prompt_tokens, stats.tokens) if stats else (0, 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens if stats else 0}}

    def _read(self, reply) -> tuple[list[str], ReplyStats | None]:
        """Run in a worker thread: the whole reply, or up to the stop string."""
        pieces = []
        for item in reply:
            if isinstance(item, ReplyStats):
                return pieces, item
            pieces.append(self.add(item))
            if self.stopped:
                reply.close()
                return pieces, reply.wait(timeout=30)
        return pieces, None

    async def whole(self, reply) -> dict:
        try:
            pieces, stats = await run_in_threadpool(self._read, reply)
        except EngineError as problem:
            return {"error": {"message": str(problem), "type": "server_error", "param": None, "code": None}}
        text = "".join(pieces) + self._flush()
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": self.finish_reason(stats)}],
                "usage": self.usage(stats)}

    def _chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                 "choices": [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def events(self, reply, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, one chunk per piece, the finish, [DONE]. A client that
        goes away closes this generator, which closes the reply: the engine stops within a step."""
        stats = None
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                item = await run_in_threadpool(next, reply, None)
                if item is None:
                    break
                if isinstance(item, ReplyStats):
                    stats = item
                    break
                text = self.add(item)
                if text:
                    yield self._chunk({"content": text})
                if self.stopped:
                    reply.close()
                    stats = await run_in_threadpool(reply.wait, 30)
                    break
            rest = self._flush()
            if rest:
                yield self._chunk({"content": rest})
            yield self._chunk({}, self.finish_reason(stats))
            if include_usage:
                yield self._chunk({}, usage=self.usage(stats))
            yield "data: [DONE]\n\n"
        except EngineError as problem:
            yield f"data: {json.dumps({'error': {'message': str(problem), 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            reply.close()
