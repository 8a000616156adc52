"""The ZeroGPU engine under the `spaces` package's own ZeroGPU machinery, on this CPU: run as
`python tests/zerogpu_spaces_run.py CHECKPOINT TALKATIVE_CHECKPOINT`, it prints one JSON object
that tests/test_zerogpu.py checks.

`spaces` is imported with SPACES_ZERO_GPU=true, so `spaces.GPU` is its real decorator: each call
asks a device API for a GPU (`/schedule` with the call's duration), forks its worker process,
has it `/allow`ed, pickles the arguments into it and every yielded item out of it, stops it on
close through its stop event, and `/release`s. The device API is a local fake that grants every
call whose duration fits a quota and records what it was asked. The one part replaced is the
module that moves tensors between ZeroGPU's shared memory and a real GPU
(`spaces.zero.torch`): it needs CUDA, so here the model stays on the CPU.

A forward pre-hook fails every model forward that runs outside a ZeroGPU worker (the forked
process, while the fake API has it allowed for a scheduled call).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import types
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlparse

QUOTA_S = 10  # calls asking for more are refused, as for a user whose quota is spent


class FakeDeviceApi(BaseHTTPRequestHandler):
    """ZeroGPU's device API as `spaces.zero.api.APIClient` calls it, keeping a record of each call:
    the duration asked for, whether it was granted and released, the model forwards it ran."""

    calls: ClassVar[list[dict]] = []
    allowed: ClassVar[set[int]] = set()  # worker processes given the GPU (a reused worker stays allowed)
    lock = threading.Lock()

    def do_POST(self) -> None:
        url = urlparse(self.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        with self.lock:
            if url.path == "/schedule":
                seconds = int(query["durationSeconds"])
                call = {"duration": seconds, "granted": seconds <= QUOTA_S, "token": uuid.uuid4().hex,
                        "released": False, "failed": False, "forwards": 0}
                self.calls.append(call)
                if not call["granted"]:
                    return self._json(429, {"left": QUOTA_S, "wait": 300})
                return self._json(200, {"idle": True, "nvidiaIndex": 0, "nvidiaUUID": "GPU-fake",
                                        "allowToken": call["token"]})
            if url.path == "/allow":
                self.allowed.add(int(query["pid"]))
            elif url.path == "/release":
                call = next(c for c in self.calls if c["token"] == query["allowToken"])
                call["released"], call["failed"] = True, query["fail"] == "true"
        self._json(200, {})

    def do_GET(self) -> None:
        """`/forward?pid=`: a model forward is about to run in `pid`; answers whether that pid is an
        allowed worker while a call holds the GPU, and counts the forward to that call."""
        pid = int(parse_qs(urlparse(self.path).query)["pid"][0])
        with self.lock:
            holding = [c for c in self.calls if c["granted"] and not c["released"]]
            for call in holding:
                call["forwards"] += 1
            self._json(200, {"allowed": pid in self.allowed and bool(holding)})

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def no_gpu_tensor_moves() -> types.ModuleType:
    """`spaces.zero.torch` without CUDA: packing, moving and patching do nothing."""
    stub = types.ModuleType("spaces.zero.torch")
    for name in ("enter_mode", "patch", "unpatch", "init", "move"):
        setattr(stub, name, lambda *args, **kwargs: None)
    stub.pack = stub.size = lambda *args, **kwargs: 0
    stub.is_in_bad_fork = lambda: False
    return stub


def main(checkpoint: str, talkative: str) -> dict:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeDeviceApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_port}"
    os.environ.update(SPACES_ZERO_GPU="true", SPACES_ZERO_DEVICE_API_URL=api)
    sys.modules["spaces.zero.torch"] = no_gpu_tensor_moves()

    import httpx
    import spaces
    import spaces.zero.wrappers
    import torch
    from serving_oracle import Oracle, assistant, picture, user

    from serving import EngineError, GenerationSettings, PromptTooLong, ReplyStats
    from serving.engine import load_checkpoint
    from serving.zerogpu import ZeroGPUEngine

    torch.set_num_threads(1)  # the worker is forked: keep the parent's thread pools out of it
    outside: list[str] = []
    main_pid = os.getpid()

    def guard(model, step_s: float = 0.0) -> None:
        """Fail a forward outside a worker's scheduled call; `step_s` slows each step down, so
        that an answer that ignored Stop could not end before the test looks."""
        def check(module, args, kwargs):
            pid = os.getpid()
            if pid == main_pid or not spaces.zero.wrappers.forked or \
                    not httpx.get(f"{api}/forward", params={"pid": pid}).json()["allowed"]:
                outside.append(f"{type(module).__name__} in pid {pid}")
                raise RuntimeError("a model forward ran outside a ZeroGPU worker's scheduled call")
            time.sleep(step_s)

        model.register_forward_pre_hook(check, with_kwargs=True)
        for module in (model.vision_model, model.language_model.model):
            module.register_forward_pre_hook(
                lambda module, args, kwargs: None if spaces.zero.wrappers.forked else check(module, args, kwargs),
                with_kwargs=True)

    def white_pictures_break_the_tower(model) -> None:
        def check(module, args, kwargs):
            pixels = args[0] if args else kwargs["pixel_values"]
            if bool((pixels[:, :, 0] > 1.5).all()):  # the first tile (the others may be padding)
                raise RuntimeError("the vision tower broke on a white picture")

        model.vision_model.register_forward_pre_hook(check, with_kwargs=True)

    engine = ZeroGPUEngine.load(checkpoint, gpu=spaces.GPU, device="cpu", context_tokens=256)
    long_engine = ZeroGPUEngine.load(talkative, gpu=spaces.GPU, device="cpu", context_tokens=256)
    assert engine._gpu_call is not engine._run_on_gpu, "spaces.GPU did not wrap the call: not in ZeroGPU mode"
    guard(engine.model)
    guard(long_engine.model, step_s=0.05)
    white_pictures_break_the_tower(engine.model)
    oracle = Oracle(*load_checkpoint(checkpoint)[:2])
    long_oracle = Oracle(*load_checkpoint(talkative)[:2])
    greedy = GenerationSettings(max_new_tokens=12, temperature=0)
    results: dict = {}

    def record(name: str, messages, reply_ids, expected_oracle, count: int) -> None:
        expected = expected_oracle.answer(messages, count)
        results[name] = {"got": reply_ids, "expected": expected.token_ids, "margins": expected.margins}

    def run(name: str, messages, settings=greedy, target=engine, target_oracle=oracle):
        reply = target.chat(messages, settings)
        pieces = list(reply)
        assert isinstance(pieces[-1], ReplyStats)
        record(name, messages, reply.token_ids, target_oracle, settings.max_new_tokens)
        return "".join(pieces[:-1])

    question = [user("what color is the circle", picture(3, (2, 1)))]
    text = run("question", question)
    run("follow-up", question + [assistant(text), user("and how many")])

    stop_messages = [user("describe the picture", picture(8))]
    reply = long_engine.chat(stop_messages, GenerationSettings(max_new_tokens=60, temperature=0))
    for _ in reply:
        if len(reply.token_ids) >= 4:
            break
    reply.close()  # what Gradio does to the answer when the user presses Stop
    record("stop", stop_messages, reply.token_ids, long_oracle, len(reply.token_ids))

    failures: dict[str, str] = {}
    white = picture(1)
    white.paste((255, 255, 255), (0, 0, *white.size))
    for name, messages, settings in [
        ("inside the call", [user("what color", white)], greedy),
        ("quota", [user("describe the picture")], GenerationSettings(max_new_tokens=240, temperature=0)),
        ("too long", [user(" ".join(["red"] * 400))], greedy),
    ]:
        try:
            list(engine.chat(messages, settings))
            failures[name] = "no error"
        except (EngineError, PromptTooLong, RuntimeError) as error:
            failures[name] = f"{type(error).__name__}: {error}"
    run("after the failures", question)

    return {"results": results, "failures": failures, "outside": outside, "calls": FakeDeviceApi.calls,
            "main_pid": main_pid, "worker_pids": sorted(FakeDeviceApi.allowed)}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).parent.parent))
    print("RESULT " + json.dumps(main(*sys.argv[1:3])), flush=True)
