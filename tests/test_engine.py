"""The chat engine under concurrency: continuous batching must not change anyone's answer."""
from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from engine_checkpoint import write_engine_checkpoint
from model.engine import ChatEngine, EngineBusy, EngineError, GenerationSettings, PromptTooLong, ReplyStats

GREEDY = GenerationSettings(max_new_tokens=12, temperature=0)
WORDS = "what color shape how many describe the image picture red green blue circle square".split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_engine_checkpoint(tmp_path_factory.mktemp("engine_ck"))


@pytest.fixture(scope="module")
def engine(folder):
    engine = ChatEngine.load(str(folder), max_batch=8, queue_size=128, context_tokens=256)
    yield engine
    engine.close()


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def conversation(seed: int, with_image: bool = True) -> list[dict]:
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    content = [{"type": "text", "text": text}]
    if with_image:
        content.insert(0, {"type": "image", "image": picture(seed)})
        return [{"role": "user", "content": content}]
    return [{"role": "user", "content": text}]


def reply(engine, messages, settings=GREEDY, **kwargs) -> tuple[str, ReplyStats]:
    items = list(engine.chat(messages, settings, **kwargs))
    assert isinstance(items[-1], ReplyStats)
    return "".join(items[:-1]), items[-1]


def replies_at_once(engine, convs) -> list[str]:
    """All conversations submitted at the same moment, one thread each."""
    barrier = threading.Barrier(len(convs))

    def together(c):
        barrier.wait()
        return reply(engine, c)[0]

    with ThreadPoolExecutor(len(convs)) as pool:
        return list(pool.map(together, convs))


def test_eight_simultaneous_requests_give_their_solo_answers(engine):
    convs = [conversation(seed) for seed in range(8)]
    alone = [reply(engine, c)[0] for c in convs]
    assert len(set(alone)) > 1, "different pictures and prompts should give different answers"
    assert replies_at_once(engine, convs) == alone


def test_compiled_fixed_shape_decoding_gives_the_eager_answers(engine, folder, caplog):
    """The GPU configuration of the engine (fixed-shape slot buckets through torch.compile; on
    a GPU also CUDA graphs) answers exactly like the eager engine, alone and together, with and
    without pictures, and a follow-up still reuses the picture's K/V. Every bucket is compiled
    while loading, none while serving."""
    convs = [conversation(seed, with_image=seed % 3 != 0) for seed in range(30, 36)]
    alone = [reply(engine, c)[0] for c in convs]
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = ChatEngine.load(str(folder), max_batch=4, queue_size=16, context_tokens=256, compile=True)
    warmed_up = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    try:
        with caplog.at_level("WARNING"):
            assert compiled.scheduler.cache.static
            assert [reply(compiled, c)[0] for c in convs[:2]] == alone[:2]
            assert replies_at_once(compiled, convs) == alone  # 6 requests, 4 slots: buckets 1, 2 and 4
            first, follow = convs[1], convs[1] + [{"role": "assistant", "content": alone[1]},
                                                  {"role": "user", "content": "how many"}]
            runs = compiled.scheduler.vision_runs
            reply(compiled, first, session_id="c")
            assert reply(compiled, follow, session_id="c")[0] == reply(engine, follow)[0]
            assert compiled.scheduler.vision_runs == runs + 1, "the follow-up must reuse the picture's K/V"
        assert not [r for r in caplog.records if "compile failed" in r.getMessage()], "decoding fell back to eager"
        compilations = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
        assert warmed_up == compilations == 3, (
            f"loading compiles each bucket of slots (1, 2, 4) once, serving nothing more: {warmed_up}, {compilations}")
    finally:
        compiled.close()


def test_a_model_spread_over_devices_decodes_eagerly_even_when_compile_is_asked(engine):
    """Full-graph compilation and CUDA graphs need the whole model on one device."""
    from model.scheduler import Scheduler, batched_decode_step

    model = engine.model
    assert "hf_device_map" not in model.__dict__, "the fixture's model sits on the CPU alone"
    model.hf_device_map = {"language_model": "cpu", "vision_model": "disk"}
    try:
        scheduler = Scheduler(model, max_batch=2, capacity=64, queue_size=2, compile=True)
        scheduler.close()
        assert not scheduler.cache.static and scheduler._step is batched_decode_step
    finally:
        del model.hf_device_map


def test_cancelling_one_request_leaves_the_others_alone(engine):
    convs = [conversation(seed) for seed in range(10, 14)]
    long = GenerationSettings(max_new_tokens=40, temperature=0)
    alone = [reply(engine, c, long)[0] for c in convs]
    cancel = threading.Event()

    def run(i):
        if i != 0:
            return reply(engine, convs[i], long)[0]
        pieces = []
        for item in engine.chat(convs[0], long, cancel=cancel):
            if isinstance(item, ReplyStats):
                return item
            pieces.append(item)
            if len(pieces) == 3:
                cancel.set()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert results[0].finish_reason == "cancelled" and results[0].tokens < 40
    assert results[1:] == alone[1:]


def test_closing_the_stream_stops_the_request(engine):
    stream = engine.chat(conversation(20), GenerationSettings(max_new_tokens=200, temperature=0))
    next(stream)
    stream.close()  # what Gradio does when the user presses Stop or leaves
    assert reply(engine, conversation(21))[1].finish_reason == "length", "the engine should serve the next request"


def test_hundred_mixed_requests_finish_with_nothing_lost_or_crossed(engine):
    prompts = {seed: conversation(seed, with_image=seed % 3 != 0) for seed in range(100, 110)}
    expected = {seed: reply(engine, c)[0] for seed, c in prompts.items()}
    rng = random.Random(0)
    plan = [(rng.choice(list(prompts)), rng.random() < 0.2) for _ in range(100)]

    def run(job):
        seed, cancel_early = job
        cancel = threading.Event()
        pieces = []
        for item in engine.chat(prompts[seed], GREEDY, cancel=cancel):
            if isinstance(item, ReplyStats):
                return seed, "".join(pieces), item
            pieces.append(item)
            if cancel_early and len(pieces) == 2:
                cancel.set()

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, plan))
    assert len(results) == 100
    for (seed, cancel_early), (got_seed, text, stats) in zip(plan, results):
        assert got_seed == seed
        if stats.finish_reason == "cancelled":
            assert cancel_early and expected[seed].startswith(text), "a cancelled reply must be a prefix of its answer"
        else:
            assert text == expected[seed], f"request {seed} got someone else's or a damaged answer"


def test_follow_up_question_reuses_the_image_keys_and_values(engine):
    calls = []
    hook = engine.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        image = picture(7)
        first = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "describe"}]}]
        answer, _ = reply(engine, first, session_id="s1")
        follow = first + [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                          {"role": "user", "content": [{"type": "text", "text": "how many"}]}]
        reused, _ = reply(engine, follow, session_id="s1")
        assert len(calls) == 1, "the follow-up must not run the vision tower again"
        fresh, _ = reply(engine, follow)  # no session: computed from the pixels
        assert len(calls) == 2
        assert reused == fresh, "reused image K/V must give the same answer"
    finally:
        hook.remove()


def test_full_queue_answers_busy(folder):
    engine = ChatEngine.load(str(folder), max_batch=1, queue_size=1, context_tokens=256)
    try:
        slow = GenerationSettings(max_new_tokens=250, temperature=0)
        first = engine.chat(conversation(1), slow)
        next(first)  # running in the only slot
        stop_second = threading.Event()
        second = engine.chat(conversation(2), slow, cancel=stop_second)

        def drain():  # waits in the queue; ends cancelled, or with the shut-down error
            try:
                list(second)
            except EngineError:
                pass

        threading.Thread(target=drain, daemon=True).start()
        for _ in range(200):
            if engine.scheduler.waiting.qsize() == 1:
                break
            threading.Event().wait(0.01)
        with pytest.raises(EngineBusy, match="busy"):
            next(engine.chat(conversation(3), slow))
        first.close()
        stop_second.set()
    finally:
        engine.close()


def test_conversation_longer_than_the_context_is_refused(engine):
    long = [{"role": "user", "content": "red " * 400}]
    with pytest.raises(PromptTooLong, match="Undo a few turns or clear the chat"):
        next(engine.chat(long, GREEDY))


def test_more_than_one_picture_is_refused(engine):
    two = [{"role": "user", "content": [{"type": "image", "image": picture(1)}, {"type": "image", "image": picture(2)},
                                         {"type": "text", "text": "compare"}]}]
    with pytest.raises(EngineError, match="one picture at a time"):
        next(engine.chat(two, GREEDY))


def test_seeded_sampling_is_reproducible_under_load(engine):
    settings = GenerationSettings(max_new_tokens=15, temperature=1.0, top_p=1.0, seed=5)
    alone = reply(engine, conversation(30), settings)[0]
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(reply, engine, conversation(31 + i)) for i in range(3)]
        again = reply(engine, conversation(30), settings)[0]
        [f.result() for f in others]
    assert again == alone


def test_follow_up_question_reads_only_the_new_tokens(engine):
    """The unchanged start of the conversation keeps its self-attention K/V."""
    fed = []
    hook = engine.model.language_model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: fed.append(args[0].shape[1])
    )
    try:
        first = [{"role": "user", "content": "what color is the shape"}]
        answer, stats = reply(engine, first, session_id="s2")
        follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "how many"}]
        fed.clear()
        reused, follow_stats = reply(engine, follow, session_id="s2")
        prefill = fed[0]
        assert prefill < follow_stats.prompt_tokens - stats.prompt_tokens + 2, (
            f"the follow-up prefill read {prefill} of {follow_stats.prompt_tokens} tokens"
        )
        assert reused == reply(engine, follow)[0], "reused K/V must give the same answer"
    finally:
        hook.remove()


def test_tiny_model_answers_eight_users_at_once_as_it_answers_each_alone():
    """The same property on the shipped tiny model, with real pictures and questions."""
    from pathlib import Path

    from scripts import synthetic

    tiny = Path(__file__).resolve().parents[1] / "assets" / "tiny-mllama"
    engine = ChatEngine.load(str(tiny), max_batch=8, queue_size=16, context_tokens=512)
    try:
        rng = random.Random(11)
        questions = ["What color is the shape?", "What shape is this?", "How many shapes are there?",
                     "Describe the image."]
        convs = []
        for i in range(8):
            sample = synthetic.make_sample(rng)
            text = questions[i % 4] + (" Please answer briefly." if i >= 4 else "")
            convs.append([{"role": "user", "content": [{"type": "image", "image": sample.image},
                                                       {"type": "text", "text": text}]}])
        alone = [reply(engine, c)[0] for c in convs]
        assert replies_at_once(engine, convs) == alone
    finally:
        engine.close()
