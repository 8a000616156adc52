"""The app as a front end to another server (`--backend`): app A answers through app B's
OpenAI-compatible API, over real HTTP, and must say what B says."""
from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app.config import TINY_MODEL
from conftest import _serve_app
from engine_checkpoint import write_talkative_checkpoint
from scripts.synthetic import draw_picture
from serving import EngineError

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "red", "blue"]


@pytest.fixture(scope="module")
def front(tiny_app):
    """App A, in front of the tiny app (B)."""
    yield from _serve_app(TINY_MODEL, backend=tiny_app.url + "v1", max_batch=8, queue_size=16)


def ask(url: str, image: str | None, question: str, **settings):
    client = Client(url, verbose=False)
    try:
        arguments = {"max_new_tokens": 24, "temperature": 0, "top_p": 1.0, "seed": None, **settings}
        return client.submit(handle_file(image) if image else None, question, arguments["max_new_tokens"],
                             arguments["temperature"], arguments["top_p"], arguments["seed"], api_name="/ask").result()
    finally:
        client.close()


def test_the_front_says_which_server_and_model_answer(front, tiny_app):
    assert front.engine.info.model_id == f"tiny-mllama at {tiny_app.url}v1"


def test_eight_users_at_once_get_what_the_server_itself_answers(front, tiny_app, tmp_path):
    questions = []
    for i, color in enumerate(COLORS):
        path = tmp_path / f"p{i}.png"
        draw_picture(random.Random(i), color, ["circle", "square", "triangle"][i % 3], 1 + i % 3, (211, 157)).save(path)
        questions.append((str(path), ["What color is the shape?", "Describe the image."][i % 2]))
    direct = [ask(tiny_app.url, path, q) for path, q in questions]
    start = threading.Barrier(len(questions))

    def through_front(item):
        start.wait()
        return ask(front.url, *item)

    with ThreadPoolExecutor(len(questions)) as pool:
        fronted = list(pool.map(through_front, questions))
    assert fronted == direct
    assert any(color in answer.lower() for color, answer in zip(COLORS, fronted))


def test_a_key_the_server_refuses_is_a_clear_error():
    from serving.remote import RemoteEngine

    keyed = _serve_app(TINY_MODEL, api_key="right", max_batch=1, queue_size=2)
    server = next(keyed)
    try:
        with pytest.raises(EngineError, match="refused the key \\(401\\). Check --backend-api-key"):
            RemoteEngine(server.url + "v1", api_key="wrong")
        assert RemoteEngine(server.url + "v1", api_key="right").model == "tiny-mllama"
    finally:
        next(keyed, None)


def test_an_unreachable_server_is_a_clear_error():
    import socket

    from serving.remote import RemoteEngine

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EngineError, match="cannot be reached"):
        RemoteEngine(f"http://127.0.0.1:{port}/v1")
    engine = RemoteEngine(f"http://127.0.0.1:{port}/v1", model="named")  # starts; each answer says why not
    with pytest.raises(EngineError, match="cannot be reached"):
        engine.chat([{"role": "user", "content": "hi"}])


def test_a_server_that_stops_mid_answer_gives_a_clear_message_and_the_front_keeps_working(tmp_path):
    back = _serve_app(write_talkative_checkpoint(tmp_path / "talkative"), max_new_tokens=16000,
                      context_tokens=16384, max_batch=2, queue_size=4)
    server = next(back)
    front = _serve_app(TINY_MODEL, backend=server.url + "v1", max_new_tokens=16000, max_batch=2, queue_size=4)
    app = next(front)
    try:
        client = Client(app.url, verbose=False)
        job = client.submit(None, "A long story", 16000, 0, 1.0, None, api_name="/ask")
        for i, _ in enumerate(job):
            if i == 3:
                break
        next(back, None)  # B goes away mid-answer
        with pytest.raises(AppError, match="The model server at .* (stopped answering|cannot be reached)"):
            job.result()
        with pytest.raises(AppError, match="cannot be reached"):
            ask(app.url, None, "Hello")  # the front answers at once, with the reason
        client.close()
    finally:
        next(back, None)
        next(front, None)
