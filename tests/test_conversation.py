"""The app's conversation logic without a browser or a model: picture policy, retry, undo, clear,
error paths, what the page shows of a conversation, and the app's flags."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from app.config import TINY_MODEL, FlagError, cached_checkpoint, parse_config
from app.conversation import (DEFAULT_QUESTION, STOPPED_BEFORE_START, Conversation, ConversationError, Turn, ask,
                              engine_messages, figures, finish, interrupted, record_piece, retry, undo)
from app.display import NEW_THREAD, OUT_OF_VIEW, chat_messages, picture_card
from app.examples import load_examples


def stats(tokens: int = 3, reason: str = "stop") -> SimpleNamespace:
    """Stand-in for the engine's ReplyStats (the same fields)."""
    return SimpleNamespace(time_to_first_token_s=0.25, tokens=tokens, tokens_per_s=12.0, finish_reason=reason,
                           prompt_tokens=40)


def answered(conversation: Conversation, text: str, picture: str | None = None, answer: str = "ok") -> Conversation:
    conversation = ask(conversation, text, [picture] if picture else [])
    record_piece(conversation.turns[-1], answer)
    finish(conversation.turns[-1], stats=stats())
    return conversation


def load(path: str) -> str:
    """Pictures are 'loaded' to a marker string, so messages show which picture went where."""
    return f"<picture {path}>"


def images_in(messages: list[dict]) -> list[str]:
    return [part["image"] for m in messages if isinstance(m["content"], list)
            for part in m["content"] if part["type"] == "image"]


def texts(messages: list[dict]) -> list[tuple[str, str]]:
    out = []
    for m in messages:
        content = m["content"]
        text = content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")
        out.append((m["role"], text))
    return out


# ---- picture policy ------------------------------------------------------------------------------
def test_the_first_picture_goes_with_its_question_and_stays_for_follow_ups():
    chat = answered(Conversation(), "What color is it?", "red.png", "Red.")
    chat = ask(chat, "And the shape?", [])
    messages = engine_messages(chat, "", load)
    assert images_in(messages) == ["<picture red.png>"], "exactly the one picture, once"
    assert messages[0]["content"][0] == {"type": "image", "image": "<picture red.png>"}, \
        "the picture comes first in the user turn that introduced it"
    assert texts(messages) == [("user", "What color is it?"), ("assistant", "Red."), ("user", "And the shape?")]


def test_a_new_picture_starts_a_new_thread_and_the_model_sees_only_that_thread():
    chat = answered(Conversation(), "What color is it?", "red.png", "Red.")
    chat = answered(chat, "Is it round?", None, "Yes.")
    chat = ask(chat, "What color is this one?", ["blue.png"])
    messages = engine_messages(chat, "", load)
    assert images_in(messages) == ["<picture blue.png>"], "only the newest picture reaches the model"
    assert texts(messages) == [("user", "What color is this one?")], "earlier turns are out of view"
    assert chat.picture == "blue.png"
    assert [chat.in_view(i) for i in range(3)] == [False, False, True]


def test_text_only_chat_sends_no_picture():
    chat = answered(Conversation(), "Hello!", None, "Hi.")
    chat = ask(chat, "How are you?", [])
    messages = engine_messages(chat, "", load)
    assert images_in(messages) == []
    assert texts(messages) == [("user", "Hello!"), ("assistant", "Hi."), ("user", "How are you?")]
    assert chat.picture is None and all(chat.in_view(i) for i in range(2))


def test_text_before_the_first_picture_goes_out_of_view_when_the_picture_arrives():
    chat = answered(Conversation(), "Hello!", None, "Hi.")
    chat = ask(chat, "What is this?", ["square.png"])
    assert texts(engine_messages(chat, "", load)) == [("user", "What is this?")]
    assert not chat.in_view(0)


def test_the_system_prompt_is_sent_first_and_a_blank_one_not_at_all():
    chat = ask(Conversation(), "Describe it.", ["red.png"])
    assert engine_messages(chat, "  Be brief. ", load)[0] == {"role": "system", "content": "Be brief."}
    assert engine_messages(chat, "   ", load)[0]["role"] == "user"


def test_the_thread_key_changes_with_the_picture_and_returns_after_undo():
    chat = answered(Conversation(), "Color?", "red.png")
    first = chat.thread_key
    assert answered(chat, "Shape?").thread_key == first, "a text question stays in the thread"
    newer = answered(chat, "Color?", "blue.png")
    assert newer.thread_key != first
    assert undo(newer)[0].thread_key == first


# ---- asking --------------------------------------------------------------------------------------
def test_a_picture_without_text_asks_for_a_description():
    chat = ask(Conversation(), "   ", ["red.png"])
    assert chat.turns[-1].question == DEFAULT_QUESTION


def test_an_empty_message_is_refused_with_what_to_do():
    with pytest.raises(ConversationError, match="Type a question, or add a picture"):
        ask(Conversation(), "  ", [])


def test_two_pictures_in_one_message_are_refused_because_the_model_sees_one():
    with pytest.raises(ConversationError, match="one picture at a time"):
        ask(Conversation(), "Compare", ["a.png", "b.png"])


def test_no_new_question_while_the_model_is_answering():
    chat = ask(Conversation(), "Color?", ["red.png"])
    assert chat.answering
    with pytest.raises(ConversationError, match="Press Stop first"):
        ask(chat, "Shape?", [])


def test_asking_leaves_the_previous_conversation_unchanged():
    before = answered(Conversation(), "Color?", "red.png")
    after = ask(before, "Shape?", [])
    assert len(before.turns) == 1 and len(after.turns) == 2


# ---- retry, undo, clear --------------------------------------------------------------------------
def test_retry_forgets_the_last_answer_and_keeps_the_question():
    chat = answered(Conversation(), "Color?", "red.png", "Blue.")
    again = retry(chat)
    assert again.turns[-1] == Turn("Color?", "red.png"), "answer, figures and error are cleared"
    assert again.answering
    assert chat.turns[-1].answer == "Blue.", "retry returns a new conversation"


def test_retry_after_a_failed_answer_asks_again():
    chat = ask(Conversation(), "Color?", ["red.png"])
    finish(chat.turns[-1], error="Out of memory.")
    assert retry(chat).turns[-1].error is None


def test_retry_needs_a_question_and_no_running_answer():
    with pytest.raises(ConversationError, match="no question to retry"):
        retry(Conversation())
    with pytest.raises(ConversationError, match="Press Stop first"):
        retry(ask(Conversation(), "Color?", []))


def test_undo_removes_the_last_turn_and_returns_it_for_the_input_box():
    chat = answered(Conversation(), "Color?", "red.png")
    chat = answered(chat, "Shape?", "blue.png")
    earlier, removed = undo(chat)
    assert removed.question == "Shape?" and removed.picture == "blue.png"
    assert [t.question for t in earlier.turns] == ["Color?"]
    assert earlier.picture == "red.png", "undoing a picture brings the previous one back into view"


def test_undo_of_an_empty_conversation_says_so():
    with pytest.raises(ConversationError, match="nothing to undo"):
        undo(Conversation())


def test_clear_is_a_fresh_conversation_without_picture():
    fresh = Conversation()
    assert fresh.turns == [] and fresh.picture is None and not fresh.answering
    assert chat_messages(fresh) == []


# ---- error paths ---------------------------------------------------------------------------------
def test_failed_turns_without_text_are_not_sent_but_stay_in_the_history():
    chat = ask(Conversation(), "Color?", ["red.png"])
    finish(chat.turns[-1], error="Out of memory.")
    chat = ask(chat, "Shape?", [])
    messages = engine_messages(chat, "", load)
    assert texts(messages) == [("user", "Shape?")], "a question without answer would confuse the model"
    assert images_in(messages) == ["<picture red.png>"], "the thread's picture moves to the next question"
    assert len(chat.turns) == 2


def test_a_stopped_answer_keeps_its_text_and_is_sent_as_it_was_shown():
    chat = ask(Conversation(), "Describe it.", ["red.png"])
    record_piece(chat.turns[-1], "A red")
    finish(chat.turns[-1], stats=stats(tokens=2, reason="cancelled"))
    chat = ask(chat, "Go on.", [])
    assert texts(engine_messages(chat, "", load))[1] == ("assistant", "A red")


def test_a_question_whose_answer_never_started_can_be_closed_and_retried():
    chat = ask(Conversation(), "Color?", ["red.png"])
    closed = interrupted(chat)
    assert not closed.answering and closed.turns[-1].error == STOPPED_BEFORE_START
    assert chat.answering, "interrupted returns a new conversation"
    assert retry(closed).answering


def test_interrupting_a_finished_conversation_changes_nothing():
    chat = answered(Conversation(), "Color?", "red.png")
    assert interrupted(chat) == chat


def test_engine_messages_of_an_empty_conversation_is_an_error():
    with pytest.raises(ConversationError):
        engine_messages(Conversation(), "", load)


# ---- what the page shows -------------------------------------------------------------------------
def test_figures_name_first_token_time_speed_tokens_and_why_it_stopped():
    assert figures(stats(3, "stop")) == "0.25 s to first token · 12.0 tokens/s · 3 tokens · finished"
    assert figures(stats(1, "length")).endswith("1 token · reached the max new tokens")
    assert figures(stats(0, "cancelled")) == "stopped before the first token"


def test_chat_messages_show_picture_question_answer_and_a_separate_figures_line():
    chat = answered(Conversation(), "Color?", "red.png", "Red.")
    user, answer, footer = chat_messages(chat)
    assert user == {"role": "user", "content": [{"path": "red.png", "alt_text": "picture sent with this question"},
                                                "Color?"]}
    assert answer == {"role": "assistant", "content": "Red."}, "the answer alone, so Copy copies only it"
    assert "tokens/s" in footer["metadata"]["title"] and footer["content"] == ""


def test_older_turns_are_badged_out_of_view_and_the_new_picture_as_a_new_thread():
    chat = answered(Conversation(), "Color?", "red.png", "Red.")
    chat = answered(chat, "Color?", "blue.png", "Blue.")
    old_user, _, old_footer, new_user, _, new_footer = chat_messages(chat)
    assert OUT_OF_VIEW in old_user["content"] and OUT_OF_VIEW in old_footer["metadata"]["title"]
    assert NEW_THREAD in new_user["content"] and OUT_OF_VIEW not in new_footer["metadata"]["title"]


def test_a_failed_answer_shows_its_error_under_the_question():
    chat = ask(Conversation(), "Color?", [])
    finish(chat.turns[-1], error="Out of memory <GPU>.")
    _, footer = chat_messages(chat)
    assert "Out of memory &lt;GPU&gt;." in footer["metadata"]["title"], "errors are shown, escaped"


def test_a_question_waiting_for_its_answer_shows_no_answer_yet():
    assert [m["role"] for m in chat_messages(ask(Conversation(), "Hi", []))] == ["user"]


def test_the_picture_card_gives_size_and_tiles_or_how_to_add_a_picture():
    info = SimpleNamespace(width=1200, height=600, tiles=2, grid=(1, 2))
    assert picture_card(info, 560) == "**1200 × 600 px** · 2 tiles of 560 px (1 × 2 grid)"
    assert "No picture yet" in picture_card(None, 560)


# ---- examples ------------------------------------------------------------------------------------
def test_examples_come_from_examples_json_when_present(tmp_path):
    (tmp_path / "examples.json").write_text(json.dumps([{"image": "a.png", "question": "What color?"}]))
    assert load_examples(tmp_path) == [{"text": "What color?", "files": [str(tmp_path / "a.png")]}]


def test_examples_otherwise_pair_each_picture_with_its_text_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("How many shapes?\n")
    (tmp_path / "b.jpg").write_bytes(b"")
    assert load_examples(tmp_path) == [{"text": "How many shapes?", "files": [str(tmp_path / "a.png")]},
                                       {"text": DEFAULT_QUESTION, "files": [str(tmp_path / "b.jpg")]}]


# ---- flags and environment -----------------------------------------------------------------------
def test_flags_win_over_environment_variables():
    config = parse_config(["--port", "8000", "--model", "some/model"],
                          {"GRADIO_SERVER_PORT": "9000", "MLLAMA_MODEL": "other/model", "MLLAMA_QUEUE_SIZE": "5"})
    assert (config.port, config.model, config.queue_size) == (8000, "some/model", 5)


def test_spaces_style_environment_configures_the_app():
    config = parse_config([], {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SHARE": "true", "MLLAMA_MODEL": "x/y",
                               "MLLAMA_AUTH": "ada:secret", "MLLAMA_DEVICE_MAP": "auto"})
    assert (config.host, config.share, config.auth, config.device_map) == ("0.0.0.0", True, ("ada", "secret"), "auto")


def test_compiled_decoding_is_a_switch_with_its_variable():
    assert parse_config(["--model", "x/y"], {}).compile is False
    assert parse_config(["--model", "x/y", "--compile"], {}).compile is True
    assert parse_config(["--model", "x/y"], {"MLLAMA_COMPILE": "1"}).compile is True
    with pytest.raises(FlagError, match="MLLAMA_COMPILE is 'maybe'; use true or false"):
        parse_config(["--model", "x/y"], {"MLLAMA_COMPILE": "maybe"})


@pytest.mark.parametrize("argv, message", [
    (["--port", "web"], "--port / GRADIO_SERVER_PORT is 'web'; pass a whole number"),
    (["--max-new-tokens", "0"], "pass a number of 1 or more"),
    (["--dtype", "int4"], "use one of auto, bfloat16, float16, float32"),
    (["--auth", "nopassword"], "must look like USER:PASSWORD"),
])
def test_bad_flag_values_are_refused_with_what_to_pass(argv, message):
    with pytest.raises(FlagError, match=message):
        parse_config(["--model", "x/y", *argv], {})


def test_without_a_cached_llama_the_default_model_is_the_tiny_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert parse_config([], {}).model == str(TINY_MODEL)


def make_cached_repo(cache, repo_id: str, files: list[str], shards: list[str]) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": s for s in shards}}))
    for name in files:
        (snapshot / name).write_text("{}")


def test_a_complete_cached_checkpoint_is_found_without_network(tmp_path):
    files = ["config.json", "tokenizer.json", "preprocessor_config.json", "model-00001-of-00001.safetensors"]
    make_cached_repo(tmp_path, "meta-llama/Llama-3.2-11B-Vision-Instruct", files, [files[-1]])
    found = cached_checkpoint("meta-llama/Llama-3.2-11B-Vision-Instruct", cache_dir=str(tmp_path))
    assert found is not None and found.endswith("abc123")


def test_a_cached_checkpoint_missing_a_shard_is_not_used(tmp_path):
    make_cached_repo(tmp_path, "meta-llama/Llama-3.2-11B-Vision-Instruct",
                     ["config.json", "tokenizer.json", "preprocessor_config.json"],
                     ["model-00001-of-00002.safetensors"])
    assert cached_checkpoint("meta-llama/Llama-3.2-11B-Vision-Instruct", cache_dir=str(tmp_path)) is None


# ---- settings and cancellation (app/answering.py) -------------------------------------------------
def test_page_values_become_engine_settings_within_the_limits():
    from app.answering import settings_from

    settings = settings_from(5000.0, 0.0, 0.9, 40.0, 1.1, 7.0, limit=1024)
    assert (settings.max_new_tokens, settings.temperature, settings.top_k, settings.seed) == (1024, 0.0, 40, 7), \
        "max new tokens is capped by the server's limit; temperature 0 stays greedy"


@pytest.mark.parametrize("seed", [None, "", -1])
def test_a_missing_or_negative_seed_means_a_fresh_random_seed(seed):
    from app.answering import settings_from

    assert settings_from(16, 0.6, 0.9, seed=seed, limit=64).seed is None


def test_stop_cancels_the_sessions_answer_and_waits_until_it_has_ended():
    import threading

    from app.answering import RunningAnswers

    running = RunningAnswers()
    cancel = running.start("session-a")
    other = running.start("session-b")
    ended = []

    def answer_loop():  # what the answer handler does: run until cancelled, then record and end
        cancel.wait(5)
        ended.append("written")
        running.end("session-a", cancel)

    worker = threading.Thread(target=answer_loop)
    worker.start()
    assert running.stop("session-a", wait_s=5) is True
    assert ended == ["written"], "stop returns only after the answer has written its last state"
    assert not other.is_set(), "another session's answer keeps running"
    assert running.stop("session-a") is False, "nothing left to stop"
    worker.join()


def test_a_new_answer_in_the_same_session_cancels_the_previous_one():
    from app.answering import RunningAnswers

    running = RunningAnswers()
    old = running.start("s")
    running.start("s")
    assert old.is_set()


def test_a_damaged_picture_is_reported_by_its_file_name(tmp_path):
    from app.answering import read_picture
    from model.image_io import ImageLoadError

    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageLoadError, match="holiday.png") as caught:
        read_picture(str(broken))
    assert str(tmp_path) not in str(caught.value), "the upload folder means nothing to the user"


def test_help_shows_every_default():
    import subprocess
    import sys

    text = subprocess.run([sys.executable, "app.py", "--help"], capture_output=True, text=True, check=True).stdout
    for shown in ("(default: 7860)", "(default: 127.0.0.1)", "(default: 1024)", "(default: 4096)", "(default: 8)",
                  "(default: 32)", "(default: auto)", "(default: off)"):
        assert shown in " ".join(text.split()), f"--help does not show {shown}"


def test_a_taken_port_is_reported_in_one_line_before_any_model_loads():
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "app.py", "--port", str(port)], capture_output=True, text=True,
                             timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and f"--port {port + 1}" in run.stderr, run.stderr
    assert "Loading" not in run.stdout, "the port must be checked before the model loads"


def test_wrong_passwords_are_answered_ever_more_slowly_and_a_right_one_at_once():
    import asyncio

    from app.server import slowed_login

    now, waits = [0.0], []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    check = slowed_login("ada", "secret", clock=lambda: now[0], sleep=sleep)
    results = [asyncio.run(check("ada", f"guess{i}")) for i in range(12)]
    assert results == [False] * 12
    assert waits == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.0, 5.0], "each failure should wait longer"
    assert asyncio.run(check("ada", "secret")) is True and len(waits) == 12, "a right password is not delayed"
    assert asyncio.run(check("bob", "secret")) is False
    now[0] = 1000.0  # a minute later the failures are forgotten
    asyncio.run(check("ada", "nope"))
    assert waits[-1] == 0.5


def test_a_message_with_invalid_unicode_is_not_sent_and_the_conversation_stays_usable():
    conversation = answered(Conversation(), "hello")
    with pytest.raises(ConversationError, match="not valid Unicode \\(U\\+DC80 at character 6\\)"):
        ask(conversation, "what \udc80 is", [])
    assert not ask(conversation, "what is it", []).turns[-1].done
