"""The browser's copy of a conversation and of the settings (kept across reloads): what comes back, and
what is refused."""
from __future__ import annotations

from app.conversation import STOPPED_BEFORE_START, Conversation, Turn
from app.saved import PICTURE_GONE, restored, restored_settings, saved, saved_settings
from serving import ReplyStats


def test_a_conversation_comes_back_as_it_was(tmp_path):
    picture = tmp_path / "red.png"
    picture.write_bytes(b"a picture")
    stats = ReplyStats(time_to_first_token_s=0.1, tokens=3, tokens_per_s=30.0, finish_reason="stop", prompt_tokens=9)
    conversation = Conversation([Turn("What is it?", str(picture), "A circle.", stats),
                                 Turn("And now?", None, "", None, "The model failed.")])
    assert restored(saved(conversation), [tmp_path]) == conversation


def test_pictures_from_outside_the_upload_folders_are_left_out(tmp_path):
    uploads, elsewhere = tmp_path / "uploads", tmp_path / "elsewhere"
    uploads.mkdir()
    elsewhere.mkdir()
    secret = elsewhere / "secret.png"
    secret.write_bytes(b"not yours")
    for path in [str(secret), str(uploads / ".." / "elsewhere" / "secret.png"), str(uploads / "deleted.png")]:
        data = {"turns": [{"question": "What is it?", "picture": path, "answer": "x", "stats": None, "error": "e"}]}
        turn = restored(data, [uploads]).turns[0]
        assert turn.picture is None and turn.question == f"What is it?\n\n{PICTURE_GONE}"


def test_an_answer_cut_short_by_the_reload_is_closed_and_junk_gives_an_empty_chat(tmp_path):
    data = {"turns": [{"question": "Hello", "picture": None, "answer": "", "stats": None, "error": None}]}
    assert restored(data, [tmp_path]).turns[0].error == STOPPED_BEFORE_START
    for junk in [None, "turns", {"turns": "no"}, {"turns": [5, {"question": 3}]}]:
        assert restored(junk, [tmp_path]) == Conversation()


SETTING_DEFAULTS = {"system_prompt": "", "temperature": 0.6, "max_new_tokens": 512, "seed": -1}
SETTING_BOUNDS = {"temperature": (0, 2), "max_new_tokens": (1, 2048)}


def test_settings_come_back_as_they_were():
    values = ["Be brief.", 0.3, 100, 7]
    assert restored_settings(saved_settings(list(SETTING_DEFAULTS), values), SETTING_DEFAULTS, SETTING_BOUNDS) == values


def test_settings_missing_of_the_wrong_kind_or_out_of_bounds_are_the_defaults():
    kept = {"system_prompt": 3, "temperature": "hot", "max_new_tokens": 4096}  # a smaller limit since; no seed
    assert restored_settings(kept, SETTING_DEFAULTS, SETTING_BOUNDS) == list(SETTING_DEFAULTS.values())
    assert restored_settings(None, SETTING_DEFAULTS, SETTING_BOUNDS) == list(SETTING_DEFAULTS.values())
    assert restored_settings({"temperature": True}, SETTING_DEFAULTS, SETTING_BOUNDS)[1] == 0.6
