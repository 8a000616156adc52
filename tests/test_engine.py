"""The chat engine against its oracle: every answer equals what generate() alone gives for that
conversation, whatever else is being served (tests/serving_oracle.py says how it compares)."""
from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine_checkpoint import write_engine_checkpoint
from serving import ChatEngine, EngineBusy, EngineError, GenerationSettings, PromptTooLong, ReplyStats
from serving_oracle import Oracle, assert_same_answer, assistant, horizon, picture, user, words

NEW = 12
GREEDY = GenerationSettings(max_new_tokens=NEW, temperature=0)
ASPECTS = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 3)]  # tile grids of the test checkpoint (4 tiles at most)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_engine_checkpoint(tmp_path_factory.mktemp("engine_ck"))


@pytest.fixture(scope="module")
def engine(folder):
    engine = ChatEngine.load(str(folder), max_batch=4, queue_size=128, context_tokens=256)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def oracle(engine):
    return Oracle(engine.model, engine.processor)


def ask(engine, messages, settings=GREEDY, session_id=None) -> tuple[list[int], str, ReplyStats]:
    reply = engine.chat(messages, settings, session_id=session_id)
    pieces = list(reply)
    assert isinstance(pieces[-1], ReplyStats)
    return reply.token_ids, "".join(pieces[:-1]), pieces[-1]


# --- the oracle harness ----------------------------------------------------------------------

def scripts(seed: int, count: int) -> list[list[str]]:
    """Conversation plans: which kind each turn is. More conversations than slots, so requests
    join and leave a running batch; follow-ups and new pictures run in the same session."""
    rng = random.Random(seed)
    kinds = [["text"], ["picture"], ["picture", "follow-up"], ["text", "follow-up"],
             ["picture", "new picture"], ["picture", "follow-up", "new picture"]]
    return [kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds) for i in range(count)]


def run_conversation(engine, plan: list[str], seed: int, start: threading.Barrier) -> list[tuple[list, list[int], ReplyStats]]:
    """Play one conversation turn by turn (a turn starts when the last one has answered)."""
    rng = random.Random(seed)
    messages: list[dict] = []
    turns = []
    start.wait()
    for turn, kind in enumerate(plan):
        if kind in ("picture", "new picture"):
            image = picture(seed * 10 + turn, ASPECTS[rng.randrange(len(ASPECTS))])
            messages = [user(words(rng, 1, 20), image)]  # a new picture starts a new thread
        else:
            messages = messages + [user(words(rng, 1, 20))]
        ids, text, stats = ask(engine, messages, session_id=f"conversation-{seed}")
        turns.append((messages, ids, stats))
        messages = messages + [assistant(text)]
    return turns


def check_mix(engine, oracle, seed: int, count: int) -> dict:
    plans = scripts(seed, count)
    start = threading.Barrier(count)
    with ThreadPoolExecutor(count) as pool:
        played = list(pool.map(lambda i: run_conversation(engine, plans[i], seed * 100 + i, start), range(count)))
    compared = total = 0
    kinds = {}
    for plan, turns in zip(plans, played):
        for kind, (messages, ids, stats) in zip(plan, turns):
            expected = oracle.answer(messages, NEW)
            assert_same_answer(ids, expected, f"{kind} turn of {plan}")
            compared += horizon(expected)
            total += len(expected.token_ids)
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == "follow-up":
                assert stats.cached_prompt_tokens > 0, "a follow-up reuses the K/V of its conversation"
            if kind == "new picture":
                assert stats.cached_prompt_tokens == 0, "a new picture starts over"
    assert compared >= 0.9 * total, f"only {compared} of {total} tokens had a clear choice: the test says little"
    return kinds


def test_every_answer_equals_generate_alone_whatever_the_batch(engine, oracle):
    kinds = check_mix(engine, oracle, seed=1, count=10)
    assert set(kinds) == {"text", "picture", "follow-up", "new picture"}


def test_fixed_shape_engine_answers_like_generate_alone(folder, caplog):
    """The GPU configuration (power-of-two buckets of slots through torch.compile; on a GPU also
    CUDA graphs): every bucket is compiled while loading, none while serving, and the buffers a
    captured graph replays on never move."""
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = ChatEngine.load(str(folder), max_batch=4, queue_size=32, context_tokens=256, compile=True)
    warmed_up = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    try:
        assert compiled.runner.static and compiled.runner.buckets() == [1, 2, 4]
        addresses = [t.data_ptr() for t in compiled.runner.cache.buffers()]
        with caplog.at_level("WARNING"):
            check_mix(compiled, Oracle(compiled.model, compiled.processor), seed=2, count=8)
        assert not [r for r in caplog.records if "compile failed" in r.getMessage()], "decoding fell back to eager"
        compilations = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
        assert warmed_up == compilations == 3, (
            f"loading compiles each bucket of slots (1, 2, 4) once, serving nothing more: {warmed_up}, {compilations}")
        assert [t.data_ptr() for t in compiled.runner.cache.buffers()] == addresses, "a cache buffer was replaced"
    finally:
        compiled.close()


@pytest.mark.parametrize("semantics", ["meta", "transformers"])
def test_a_text_only_answer_does_not_depend_on_who_else_is_served(engine, oracle, semantics):
    """A row without a picture passes the cross-attention layers unchanged, in both semantics,
    alone in a step, next to text-only rows and next to rows with a picture: its logits at every
    step are generate()'s alone, up to float32 rounding."""
    engine.model.config.semantics = semantics
    seen: dict[tuple, list[torch.Tensor]] = {}
    sample = engine.runner._sample

    def recording(request, logits):
        seen.setdefault(tuple(request.prompt_ids), []).append(logits[0].clone())
        return sample(request, logits)

    engine.runner._sample = recording
    try:
        rng = random.Random(5)
        text = [user(words(rng, 3, 15))]
        mates = [[user(words(rng), picture(60 + i))] if i % 2 else [user(words(rng))] for i in range(3)]
        start = threading.Barrier(4)

        def together(messages):
            start.wait()
            return ask(engine, messages)[0]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(together, [text, *mates]))
        expected = oracle.answer(text, NEW)
        assert_same_answer(results[0], expected, "with batch mates")
        got = seen[tuple(oracle.prompt_ids(text))]
        assert len(got) == len(expected.logits) == NEW
        for step, (ours, alone) in enumerate(zip(got, expected.logits)):
            torch.testing.assert_close(ours, alone, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    finally:
        engine.runner._sample = sample
        engine.model.config.semantics = "meta"


def test_text_only_answers_equal_transformers(folder, engine, oracle):
    """With no picture at all, both semantics are transformers' behaviour."""
    from transformers import MllamaForConditionalGeneration as Reference

    reference = Reference.from_pretrained(str(folder)).eval()
    rng = random.Random(9)
    for _ in range(3):
        messages = [user(words(rng, 2, 16))]
        inputs = engine.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True, return_tensors="pt")
        with torch.no_grad():
            theirs = reference.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                        max_new_tokens=NEW, do_sample=False)
        theirs = theirs[0, inputs["input_ids"].shape[1]:].tolist()
        expected = oracle.answer(messages, NEW)
        h = horizon(expected)
        assert theirs[:h] == expected.token_ids[:h], "generate() alone must equal transformers on text"
        assert_same_answer(ask(engine, messages)[0], expected, "text-only")


def test_seeded_sampling_gives_the_same_tokens_whatever_the_batch_mates(engine, oracle):
    settings = GenerationSettings(max_new_tokens=15, temperature=1.0, top_p=1.0, seed=5)
    messages = [user("describe the picture", picture(30))]
    alone = ask(engine, messages, settings)[0]
    rng = random.Random(3)
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(ask, engine, [user(words(rng), picture(31 + i))]) for i in range(3)]
        again = ask(engine, messages, settings)[0]
        [f.result() for f in others]
    assert again == alone
    expected = oracle.answer(messages, 15, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=5)
    assert alone == expected.token_ids, "the engine samples as generate() does with the same seed"


# --- follow-ups, pictures, leaving -------------------------------------------------------------

def test_a_follow_up_reuses_exactly_the_tokens_the_model_has_read(engine, oracle):
    """The previous prompt and every reply token but the last (which was sampled, never fed) are
    reused; the follow-up's prefill runs only the rest."""
    fed = []
    hook = engine.model.language_model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: fed.append(args[0].shape[1]))
    try:
        first = [user("what color is the shape", picture(7))]
        ids, text, _ = ask(engine, first, session_id="reuse")
        follow = first + [assistant(text), user("how many")]
        previous = oracle.prompt_ids(first) + ids[:-1]
        prompt = oracle.prompt_ids(follow)
        common = next((i for i, (a, b) in enumerate(zip(previous, prompt)) if a != b), len(previous))
        assert common > len(oracle.prompt_ids(first)), "the reply's tokens come back in the follow-up"
        fed.clear()
        got, _, stats = ask(engine, follow, session_id="reuse")
        assert stats.cached_prompt_tokens == common, f"reused {stats.cached_prompt_tokens} tokens, {common} were read"
        assert fed[0] == len(prompt) - common, "the prefill reads only the tokens that were not reused"
        assert_same_answer(got, oracle.answer(follow, NEW), "follow-up")
    finally:
        hook.remove()


def test_a_follow_up_does_not_run_the_vision_tower_again(engine, oracle):
    runs = engine.runner.vision_runs
    first = [user("describe", picture(8, (2, 1)))]
    _, text, _ = ask(engine, first, session_id="vision")
    follow = first + [assistant(text), user("how many")]
    got, _, _ = ask(engine, follow, session_id="vision")
    assert engine.runner.vision_runs == runs + 1, "the follow-up must reuse the picture's K/V"
    assert_same_answer(got, oracle.answer(follow, NEW), "follow-up on a kept picture")


def test_a_new_picture_in_the_same_session_drops_the_old_one(engine, oracle):
    runs = engine.runner.vision_runs
    ask(engine, [user("describe", picture(11))], session_id="swap")
    old_key = engine.runner.prefixes._items["swap"].image_key
    second = [user("what color", picture(12, (1, 2)))]
    got, _, stats = ask(engine, second, session_id="swap")
    assert engine.runner.vision_runs == runs + 2 and stats.cached_prompt_tokens == 0
    assert engine.runner.prefixes._items["swap"].image_key not in (None, old_key), "the old picture's K/V stay stored"
    assert_same_answer(got, oracle.answer(second, NEW), "new picture")


def test_closing_a_running_reply_stops_it_within_one_step(engine):
    reply = engine.chat([user("describe", picture(20))], GenerationSettings(max_new_tokens=200, temperature=0))
    next(reply)
    before = len(reply.token_ids)
    reply.close()  # what Gradio does when the user presses Stop or leaves
    stats = reply.wait(timeout=30)
    assert stats is not None and stats.finish_reason == "cancelled"
    assert stats.tokens <= before + 2, f"{stats.tokens - before} tokens after closing (one step may be in flight)"


def test_cancelling_one_request_leaves_the_others_alone(engine, oracle):
    convs = [[user(words(random.Random(s)), picture(s))] for s in range(10, 14)]
    long = GenerationSettings(max_new_tokens=40, temperature=0)
    cancel = threading.Event()
    start = threading.Barrier(4)

    def run(i):
        start.wait()
        if i:
            return ask(engine, convs[i], long)[0]
        for item in engine.chat(convs[0], long, cancel=cancel):
            if isinstance(item, ReplyStats):
                return item
            cancel.set()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert results[0].finish_reason == "cancelled" and results[0].tokens < 40
    for conv, got in zip(convs[1:], results[1:]):
        assert_same_answer(got, oracle.answer(conv, 40), "batch mate of a cancelled request")


def test_a_model_spread_over_devices_decodes_eagerly_even_when_compile_is_asked(engine):
    """Full-graph compilation and CUDA graphs need the whole model on one device."""
    from serving.runner import ModelRunner

    model = engine.model
    assert "hf_device_map" not in model.__dict__, "the fixture's model sits on the CPU alone"
    model.hf_device_map = {"language_model": "cpu", "vision_model": "disk"}
    try:
        runner = ModelRunner(model, slots=2, capacity=64, compile=True)
        assert not runner.static and not runner.cache.static
    finally:
        del model.hf_device_map


# --- refusals ------------------------------------------------------------------------------------

def test_full_queue_answers_busy(folder):
    engine = ChatEngine.load(str(folder), max_batch=1, queue_size=1, context_tokens=256)
    try:
        slow = GenerationSettings(max_new_tokens=250, temperature=0)
        first = engine.chat([user("describe", picture(1))], slow)
        next(first)  # running in the only slot
        second = engine.chat([user("describe", picture(2))], slow)  # waits in the queue
        with pytest.raises(EngineBusy, match="busy"):
            engine.chat([user("describe", picture(3))], slow)
        first.close()
        second.close()
    finally:
        engine.close()


def test_conversation_longer_than_the_context_is_refused(engine):
    with pytest.raises(PromptTooLong, match="Your message is [0-9,]+ tokens long and this server takes at most 256. Shorten it"):
        engine.chat([{"role": "user", "content": "red " * 400}], GREEDY)


def test_a_conversation_grown_past_the_context_is_refused_with_clear_as_the_way_out(engine):
    grown = [user("red " * 150), {"role": "assistant", "content": "blue " * 150}, user("and now?")]
    with pytest.raises(PromptTooLong, match="The conversation is [0-9,]+ tokens long and this server takes at most "
                                            "256. Clear the chat to start a new one"):
        engine.chat(grown, GREEDY)


def test_more_than_one_picture_is_refused(engine):
    two = [{"role": "user", "content": [{"type": "image", "image": picture(1)}, {"type": "image", "image": picture(2)},
                                         {"type": "text", "text": "compare"}]}]
    with pytest.raises(EngineError, match="one picture at a time"):
        engine.chat(two, GREEDY)


def test_tiny_model_answers_eight_users_at_once_as_generate_does_alone():
    """The same property on the shipped tiny model, with real pictures and questions."""
    from pathlib import Path

    from scripts import synthetic

    tiny = Path(__file__).resolve().parents[1] / "assets" / "tiny-mllama"
    engine = ChatEngine.load(str(tiny), max_batch=8, queue_size=16, context_tokens=512)
    try:
        oracle = Oracle(engine.model, engine.processor)
        rng = random.Random(11)
        questions = ["What color is the shape?", "What shape is this?", "How many shapes are there?",
                     "Describe the image."]
        convs = []
        for i in range(8):
            sample = synthetic.make_sample(rng)
            text = questions[i % 4] + (" Please answer briefly." if i >= 4 else "")
            convs.append([user(text, sample.image)])
        start = threading.Barrier(8)

        def together(messages):
            start.wait()
            return ask(engine, messages, GenerationSettings(max_new_tokens=24, temperature=0))[0]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(together, convs))
        for conv, got in zip(convs, results):
            assert_same_answer(got, oracle.answer(conv, 24), conv[0]["content"][1]["text"])
    finally:
        engine.close()
