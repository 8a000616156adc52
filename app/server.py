"""Loading the engine with readable failures, and serving the page with the app's launch settings."""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import gradio as gr

from .config import EXAMPLES_DIR, AppConfig

if TYPE_CHECKING:
    from serving import Engine

MAX_UPLOAD = "20mb"  # larger pictures gain nothing: the model sees at most 4 tiles of 560 px


def load_engine(config: AppConfig) -> Engine | None:
    """Load the model, showing progress in the terminal; on failure print what to do and return None."""
    from serving import ChatEngine

    print(f"Loading {config.model} (dtype {config.dtype}, device map {config.device_map}"
          f"{', compiled decoding' if config.compile else ''}) ...",
          flush=True)
    start = time.perf_counter()
    try:
        engine = ChatEngine.load(model=config.model, dtype=config.dtype, device_map=config.device_map,
                                 max_batch=config.max_batch, queue_size=config.queue_size,
                                 context_tokens=config.context_tokens, compile=config.compile)
    except Exception as error:  # noqa: BLE001 - any load failure ends the app with its message
        print(f"\nCould not load the model {config.model!r}:\n  {error}\n\n"
              "Pass a checkpoint folder or a Hub id with --model (or MLLAMA_MODEL); "
              "without --model the app starts on the tiny demo model.", file=sys.stderr)
        return None
    print(f"Model ready in {time.perf_counter() - start:.1f} s.", flush=True)
    return engine


def launch(demo: gr.Blocks, config: AppConfig, **overrides: Any) -> tuple:
    """Queue and serve `demo`; `overrides` go to `Blocks.launch` (tests pass prevent_thread_lock=True)."""
    from .ui import CSS

    demo.queue(max_size=config.queue_size, default_concurrency_limit=config.max_batch)
    options = dict(server_name=config.host, server_port=config.port, share=config.share, auth=config.auth,
                   max_file_size=MAX_UPLOAD, allowed_paths=[str(EXAMPLES_DIR)], css=CSS,
                   footer_links=["api", "settings"], show_error=True)
    return demo.launch(**{**options, **overrides})
