"""What the front end says when its --backend server misbehaves, against a stand-in server that
answers /v1 with a chosen failure over real HTTP."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from serving import EngineBusy, EngineError
from serving.remote import RemoteEngine


@pytest.fixture(scope="module")
def misbehaving():
    """A server whose /v1/chat/completions fails as the model name asks: 'busy', 'broken',
    'slow', 'blind' (refuses pictures)."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "busy", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        failure = body["model"]
        if failure == "slow":
            await asyncio.sleep(5)
        status, message = {"busy": (429, "too many requests"), "broken": (500, "out of memory"),
                           "blind": (400, "this model does not take image_url parts")}.get(failure, (500, "?"))
        return JSONResponse({"error": {"message": message, "type": "x"}}, status_code=status)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


PICTURE = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


@pytest.mark.parametrize("model, kind, message", [
    ("busy", EngineBusy, "is busy \\(429\\)"),
    ("broken", EngineError, "failed \\(500\\): out of memory"),
    ("blind", EngineError, "refused the request: this model does not take image_url parts.*without vision"),
    ("slow", EngineError, "did not answer in time"),
])
def test_each_failure_of_the_server_is_explained(misbehaving, model, kind, message):
    engine = RemoteEngine(misbehaving, model=model, timeout_s=1)
    with pytest.raises(kind, match=message):
        engine.chat(PICTURE)
    engine.close()


def test_the_first_listed_model_is_used_when_none_is_named(misbehaving):
    assert RemoteEngine(misbehaving).model == "busy"
