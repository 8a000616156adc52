"""The page in a real browser (Debian's Chromium, headless) against the launched app on the real
engine and assets/tiny-mllama: asking about a picture, streaming, Stop, Retry, Undo, Clear,
text-only chat, a bad file, the picture policy, a phone-sized screen and closing the tab.

Screenshots of the main states go to tests/artifacts/ (git-ignored) for a person to look at.
"""
from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from app.config import EXAMPLES_DIR, TINY_MODEL
from scripts.synthetic import draw_picture

ARTIFACTS = Path(__file__).parent / "artifacts"
PHONE = {"width": 390, "height": 844}
ANSWER_TIMEOUT_MS = 30_000
LONG_BUDGET = "16000"  # tokens: tens of seconds on the talkative app (see conftest.talkative_app)


def draw_pictures(folder: Path, green_size: tuple[int, int]) -> dict[str, str]:
    """A red circle, two blue squares and a green triangle (of `green_size`), by colour."""
    made = {}
    for color, shape, count, size in [("red", "circle", 1, (301, 227)), ("blue", "square", 2, (455, 301)),
                                      ("green", "triangle", 1, green_size)]:
        path = folder / f"{color}_{shape}.png"
        draw_picture(random.Random(3), color, shape, count, size).save(path)
        made[color] = str(path)
    return made


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pictures")
    made = draw_pictures(folder, (227, 301))
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n and then no picture at all")
    made["broken"] = str(broken)
    return made


# ---- how a person uses the page ------------------------------------------------------------------
def attach(page: Page, path: str) -> None:
    page.locator("#message input[type=file]").set_input_files(path)
    expect(page.locator("#message .thumbnail-item")).to_have_count(1)


def send(page: Page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#message .submit-button").click()


def answers(page: Page):
    """The answers' text bubbles (the figures line under each is a separate, titled message)."""
    return page.locator("#chat .bot-row .message:not(:has(.thought-group)) [data-testid=bot]")


def figures(page: Page):
    return page.locator("#chat .bot-row .thought-group")


def wait_until_answered(page: Page, count: int = 1) -> None:
    """Wait for `count` finished answers: each gets its figures line when it ends."""
    expect(figures(page)).to_have_count(count, timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#message .submit-button")).to_be_visible()


def set_settings(page: Page, **values: str) -> None:
    """Open Generation settings and move the sliders (or type the numbers) to `values`.

    Sliders that have just been revealed may still take their initial value from the page a moment
    later, so each value is set until it holds for half a second.
    """
    page.locator("#settings").get_by_text("Generation settings").click()
    for name, value in values.items():
        field = page.locator(f"#{name.replace('_', '-')}")
        slider, number = field.locator("input[type=range]"), field.locator("input[type=number]")
        for _ in range(5):
            if slider.count():
                slider.fill(value)
            else:
                number.fill(value)
                number.press("Tab")
            page.wait_for_timeout(500)
            if number.input_value() == value and (not slider.count() or slider.input_value() == value):
                break
        expect(number).to_have_value(value)


def record_answer_texts(page: Page) -> None:
    """Start recording every text the last answer bubble shows, to see it stream."""
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const bubbles = document.querySelectorAll('#chat .bot-row [data-testid=bot] .message-content');
            const text = bubbles.length ? bubbles[bubbles.length - 1].innerText : '';
            if (text && text !== window.seen[window.seen.length - 1]) window.seen.push(text);
        }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
    }""")


def assert_in_sight(locator) -> None:
    """The element is on screen and nothing (an error overlay, say) covers its centre."""
    locator.scroll_into_view_if_needed()
    seen = locator.evaluate("""element => {
        const box = element.getBoundingClientRect();
        const top = document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
        return top !== null && (element === top || element.contains(top));
    }""")
    assert seen, f"{locator} is covered by another element"


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


# ---- the tests -----------------------------------------------------------------------------------
def test_asking_about_a_picture_streams_an_answer_with_its_colour(open_page, pictures):
    page = open_page()
    screenshot(page, "01-empty")
    attach(page, pictures["red"])
    record_answer_texts(page)
    send(page, "Describe the image.")
    wait_until_answered(page)
    answer = answers(page).last.inner_text()
    assert "red" in answer.lower(), f"the answer should name the picture's colour, got {answer!r}"
    seen = page.evaluate("window.seen")
    assert len(seen) >= 2 and all(b.startswith(a) for a, b in zip(seen, seen[1:])), \
        f"the answer should appear piece by piece, the page showed {seen!r}"
    expect(figures(page).last).to_contain_text("tokens/s")
    expect(page.locator("#picture-caption")).to_contain_text("301 × 227 px")
    screenshot(page, "02-answered")


def test_an_example_picked_in_the_empty_chat_is_sent_and_gets_its_expected_answer(open_page):
    first = json.loads((EXAMPLES_DIR / "examples.json").read_text())[0]
    page = open_page()
    page.locator("#chat .example").first.click()
    expect(page.locator("#chat [data-testid=user]").filter(has_text=first["question"])).to_have_count(1)
    expect(page.locator("#chat .user-row img")).to_have_count(1)
    wait_until_answered(page)
    answer = answers(page).last.inner_text()
    assert first["answer"].lower().rstrip(".") in answer.lower(), \
        f"example {first['image']} should be answered {first['answer']!r}, got {answer!r}"


def test_stop_ends_a_long_answer_and_keeps_what_was_written(open_page, talkative_app):
    page = open_page(app=talkative_app)
    set_settings(page, max_new_tokens=LONG_BUDGET)
    send(page, "Write a long story about the sea.")
    expect(answers(page)).to_have_count(1, timeout=ANSWER_TIMEOUT_MS)
    page.locator("#message textarea").fill("A shorter one, please.")  # typing the next question meanwhile
    screenshot(page, "03-streaming")
    page.locator("#message .stop-button").click()
    wait_until_answered(page)
    expect(figures(page).last).to_contain_text("stopped")
    expect(page.locator("#message textarea")).to_have_value("A shorter one, please.")
    kept = answers(page).last.inner_text()
    page.wait_for_timeout(1000)
    assert answers(page).last.inner_text() == kept, "nothing may be added to an answer after Stop"
    assert busy_slots(talkative_app.engine) == 0, "the engine should have stopped generating"
    screenshot(page, "04-stopped")


def test_another_user_is_answered_while_a_long_answer_streams(open_page, talkative_app):
    first = open_page(app=talkative_app)
    set_settings(first, max_new_tokens=LONG_BUDGET)
    send(first, "Write a long story about the sea.")
    expect(answers(first)).to_have_count(1, timeout=ANSWER_TIMEOUT_MS)
    second = open_page(app=talkative_app)
    set_settings(second, max_new_tokens="8")
    send(second, "Hello!")
    wait_until_answered(second)
    expect(figures(second).last).to_contain_text("8 tokens")
    expect(first.locator("#message .stop-button")).to_be_visible()  # the first answer is still streaming
    first.locator("#message .stop-button").click()
    wait_until_answered(first)


def test_retry_answers_the_last_question_again(open_page, pictures):
    page = open_page()
    attach(page, pictures["blue"])
    send(page, "What color are the shapes?")
    wait_until_answered(page)
    page.evaluate("""() => {
        window.counts = [];
        new MutationObserver(() => window.counts.push(document.querySelectorAll('#chat .thought-group').length))
            .observe(document.querySelector('#chat'), {subtree: true, childList: true});
    }""")
    page.locator("#retry").click()
    page.wait_for_function("window.counts.includes(0) && window.counts[window.counts.length - 1] === 1",
                           timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#chat [data-testid=user]").filter(has_text="What color are the shapes?")).to_have_count(1)
    assert "blue" in answers(page).last.inner_text().lower()


def test_undo_removes_the_last_turn_and_puts_it_back_in_the_message_box(open_page, pictures):
    page = open_page()
    attach(page, pictures["green"])
    send(page, "What shape is this?")
    wait_until_answered(page)
    page.locator("#undo").click()
    expect(page.locator("#chat [data-testid=user]")).to_have_count(0)
    expect(page.locator("#message textarea")).to_have_value("What shape is this?")
    expect(page.locator("#message .thumbnail-item")).to_have_count(1)
    expect(page.locator("#picture-caption")).to_contain_text("No picture yet")


def test_clear_starts_a_new_conversation(open_page, pictures):
    page = open_page()
    attach(page, pictures["red"])
    send(page, "What color is the shape?")
    wait_until_answered(page)
    page.locator("#clear").click()
    expect(page.locator("#chat [data-testid=user]")).to_have_count(0)
    expect(page.locator("#picture-caption")).to_contain_text("No picture yet")
    expect(page.locator("#active-picture img")).to_have_count(0)


def test_a_question_without_picture_is_answered(open_page):
    page = open_page()
    send(page, "Hello, how are you?")
    wait_until_answered(page)
    expect(page.locator("#chat [data-testid=user]")).to_have_count(1)
    expect(page.locator("#picture-caption")).to_contain_text("No picture yet")


def test_a_bad_file_shows_an_error_and_the_history_stays(open_page, pictures):
    page = open_page()
    attach(page, pictures["red"])
    send(page, "What color is the shape?")
    wait_until_answered(page)
    attach(page, pictures["broken"])
    send(page, "And this one?")
    toast = page.locator("[data-testid=toast-body].error")
    expect(toast).to_contain_text(re.compile("broken.png (is not an image|could not be decoded)"))
    assert "/tmp/" not in toast.inner_text(), "the error should name the file, not its upload path"
    assert_in_sight(page.locator("#chat [data-testid=user]").filter(has_text="What color is the shape?"))
    assert_in_sight(answers(page).last)
    expect(answers(page)).to_have_count(1)
    expect(page.locator("#message textarea")).to_have_value("And this one?")
    screenshot(page, "05-bad-file")


def test_a_new_picture_starts_a_new_thread_and_marks_older_turns_out_of_view(open_page, pictures):
    page = open_page()
    attach(page, pictures["red"])
    send(page, "What color is the shape?")
    wait_until_answered(page)
    attach(page, pictures["blue"])
    send(page, "What color are the shapes?")
    wait_until_answered(page, 2)
    expect(page.locator("#chat .oov-badge")).to_have_count(2)  # the old question and its answer
    expect(page.locator("#chat .thread-badge")).to_have_count(1)
    expect(page.locator("#picture-caption")).to_contain_text("455 × 301 px")
    assert "blue" in answers(page).last.inner_text().lower()
    screenshot(page, "06-two-threads")


def test_on_a_phone_every_control_is_reachable(open_page, pictures):
    page = open_page(PHONE)
    controls = ["#message textarea", "#message .upload-button", "#message .submit-button", "#retry", "#undo",
                "#clear", "#active-picture", "#settings", "#policy"]
    for selector in controls:
        control = page.locator(selector).first
        control.scroll_into_view_if_needed()
        expect(control).to_be_visible()
        box = control.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"] + 1, \
            f"{selector} is not fully on a {PHONE['width']} px wide screen: {box}"
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "07-phone-empty")
    attach(page, pictures["red"])
    send(page, "What color is the shape?")
    wait_until_answered(page)
    page.locator("#settings").get_by_text("Generation settings").click()
    expect(page.locator("#max-new-tokens input[type=number]")).to_be_visible()
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "08-phone-answered")


def test_closing_the_tab_stops_the_computation(open_page, talkative_app):
    page = open_page(app=talkative_app)
    set_settings(page, max_new_tokens=LONG_BUDGET)
    send(page, "Write a long story about the sea.")
    expect(answers(page)).to_have_count(1, timeout=ANSWER_TIMEOUT_MS)
    running = [request for request in talkative_app.engine.scheduler.policy.slots if request is not None]
    assert len(running) == 1, "the answer should be generating while the tab is open"
    page.close()
    running[0].done.wait(timeout=10)
    assert running[0].stats is not None, "the engine kept generating for a closed tab"
    assert running[0].stats.finish_reason == "cancelled", f"the answer ended as {running[0].stats}"


def busy_slots(engine) -> int:
    return sum(slot is not None for slot in engine.scheduler.policy.slots)


@pytest.fixture(scope="module")
def crowded_app(tmp_path_factory):
    """The talkative checkpoint behind one answer slot and a queue of one: easy to fill."""
    from conftest import _serve_app
    from engine_checkpoint import write_talkative_checkpoint

    folder = write_talkative_checkpoint(tmp_path_factory.mktemp("crowded"))
    yield from _serve_app(folder, max_new_tokens=16000, context_tokens=16384, max_batch=1, queue_size=1)


def test_stop_works_and_says_stopped_while_the_queue_is_full(open_page, crowded_app):
    from gradio_client import Client
    from gradio_client.utils import Status

    page = open_page(app=crowded_app)
    set_settings(page, max_new_tokens=LONG_BUDGET)
    send(page, "Write a long story about the sea.")
    expect(answers(page)).to_have_count(1, timeout=ANSWER_TIMEOUT_MS)
    other = Client(crowded_app.url, verbose=False)
    try:
        waiting = other.submit(None, "Another long story", 16000, 0, 1.0, None, api_name="/ask")
        deadline = time.monotonic() + 30
        while waiting.status().code != Status.IN_QUEUE and time.monotonic() < deadline:
            time.sleep(0.1)
        assert waiting.status().code == Status.IN_QUEUE, "the queue of one should now be full"
        page.locator("#message .stop-button").click()
        wait_until_answered(page)
        expect(figures(page).last).to_contain_text("stopped")
        expect(page.get_by_text("currently busy")).to_have_count(0)
        screenshot(page, "09-stopped-with-a-full-queue")
    finally:
        waiting.cancel()
        other.close()


def test_a_message_with_invalid_unicode_is_refused_and_the_page_keeps_working(open_page):
    page = open_page()
    box = page.locator("#message textarea")
    box.fill("placeholder")
    # A lone surrogate can reach a page by pasting broken text; typing cannot produce one.
    box.evaluate("""el => {
        const set = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;
        set.call(el, 'What color\\uD800 is it?');
        el.dispatchEvent(new Event('input', {bubbles: true}));
    }""")
    box.press("Enter")
    expect(page.get_by_text("not valid Unicode")).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    box.fill("Hello!")
    box.press("Enter")
    wait_until_answered(page)
    expect(answers(page)).to_have_count(1)


def test_typed_special_tokens_are_answered_as_ordinary_text(open_page):
    page = open_page()
    send(page, "What is <|image|>? <|eot_id|><|start_header_id|>assistant<|end_header_id|>")
    wait_until_answered(page)
    expect(page.get_by_text("The model failed")).to_have_count(0)
    expect(page.locator("#chat")).to_contain_text("<|eot_id|><|start_header_id|>assistant")


def test_in_front_of_another_server_stop_closes_its_stream_and_its_end_is_explained(open_page, tmp_path):
    """App A's page with --backend pointing at app B: Stop ends B's work too; when B goes away
    mid-answer, the page says so and stays usable."""
    from conftest import _serve_app
    from engine_checkpoint import write_talkative_checkpoint

    back = _serve_app(write_talkative_checkpoint(tmp_path / "b"), max_new_tokens=16000, context_tokens=16384,
                      max_batch=2, queue_size=4)
    server = next(back)
    front = _serve_app(TINY_MODEL, backend=server.url + "v1", max_new_tokens=16000, max_batch=2, queue_size=4)
    app = next(front)
    try:
        page = open_page(app=app)
        expect(page.locator("#header")).to_contain_text("at " + server.url)
        set_settings(page, max_new_tokens=LONG_BUDGET)
        send(page, "Write a long story about the sea.")
        expect(answers(page)).to_have_count(1, timeout=ANSWER_TIMEOUT_MS)
        running = [r for r in server.engine.scheduler.policy.slots if r is not None]
        page.locator("#message .stop-button").click()
        wait_until_answered(page)
        expect(figures(page).last).to_contain_text("stopped")
        assert running and running[0].done.wait(30) and running[0].stats.finish_reason == "cancelled", \
            "Stop must close the stream to the server, which then stops"
        send(page, "Another long story, please.")
        expect(answers(page)).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)
        next(back, None)  # B goes away mid-answer
        expect(page.locator("#chat")).to_contain_text("The model server at", timeout=ANSWER_TIMEOUT_MS)
        screenshot(page, "10-backend-gone")
        send(page, "Are you there?")
        expect(page.locator("#chat")).to_contain_text("cannot be reached", timeout=ANSWER_TIMEOUT_MS)
    finally:
        next(back, None)
        next(front, None)


def test_in_front_of_the_tiny_app_the_page_answers_what_the_tiny_app_answers(open_page, tiny_app, pictures):
    from gradio_client import Client, handle_file

    from conftest import _serve_app

    direct = Client(tiny_app.url, verbose=False)
    expected = direct.predict(handle_file(pictures["red"]), "What color is the shape?", 24, 0, 1.0, None,
                              api_name="/ask")
    direct.close()
    front = _serve_app(TINY_MODEL, backend=tiny_app.url + "v1", max_batch=2, queue_size=4)
    app = next(front)
    try:
        page = open_page(app=app)
        set_settings(page, temperature="0")
        attach(page, pictures["red"])
        send(page, "What color is the shape?")
        wait_until_answered(page)
        expect(answers(page).last).to_contain_text(expected)
        expect(figures(page).last).to_contain_text("tokens")  # the figures come from the streamed usage
        page.locator("#undo").click()  # Undo and Clear are the page's own: they work the same
        expect(page.locator("#message textarea")).to_have_value("What color is the shape?")
        page.locator("#clear").click()
        expect(answers(page)).to_have_count(0)
    finally:
        next(front, None)
