"""`/ask`: the endpoint for programs. One picture (optional) and one question in, the answer streamed out.

Each call is independent (no conversation). The answer grows with every streamed update, so a
client reading `job` sees "R", "Red", "Red." and `job.result()`/`predict` give the whole text.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import gradio as gr

from model.image_io import ImageLoadError
from serving import EngineError

from .answering import read_picture, settings_from
from .conversation import DEFAULT_QUESTION

if TYPE_CHECKING:
    from serving import Engine

ASK_DESCRIPTION = ("Answer one question about one picture (optional), streaming the answer as it grows. "
                   'With a picture: client.predict(image=handle_file("photo.jpg"), question="What is in this '
                   'picture?", api_name="/ask") (from gradio_client import Client, handle_file). Without one, '
                   "leave image out.")


def add_ask_endpoint(engine: Engine, limit: int, concurrency_limit: int) -> None:
    """Register `/ask` on the Blocks being built. Its components are invisible: it has no place on the page."""
    defaults = engine.info.defaults
    largest_picture = engine.info.tile_size * engine.info.max_tiles  # the model sees no more pixels

    # The parameter names are the API's; a default of None makes a parameter optional for clients.
    def ask(image: str | None = None, question: str = "", max_new_tokens: float | None = None,
            temperature: float | None = None, top_p: float | None = None, seed: float | None = None) -> Iterator[str]:
        if not (question or "").strip() and image is None:
            raise gr.Error("Send a question, a picture, or both.")
        try:
            settings = settings_from(
                defaults.max_new_tokens if max_new_tokens is None else max_new_tokens,
                defaults.temperature if temperature is None else temperature,
                defaults.top_p if top_p is None else top_p,
                defaults.top_k, defaults.repetition_penalty, seed, limit=limit)
            content: list[dict] = [{"type": "text", "text": (question or "").strip() or DEFAULT_QUESTION}]
            if image is not None:
                content.insert(0, {"type": "image", "image": read_picture(image, largest_picture)})
        except (ImageLoadError, ValueError) as error:
            raise gr.Error(str(error)) from None
        cancel = threading.Event()
        pieces = engine.chat([{"role": "user", "content": content}], settings, cancel=cancel)
        text = ""
        try:
            for item in pieces:
                if isinstance(item, str):
                    text += item
                    yield text
        except EngineError as error:
            raise gr.Error(str(error)) from None
        finally:  # a client that cancels or disconnects stops the computation
            cancel.set()
            pieces.close()
        if not text:
            yield text

    with gr.Column(visible=False):
        inputs = [
            gr.File(label="image", file_types=["image"], type="filepath"),
            gr.Textbox(label="question"),
            gr.Number(label="max_new_tokens", value=min(defaults.max_new_tokens, limit), precision=0,
                      minimum=1, maximum=limit),
            gr.Number(label="temperature", value=defaults.temperature, minimum=0,
                      info="0 means greedy: always the most likely next token"),
            gr.Number(label="top_p", value=defaults.top_p, minimum=0, maximum=1),
            gr.Number(label="seed", value=None, precision=0, info="leave out (or -1) for a random seed"),
        ]
        answer = gr.Textbox(label="answer")
    # Gradio's generated example shows an optional parameter at its default (`image=None`): the
    # description shows the main use, a picture, instead.
    gr.on(triggers=[], fn=ask, inputs=inputs, outputs=answer, api_name="ask",
          api_description=ASK_DESCRIPTION,
          concurrency_id="answer", concurrency_limit=concurrency_limit)
