"""Loading the engine with readable failures, and serving the page with the app's launch settings."""
from __future__ import annotations

import asyncio
import hmac
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import gradio as gr

from .config import EXAMPLES_DIR, AppConfig

if TYPE_CHECKING:
    from serving import Engine

MAX_UPLOAD = "20mb"  # larger pictures gain nothing: the model sees at most 4 tiles of 560 px


LoginCheck = Callable[[str, str], Awaitable[bool]]


def slowed_login(user: str, password: str, *, window_s: float = 60.0, step_s: float = 0.5, most_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> LoginCheck:
    """Gradio's login check for one USER:PASSWORD, answering each wrong attempt after a delay that
    grows with the failures of the last `window_s` seconds (by `step_s`, at most `most_s`), so
    guessing is slow while a right password is never delayed."""
    failures: deque[float] = deque()

    async def check(username: str, attempt: str) -> bool:
        right = hmac.compare_digest(username.encode(), user.encode())
        right &= hmac.compare_digest(attempt.encode(), password.encode())
        if right:
            return True
        now = clock()
        while failures and failures[0] < now - window_s:
            failures.popleft()
        failures.append(now)
        await sleep(min(most_s, step_s * len(failures)))
        return False

    return check


def port_problem(config: AppConfig) -> str | None:
    """Why the app could not listen on its address, found before the minutes of loading a model."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as probe:
            probe.bind((config.host, config.port))
    except OSError as error:
        return (f"Cannot listen on {config.host}:{config.port} ({error.strerror or error}). Another program "
                f"(another copy of this app?) may be using the port: pass another one with --port, e.g. "
                f"--port {config.port + 1}.")
    return None


def load_engine(config: AppConfig) -> Engine | None:
    """Load the model (or connect to the --backend server), showing progress in the terminal; on
    failure print what to do and return None."""
    if config.backend:
        return connect_backend(config)
    if config.zero_gpu:
        from .zerogpu import load_zerogpu_engine

        return load_zerogpu_engine(config)
    from serving import ChatEngine

    print(f"Loading {config.model} (dtype {config.dtype}, device map {config.device_map}"
          f"{', compiled decoding' if config.compile else ''}"
          f"{f', {config.quantize} weights' if config.quantize else ''}) ...",
          flush=True)
    start = time.perf_counter()
    try:
        engine = ChatEngine.load(model=config.model, dtype=config.dtype, device_map=config.device_map,
                                 max_batch=config.max_batch, queue_size=config.queue_size,
                                 context_tokens=config.context_tokens, compile=config.compile,
                                 quantization=config.quantize)
    except Exception as error:  # noqa: BLE001 - any load failure ends the app with its message
        print(f"\nCould not load the model {config.model!r}:\n  {error}\n\n"
              "Pass a checkpoint folder or a Hub id with --model (or MLLAMA_MODEL); "
              "without --model the app starts on the tiny demo model.", file=sys.stderr)
        return None
    print(f"Model ready in {time.perf_counter() - start:.1f} s.", flush=True)
    return engine


def connect_backend(config: AppConfig) -> Engine | None:
    from serving.errors import EngineError
    from serving.remote import RemoteEngine

    print(f"Answers come from the server at {config.backend} ...", flush=True)
    try:
        engine = RemoteEngine(config.backend, api_key=config.backend_api_key, model=config.backend_model)
    except EngineError as error:
        print(f"\n{error}\n\nStart that server first, or pass --backend-model to start without asking it.",
              file=sys.stderr)
        return None
    print(f"Using {engine.info.model_id}.", flush=True)
    return engine


def launch(demo: gr.Blocks, config: AppConfig, engine: Engine, **overrides: Any) -> tuple:
    """Queue and serve `demo`, with the OpenAI-compatible /v1 API on the same server; `overrides`
    go to `Blocks.launch` (tests pass prevent_thread_lock=True)."""
    from .openai_api import add_openai_api
    from .ui import CSS, FAVICON, HEAD, PAGE_JS

    demo.queue(max_size=config.queue_size, default_concurrency_limit=config.max_batch)
    options = dict(server_name=config.host, server_port=config.port, share=config.share,
                   auth=slowed_login(*config.auth) if config.auth else None,
                   max_file_size=MAX_UPLOAD, allowed_paths=[str(EXAMPLES_DIR)], css=CSS, js=PAGE_JS,
                   head=HEAD, favicon_path=str(FAVICON),
                   footer_links=["api", "settings"], show_error=True)
    block = not overrides.get("prevent_thread_lock", False)
    started = demo.launch(**{**options, **overrides, "prevent_thread_lock": True})
    add_openai_api(demo.app, engine, config)  # Gradio builds its server in launch(): add the routes to it
    if block:
        demo.block_thread()
    return started
