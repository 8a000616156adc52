"""The OpenAI-compatible API, driven by the `openai` client against the launched app (real engine).
Answers are compared with what generate() alone says for the same conversation."""
from __future__ import annotations

import base64
import io
import json
import random
import re

import httpx
import pytest
import torch
from openai import APIStatusError, AuthenticationError, BadRequestError, OpenAI

from scripts.synthetic import draw_picture
from serving_oracle import Oracle, user


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def red_circle():
    return draw_picture(random.Random(7), "red", "circle", 1, (301, 227))


@pytest.fixture
def openai_client(tiny_app):
    client = OpenAI(base_url=tiny_app.url + "v1", api_key="unused", max_retries=0)
    yield client
    client.close()


def question_with(picture, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                         {"type": "text", "text": text}]}]


def oracle_text(app, picture, text: str, max_new_tokens: int = 24) -> str:
    engine = app.engine
    answer = Oracle(engine.model, engine.processor).answer([user(text, picture)], max_new_tokens)
    return engine.processor.decode(torch.tensor(answer.token_ids), skip_special_tokens=True)


def test_models_lists_the_served_model(openai_client, tiny_app):
    assert [m.id for m in openai_client.models.list().data] == ["tiny-mllama"]


def test_a_picture_as_data_url_gets_generate_s_answer(openai_client, tiny_app):
    out = openai_client.chat.completions.create(model="any", messages=question_with(red_circle(), "Describe the image."),
                                                temperature=0, max_tokens=24)
    assert out.choices[0].message.content == oracle_text(tiny_app, red_circle(), "Describe the image.")
    assert "red" in out.choices[0].message.content.lower()
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens > 0


def test_streaming_gives_the_same_text_in_pieces_with_usage(openai_client):
    messages = question_with(red_circle(), "Describe the image.")
    whole = openai_client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=24)
    chunks = list(openai_client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=24,
                                                        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_stop_string_ends_the_answer_before_it(openai_client, tiny_app):
    full = oracle_text(tiny_app, red_circle(), "Describe the image.")
    cut = full.split(" ")[1]  # e.g. "red" in "One red circle."
    out = openai_client.chat.completions.create(model="any", messages=question_with(red_circle(), "Describe the image."),
                                                temperature=0, max_tokens=24, stop=[" " + cut])
    assert out.choices[0].message.content == full.split(" " + cut)[0]
    assert out.choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable(openai_client):
    kwargs = dict(model="any", messages=[{"role": "user", "content": "Describe the image."}], temperature=1.5,
                  max_tokens=12, seed=11)
    first = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    assert openai_client.chat.completions.create(**kwargs).choices[0].message.content == first


def test_max_tokens_ends_with_length(talkative_app):
    client = OpenAI(base_url=talkative_app.url + "v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "go"}], max_tokens=5)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5


def test_closing_the_stream_stops_the_computation(talkative_app):
    client = OpenAI(base_url=talkative_app.url + "v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "a long story"}],
                                            max_tokens=16000, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    running = [r for r in talkative_app.engine.scheduler.policy.slots if r is not None]
    stream.close()
    for request in running:
        assert request.done.wait(timeout=30), "the engine kept generating for a closed stream"
        assert request.stats.finish_reason == "cancelled" and request.stats.tokens < 16000


@pytest.mark.parametrize("body, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}), "could not be read|not an image"),
    (json.dumps({"messages": [{"role": "user", "content": "red " * 2000}]}), "tokens long|characters long"),
])
def test_bad_requests_get_400_in_openai_shape(tiny_app, body, message):
    response = httpx.post(tiny_app.url + "v1/chat/completions", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]["message"]), response.json()


def test_two_pictures_are_refused_with_400(openai_client):
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(red_circle())}},
                                        {"type": "image_url", "image_url": {"url": data_url(red_circle())}},
                                        {"type": "text", "text": "compare"}]}]
    with pytest.raises(BadRequestError, match="one picture at a time"):
        openai_client.chat.completions.create(model="any", messages=two)


def test_a_too_large_request_gets_413(tiny_app):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (33 * 2**20)}]})
    response = httpx.post(tiny_app.url + "v1/chat/completions", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and "at most 32 MB" in response.json()["error"]["message"]


def test_an_api_key_is_required_when_set_and_a_login_alone_closes_the_api():
    from app.config import TINY_MODEL
    from conftest import _serve_app

    keyed = _serve_app(TINY_MODEL, api_key="s3cret", max_batch=1, queue_size=2)
    app = next(keyed)
    try:
        with pytest.raises(AuthenticationError, match="Bearer"):
            OpenAI(base_url=app.url + "v1", api_key="wrong", max_retries=0).models.list()
        assert OpenAI(base_url=app.url + "v1", api_key="s3cret", max_retries=0).models.list().data
    finally:
        next(keyed, None)
    login_only = _serve_app(TINY_MODEL, auth=("ada", "secret"), max_batch=1, queue_size=2)
    app = next(login_only)
    try:
        with pytest.raises(AuthenticationError, match="closed"):
            OpenAI(base_url=app.url + "v1", api_key="anything", max_retries=0).models.list()
    finally:
        next(login_only, None)


def test_a_full_queue_gets_429(tmp_path):
    from conftest import _serve_app
    from engine_checkpoint import write_talkative_checkpoint

    folder = write_talkative_checkpoint(tmp_path / "busy")
    serving = _serve_app(folder, max_new_tokens=16000, context_tokens=16384, max_batch=1, queue_size=1)
    app = next(serving)
    client = OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0)
    streams = []
    try:
        long = dict(model="any", messages=[{"role": "user", "content": "go"}], max_tokens=16000, stream=True)
        running = client.chat.completions.create(**long)
        next(iter(running))  # it holds the only slot
        streams = [running, client.chat.completions.create(**long)]  # the second waits in the queue of one
        with pytest.raises(APIStatusError) as refused:
            client.chat.completions.create(**long)
        assert refused.value.status_code == 429 and "busy" in str(refused.value)
    finally:
        for stream in streams:
            stream.close()
        next(serving, None)


def test_an_engine_that_is_shutting_down_answers_503():
    from app.config import TINY_MODEL
    from conftest import _serve_app

    serving = _serve_app(TINY_MODEL, max_batch=1, queue_size=2)
    app = next(serving)
    try:
        app.engine.close()
        with pytest.raises(APIStatusError) as refused:
            OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0).chat.completions.create(
                model="any", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code == 503 and "shut down" in str(refused.value)
    finally:
        next(serving, None)


def test_a_picture_by_http_url_is_fetched(openai_client, tiny_app):
    from app.config import EXAMPLES_DIR

    url = f"{tiny_app.url}gradio_api/file={EXAMPLES_DIR / '1_red_circle.png'}"  # served by the app itself
    out = openai_client.chat.completions.create(model="any", temperature=0, max_tokens=12, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What color is the shape?"}]}])
    assert "red" in out.choices[0].message.content.lower()
