"""Serving on ZeroGPU, against a stand-in of its contract (tests/zerogpu_standin.py): every model
forward runs inside a GPU call (a guard on the model fails loudly otherwise), one call per
request, sized from the request, and the answers are those of generate() alone for the
conversation (tests/serving_oracle.py), for a request, a follow-up, a stopped answer and after
errors. Then the same under the `spaces` package's own ZeroGPU machinery
(tests/zerogpu_spaces_run.py, in a process of its own), and the page's `/ask` on this engine
through gradio_client."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import free_port
from engine_checkpoint import write_engine_checkpoint, write_talkative_checkpoint
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from serving_oracle import (
    Answer,
    Oracle,
    assert_same_answer,
    assistant,
    picture,
    user,
    words,
)
from zerogpu_standin import NoGpu, StandInZeroGPU, text_model

from app.answering import read_picture
from app.config import AppConfig, on_zero_gpu, parse_config
from serving import EngineError, GenerationSettings, PromptTooLong, ReplyStats
from serving.engine import load_checkpoint
from serving.zerogpu import GpuTime, ZeroGPUEngine

NEW = 12
GREEDY = GenerationSettings(max_new_tokens=NEW, temperature=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_engine_checkpoint(tmp_path_factory.mktemp("zerogpu_ck"))


def guarded_engine(folder, zerogpu: StandInZeroGPU, **options) -> ZeroGPUEngine:
    engine = ZeroGPUEngine.load(str(folder), gpu=zerogpu.GPU, device="cpu", context_tokens=256, **options)
    zerogpu.guard(engine.model)
    return engine


@pytest.fixture(scope="module")
def zerogpu():
    return StandInZeroGPU()


@pytest.fixture(scope="module")
def engine(folder, zerogpu):
    engine = guarded_engine(folder, zerogpu)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def oracle(folder):
    """generate() alone on its own copy of the checkpoint (the engine's copy is guarded)."""
    model, processor, _ = load_checkpoint(str(folder))
    return Oracle(model, processor)


@pytest.fixture(autouse=True)
def no_forward_outside_a_gpu_call(zerogpu):
    yield
    assert not zerogpu.offences, f"model forwards ran without a GPU: {zerogpu.offences}"
    assert zerogpu.open_calls == 0, "a GPU call is still open after the test's answers ended"


def ask(engine, messages, settings=GREEDY) -> tuple[list[int], str, ReplyStats]:
    reply = engine.chat(messages, settings)
    pieces = list(reply)
    assert isinstance(pieces[-1], ReplyStats)
    return reply.token_ids, "".join(pieces[:-1]), pieces[-1]


def test_zero_gpu_is_recognised_as_the_spaces_package_recognises_it():
    from spaces.config import boolean

    for value in ["true", "True", "TRUE", "1", "t", "T", "false", "0", "", "yes", "on"]:
        assert on_zero_gpu({"SPACES_ZERO_GPU": value}) == boolean(value), value
        assert parse_config([], {"SPACES_ZERO_GPU": value}).zero_gpu == boolean(value), value
    assert not parse_config([], {}).zero_gpu


def test_the_guard_fails_a_forward_outside_every_gpu_call(folder):
    zerogpu = StandInZeroGPU()
    engine = guarded_engine(folder, zerogpu)
    with pytest.raises(NoGpu):
        engine.model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    assert zerogpu.offences


def test_a_question_and_its_follow_up_each_run_in_one_gpu_call_and_answer_like_generate_alone(
        engine, zerogpu, oracle):
    rng = random.Random(3)
    first = [user(words(rng, 4, 12), picture(5, (2, 1)))]
    before = len(zerogpu.calls)
    ids, text, stats = ask(engine, first)
    assert_same_answer(ids, oracle.answer(first, NEW), "a question about a picture")
    follow_up = first + [assistant(text), user(words(rng, 4, 12))]
    ids_2, _, stats_2 = ask(engine, follow_up)
    assert_same_answer(ids_2, oracle.answer(follow_up, NEW), "its follow-up")
    text_only = [user(words(rng, 4, 12))]
    ids_3, _, _ = ask(engine, text_only)
    assert_same_answer(ids_3, oracle.answer(text_only, NEW), "a question without a picture")

    calls = zerogpu.calls[before:]
    assert len(calls) == 3, "one GPU call per answer"
    # generate(): one forward for the prompt (and picture), one per further token
    assert [c.forwards for c in calls] == [len(ids), len(ids_2), len(ids_3)]
    assert [c.items for c in calls] == [len(ids), len(ids_2), len(ids_3)], "every token streamed as sampled"
    assert stats.prompt_tokens == len(oracle.prompt_ids(first))
    assert stats_2.prompt_tokens == len(oracle.prompt_ids(follow_up))
    assert stats_2.cached_prompt_tokens == 0, "each call prefills its whole conversation"


def test_seeded_sampling_answers_like_generate_alone_with_that_seed(engine, oracle):
    messages = [user("what color is the circle", picture(11))]
    settings = GenerationSettings(max_new_tokens=NEW, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    ids, _, _ = ask(engine, messages, settings)
    expected = oracle.answer(messages, NEW, do_sample=True, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    assert ids == expected.token_ids


def test_each_call_asks_for_more_time_for_a_longer_prompt_a_picture_and_more_new_tokens(folder):
    zerogpu = StandInZeroGPU()
    timing = GpuTime(start_s=1, per_prompt_token_s=0.1, per_tile_s=2, per_new_token_s=1, most_s=40)
    engine = guarded_engine(folder, zerogpu, gpu_time=timing)
    short, long = "red circle", " ".join(["red circle blue square"] * 10)

    def duration(messages, max_new_tokens):
        list(engine.chat(messages, GenerationSettings(max_new_tokens=max_new_tokens, temperature=0)))
        return zerogpu.calls[-1].duration

    base = duration([user(short)], 4)
    assert duration([user(long)], 4) > base
    assert duration([user(short, picture(2, (2, 2)))], 4) > base
    assert duration([user(short)], 8) > base
    assert all(call.duration <= timing.most_s for call in zerogpu.calls)
    assert not zerogpu.offences


def test_an_answer_longer_than_the_longest_call_is_cut_to_fit_it(tmp_path):
    zerogpu = StandInZeroGPU()
    timing = GpuTime(start_s=1, per_prompt_token_s=0.01, per_tile_s=0.5, per_new_token_s=1, most_s=30)
    engine = guarded_engine(write_talkative_checkpoint(tmp_path / "talkative"), zerogpu, gpu_time=timing)
    messages = [user("describe the picture", picture(4))]
    ids, _, stats = ask(engine, messages, GenerationSettings(max_new_tokens=200, temperature=0))
    assert 0 < len(ids) < 30 and stats.finish_reason == "length"
    assert zerogpu.calls[-1].duration <= timing.most_s
    expected = Oracle(*load_checkpoint(str(tmp_path / "talkative"))[:2]).answer(messages, len(ids))
    assert_same_answer(ids, expected, "an answer cut to the call's time")


@pytest.fixture(scope="module")
def talkative(tmp_path_factory, zerogpu):
    """An engine (guarded by the same stand-in) on a checkpoint without an end token, and its oracle."""
    folder = write_talkative_checkpoint(tmp_path_factory.mktemp("zerogpu_talkative"))
    engine = guarded_engine(folder, zerogpu)
    yield engine, Oracle(*load_checkpoint(str(folder))[:2])
    engine.close()


def test_stop_ends_the_gpu_call_after_the_step_in_progress_and_keeps_what_was_said(talkative, zerogpu,
                                                                                   monkeypatch):
    """The decode step after the fifth token waits until the GPU call is told to stop, so the
    answer has exactly five tokens when Stop comes, and the call may end before that step or
    after it, but runs no other."""
    engine, oracle = talkative
    stops = []
    generate = engine.model.generate

    def generate_telling_its_stop_flag(*args, **kwargs):
        stops.append(kwargs["stop"])
        return generate(*args, **kwargs)

    def sixth_step_waits_for_stop(module, args, kwargs):
        if zerogpu.calls[-1].forwards > 5:
            assert stops[-1].wait(60), "the GPU call was never told to stop"

    monkeypatch.setattr(engine.model, "generate", generate_telling_its_stop_flag)
    gate = engine.model.register_forward_pre_hook(sixth_step_waits_for_stop, with_kwargs=True)
    try:
        messages = [user("describe the picture", picture(9))]
        cancel = threading.Event()
        reply = engine.chat(messages, GenerationSettings(max_new_tokens=200, temperature=0), cancel=cancel)
        for _ in reply:
            if len(reply.token_ids) >= 5:
                break
        stopper = threading.Thread(target=cancel.set)  # the page's Stop runs in another request's thread
        stopper.start()
        stopper.join()
        rest = list(reply)
    finally:
        gate.remove()
    assert isinstance(rest[-1], ReplyStats) and rest[-1].finish_reason == "cancelled"
    said = reply.token_ids
    assert len(said) == 5 and rest[-1].tokens == 5
    call = zerogpu.calls[-1]
    assert call.ended and call.forwards in (5, 6), "the call ended, at most after the step in progress"
    assert_same_answer(said, oracle.answer(messages, len(said)), "the answer until Stop")


def test_closing_the_reply_ends_its_gpu_call(talkative, zerogpu):
    engine, _ = talkative
    reply = engine.chat([user("describe")], GenerationSettings(max_new_tokens=200, temperature=0))
    next(reply)
    reply.close()
    assert zerogpu.calls[-1].ended and zerogpu.calls[-1].forwards < 200
    assert reply.wait(0) is None or reply.wait(0).finish_reason == "cancelled"


def test_an_over_long_prompt_is_refused_before_asking_for_a_gpu(engine, zerogpu):
    before = len(zerogpu.calls)
    with pytest.raises(PromptTooLong, match="Your message is [0-9,]+ tokens long"):
        engine.chat([user(" ".join(["red"] * 400))], GREEDY)
    assert len(zerogpu.calls) == before


def test_a_failure_inside_the_gpu_call_reaches_the_caller_with_its_message(engine, zerogpu, oracle):
    def broken_tower(module, args, kwargs):
        raise RuntimeError("the vision tower broke")

    hook = engine.model.vision_model.register_forward_pre_hook(broken_tower, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="the vision tower broke"):
            ask(engine, [user("what color", picture(6))])
    finally:
        hook.remove()
    assert zerogpu.calls[-1].ended
    messages = [user("what color", picture(6))]
    ids, _, _ = ask(engine, messages)
    assert_same_answer(ids, oracle.answer(messages, NEW), "the answer after a failed one")


def test_running_out_of_gpu_memory_says_what_to_do(engine):
    def out_of_memory(module, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = text_model(engine.model).register_forward_pre_hook(out_of_memory, with_kwargs=True)
    try:
        with pytest.raises(EngineError, match="ran out of memory .* try a shorter conversation"):
            ask(engine, [user("hello")])
    finally:
        hook.remove()


def test_a_user_out_of_quota_gets_zerogpus_message_and_no_forward_runs(folder):
    zerogpu = StandInZeroGPU(quota_s=3)
    engine = guarded_engine(folder, zerogpu)
    with pytest.raises(EngineError, match=r"exceeded your free ZeroGPU quota \(\d+s requested vs. 3s left\)"):
        ask(engine, [user("hello")])
    assert zerogpu.calls == [] and not zerogpu.offences


def test_a_call_zerogpu_takes_back_keeps_what_was_said_and_says_what_happened(tmp_path):
    zerogpu = StandInZeroGPU(abort_after=3)
    folder = write_talkative_checkpoint(tmp_path / "talkative")
    engine = guarded_engine(folder, zerogpu)
    messages = [user("describe the picture", picture(12))]
    reply = engine.chat(messages, GenerationSettings(max_new_tokens=50, temperature=0))
    with pytest.raises(EngineError, match=r"taken back before the answer finished \(GPU task aborted\)"):
        list(reply)
    assert len(reply.token_ids) == 3 and zerogpu.calls[-1].ended and not zerogpu.offences
    expected = Oracle(*load_checkpoint(str(folder))[:2]).answer(messages, 3)
    assert_same_answer(reply.token_ids, expected, "the answer until the GPU was taken back")


# --- under the spaces package's own ZeroGPU machinery --------------------------------------------

def test_under_the_spaces_packages_own_zerogpu_machinery_answers_stop_and_failures_hold(folder, tmp_path):
    """tests/zerogpu_spaces_run.py, in its own process (importing `spaces` in ZeroGPU mode changes
    that process for good): the real `spaces.GPU` forks its worker, pickles across, stops and
    releases, against a fake device API; only the moving of tensors onto a real GPU is left out."""
    talkative = write_talkative_checkpoint(tmp_path / "talkative")
    script = Path(__file__).parent / "zerogpu_spaces_run.py"
    done = subprocess.run([sys.executable, str(script), str(folder), str(talkative)], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parent.parent, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"the run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    run = json.loads(lines[-1][len("RESULT "):])

    assert run["outside"] == [], "model forwards ran outside a ZeroGPU worker's call"
    assert run["worker_pids"] and run["main_pid"] not in run["worker_pids"]
    for name, result in run["results"].items():
        assert_same_answer(result["got"], Answer(result["expected"], result["margins"]), name)
    assert len(run["results"]["stop"]["got"]) == 4

    failures = run["failures"]
    assert failures["inside the call"] == "RuntimeError: the vision tower broke on a white picture"
    assert failures["quota"].startswith("EngineError: Space app has reached its GPU limit")
    assert failures["too long"].startswith("PromptTooLong:")

    calls = run["calls"]  # question, follow-up, stop, failure inside, quota (refused), after the failures
    assert [c["granted"] for c in calls] == [True, True, True, True, False, True], "one call per answer"
    assert all(c["released"] and not c["failed"] for c in calls if c["granted"])
    assert calls[4]["forwards"] == 0
    question, follow_up, stop = calls[:3]
    assert question["forwards"] == len(run["results"]["question"]["got"])
    assert follow_up["forwards"] == len(run["results"]["follow-up"]["got"])
    # The worker notices Stop when its next token is out; each of its steps is slowed down, so an
    # answer that ignored Stop would still be running its 60 tokens.
    assert stop["forwards"] < 60
    assert stop["duration"] > question["duration"], "60 new tokens ask for more time than 12"


# --- the page's /ask on this engine ---------------------------------------------------------------

@pytest.fixture(scope="module")
def zerogpu_app(folder, zerogpu):
    from app.server import launch
    from app.ui import build_demo
    from app.zerogpu import load_zerogpu_engine

    config = AppConfig(model=str(folder), max_new_tokens=64, context_tokens=256, max_batch=2, queue_size=8,
                       zero_gpu=True)
    engine = load_zerogpu_engine(config, gpu=zerogpu.GPU, device="cpu")
    assert isinstance(engine, ZeroGPUEngine)
    zerogpu.guard(engine.model)
    demo = build_demo(engine, config)
    _, url, _ = launch(demo, config, engine, server_port=free_port(), prevent_thread_lock=True, quiet=True)
    client = Client(url, verbose=False)
    yield client, engine
    client.close()
    demo.close()
    engine.close()


def test_ask_answers_in_one_gpu_call_what_generate_alone_answers(zerogpu_app, zerogpu, oracle, tmp_path):
    client, engine = zerogpu_app
    path = tmp_path / "picture.png"
    picture(21, (1, 2)).save(path)
    question = "what color is the square"
    before = len(zerogpu.calls)
    answer = client.predict(handle_file(str(path)), question, NEW, 0, 1.0, None, api_name="/ask")
    largest = engine.info.tile_size * engine.info.max_tiles
    messages = [user(question, read_picture(str(path), largest))]
    expected = oracle.answer(messages, NEW)
    assert answer == oracle.processor.tokenizer.decode(expected.token_ids, skip_special_tokens=True)
    assert answer, "the oracle's answer is empty: the comparison says little"
    assert len(zerogpu.calls) == before + 1 and zerogpu.calls[-1].forwards == len(expected.token_ids)


def test_ask_with_an_unreadable_picture_says_so_without_asking_for_a_gpu(zerogpu_app, zerogpu, tmp_path):
    client, _ = zerogpu_app
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of a real picture")
    before = len(zerogpu.calls)
    with pytest.raises(AppError, match="not an image|could not be decoded"):
        client.predict(handle_file(str(broken)), "what color", NEW, 0, 1.0, None, api_name="/ask")
    assert len(zerogpu.calls) == before


def test_quantized_weights_are_refused_on_zerogpu_with_what_to_do(folder, zerogpu, capsys):
    from app.zerogpu import load_zerogpu_engine

    config = AppConfig(model=str(folder), quantize="int8", zero_gpu=True)
    assert load_zerogpu_engine(config, gpu=zerogpu.GPU, device="cpu") is None
    assert "MLLAMA_QUANTIZE=int8 is not used on ZeroGPU" in capsys.readouterr().err
