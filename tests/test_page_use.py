"""The page as people use chat apps, in Debian's Chromium against the launched app: reading while an
answer streams, a touch phone, reloads, the chat's own trash icon, prices with `$`, a bad seed,
accessibility (axe-core), copying, actions that cannot run, the examples and the smaller details.

Screenshots of desktop (1366x900) and phone (390x844), light and dark, go to tests/artifacts/.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import axe_playwright_python
import pytest
from playwright.sync_api import Page, expect
from test_app_browser import (ANSWER_TIMEOUT_MS, ARTIFACTS, LONG_BUDGET, answers, attach, draw_pictures, figures,
                              screenshot, send, set_settings, wait_until_answered)

from app.config import EXAMPLES_DIR

LAPTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}
TOUCH = {"is_mobile": True, "has_touch": True}
SMALLEST_TAP_PX = 44
AXE_SCRIPT = Path(axe_playwright_python.__file__).with_name("axe.min.js")  # axe-core, as that package ships it


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, str]:
    return draw_pictures(tmp_path_factory.mktemp("pictures"), (900, 200))  # a wide green one


def screen(page: Page, name: str) -> None:
    """A screenshot of what the screen shows (on a phone a whole-page picture would misplace the pinned
    message box)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def log_of(page: Page):
    return page.locator("#chat [role=log]")


def scroll_state(page: Page) -> dict:
    return log_of(page).evaluate("l => ({top: l.scrollTop, height: l.scrollHeight, view: l.clientHeight})")


def at_end(page: Page) -> bool:
    state = scroll_state(page)
    return state["height"] - state["top"] - state["view"] <= 8


def answer_length(page: Page) -> int:
    return answers(page).last.evaluate("e => e.innerText.length")


def wait_for_more_text(page: Page, than: int, by: int = 300) -> None:
    """Wait until the streaming answer has grown by `by` characters beyond `than` (a condition, not a delay)."""
    page.wait_for_function(
        """([than, by]) => {
            const bubbles = document.querySelectorAll('#chat .bot-row [data-testid=bot] .message-content');
            return bubbles.length && bubbles[bubbles.length - 1].innerText.length >= than + by;
        }""", arg=[than, by], timeout=ANSWER_TIMEOUT_MS)


def user_texts(page: Page) -> list[str]:
    return [text.strip() for text in page.locator("#chat .user-row .message-content").all_inner_texts()
            if text.strip()]


def in_view_and_uncovered(locator) -> bool:
    """The element's centre is inside the window and nothing else (a pinned bar, a toast) is on top of it."""
    return locator.evaluate("""element => {
        const box = element.getBoundingClientRect();
        const x = box.left + box.width / 2, y = box.top + box.height / 2;
        if (y < 0 || y > window.innerHeight || x < 0 || x > window.innerWidth) return false;
        const top = document.elementFromPoint(x, y);
        return top !== null && (element === top || element.contains(top));
    }""")


def change_setting(page: Page, name: str, value: str) -> None:
    """Set one of the Generation settings, opening them only if they are closed."""
    number = page.locator(f"#{name.replace('_', '-')} input[type=number]")
    if not number.is_visible():
        set_settings(page, **{name: value})
        return
    number.fill(value)
    number.press("Tab")
    expect(number).to_have_value(value)


def start_long_answer(page: Page) -> None:
    set_settings(page, max_new_tokens=LONG_BUDGET)
    send(page, "Write a long story about the sea.")
    expect(answers(page)).to_have_count(1, timeout=ANSWER_TIMEOUT_MS)


def stop(page: Page, answered: int = 1) -> None:
    page.locator("#message .stop-button").click()
    wait_until_answered(page, answered)


# ---- reading while it streams ----------------------------------------------------------------------
def test_scrolling_up_during_a_long_answer_stays_where_the_reader_put_it(open_page, talkative_app):
    page = open_page(app=talkative_app)
    start_long_answer(page)
    page.wait_for_function("""() => { const l = document.querySelector('#chat [role=log]');
                                      return l.scrollHeight > l.clientHeight + 800; }""", timeout=ANSWER_TIMEOUT_MS)
    log_of(page).scroll_into_view_if_needed()  # the settings were opened further down the page
    box = log_of(page).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -400)
    page.wait_for_function("""() => { const l = document.querySelector('#chat [role=log]');
                                      return l.scrollHeight - l.scrollTop - l.clientHeight > 300; }""")
    where = scroll_state(page)["top"]
    wait_for_more_text(page, answer_length(page))
    assert abs(scroll_state(page)["top"] - where) <= 1, "the page pulled the reader back while the answer grew"
    jump = page.get_by_role("button", name="Jump to the latest message")
    expect(jump).to_be_visible()
    screenshot(page, "page-reading-while-streaming")
    jump.click()
    page.wait_for_function("""() => { const l = document.querySelector('#chat [role=log]');
                                      return l.scrollHeight - l.scrollTop - l.clientHeight <= 8; }""")
    wait_for_more_text(page, answer_length(page))
    assert at_end(page), "after jumping to the latest message the page should follow the answer again"
    stop(page)


# ---- a touch phone -------------------------------------------------------------------------------------
def test_on_a_touch_phone_the_newest_answer_is_in_view_after_sending(open_page, pictures):
    page = open_page(PHONE, **TOUCH)
    assert page.evaluate("window.scrollY") == 0, "the page should open at its top, not at the message box"
    expect(page.locator("#chat .example").first).to_be_visible()
    assert in_view_and_uncovered(page.locator("#chat .example").first), "the examples should be on screen"
    screen(page, "page-phone-empty-light")
    attach(page, pictures["red"])
    page.locator("#message textarea").fill("What color is the shape?")
    page.locator("#message .submit-button").tap()
    wait_until_answered(page)
    assert in_view_and_uncovered(answers(page).last), "the newest answer should be on screen after sending"
    assert in_view_and_uncovered(page.locator("#message textarea")), "the message box should stay on screen"
    expect(page.locator("#chat .example")).to_have_count(0)  # examples are gone once a conversation starts
    screen(page, "page-phone-answered-light")
    page.evaluate("window.scrollTo(0, 0)")  # the top of the page: the message box is pinned at the bottom
    box = page.locator("#message").bounding_box()
    assert PHONE["height"] / 2 <= box["y"] and box["y"] + box["height"] <= PHONE["height"] + 1, \
        f"the message box should be pinned at the bottom of the screen, it is at {box}"


def test_on_a_touch_phone_the_pages_controls_are_big_enough_for_a_finger(open_page, pictures):
    page = open_page(PHONE, **TOUCH)
    small = too_small_controls(page, ["#chat .example"])
    attach(page, pictures["red"])
    send(page, "What color is the shape?")
    wait_until_answered(page)
    controls = ["#message .upload-button", "#message .submit-button", "#retry", "#undo", "#clear",
                "#chat .top-panel button", "#chat .message-buttons button", "#policy > button.label-wrap",
                "#settings > button.label-wrap", "#message .thumbnail-item button"]
    small += too_small_controls(page, controls)
    assert not small, f"controls smaller than {SMALLEST_TAP_PX} px on a phone: {small}"


def too_small_controls(page: Page, selectors: list[str]) -> list[str]:
    small = []
    for selector in selectors:
        for index, control in enumerate(page.locator(selector).all()):
            if not control.is_visible():
                continue
            box = control.bounding_box()
            if box["width"] < SMALLEST_TAP_PX - 0.5 or box["height"] < SMALLEST_TAP_PX - 0.5:
                small.append(f"{selector}[{index}] {box['width']:.0f}x{box['height']:.0f}")
    return small


# ---- one Clear ---------------------------------------------------------------------------------------
def test_the_chats_trash_icon_clears_the_conversation_on_the_server_and_the_picture_card(open_page, pictures):
    page = open_page()
    attach(page, pictures["blue"])
    send(page, "What color are the shapes?")
    wait_until_answered(page)
    page.locator("#chat").get_by_role("button", name="Clear").click()
    expect(page.locator("#picture-caption")).to_contain_text("No picture yet")
    expect(page.locator("#active-picture img")).to_have_count(0)
    send(page, "Hello!")
    wait_until_answered(page)
    assert user_texts(page) == ["Hello!"], f"the cleared turns came back: {user_texts(page)}"
    expect(page.locator("#chat .user-row img")).to_have_count(0)
    page.reload()
    page.wait_for_selector("#message textarea")
    expect(page.locator("#chat .user-row")).to_have_count(1)  # the browser's copy is the same conversation


# ---- reloads and dropped files -------------------------------------------------------------------------
def test_a_reload_keeps_the_conversation_and_clear_forgets_it(open_page, pictures):
    page = open_page()
    attach(page, pictures["red"])
    send(page, "What color is the shape?")
    wait_until_answered(page)
    first_answer = answers(page).last.inner_text()
    page.reload()
    page.wait_for_selector("#message textarea")
    expect(page.locator("#chat .user-row .message-content").filter(has_text="What color is the shape?")) \
        .to_have_count(1)
    expect(answers(page).last).to_have_text(first_answer)
    expect(page.locator("#picture-caption")).to_contain_text("301 × 227 px")
    # The server has the conversation back too: a question without a picture is about the red one.
    send(page, "What color is the shape?")
    wait_until_answered(page, 2)
    assert "red" in answers(page).last.inner_text().lower()
    page.locator("#clear").click()
    expect(page.locator("#chat .user-row")).to_have_count(0)
    page.reload()
    page.wait_for_selector("#message textarea")
    expect(page.locator("#chat .example").first).to_be_visible()
    expect(page.locator("#chat .user-row")).to_have_count(0)
    expect(page.locator("#picture-caption")).to_contain_text("No picture yet")


def test_a_picture_dropped_on_the_chat_goes_to_the_message_box(open_page, pictures):
    page = open_page()
    url = page.url
    data = list(Path(pictures["red"]).read_bytes())
    transfer = page.evaluate_handle("""bytes => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'}));
        return transfer;
    }""", data)
    chat = page.locator("#chat [role=log]")
    chat.dispatch_event("dragover", {"dataTransfer": transfer})
    chat.dispatch_event("drop", {"dataTransfer": transfer})
    expect(page.locator("#message .thumbnail-item")).to_have_count(1)
    assert page.url == url
    send(page, "What color is the shape?")
    wait_until_answered(page)
    assert "red" in answers(page).last.inner_text().lower()


# ---- prices are not math --------------------------------------------------------------------------------
def test_dollar_amounts_are_shown_as_written(open_page):
    page = open_page()
    question = "It costs $5 and the blue one costs $10. Which is cheaper?"
    send(page, question)
    wait_until_answered(page)
    expect(page.locator("#chat .user-row .message-content").last).to_have_text(question)
    expect(page.locator("#chat .katex")).to_have_count(0)


# ---- a bad seed ----------------------------------------------------------------------------------------
def test_a_seed_below_minus_one_is_refused_by_name_and_nothing_is_stuck(open_page):
    page = open_page()
    set_settings(page, seed="-5")
    send(page, "Hello!")
    toast = page.locator("[data-testid=toast-body].error")
    expect(toast).to_contain_text("Seed")
    expect(page.locator("#chat .user-row")).to_have_count(0)
    expect(page.locator("#message textarea")).to_have_value("Hello!")
    expect(page.locator("#message .submit-button")).to_be_visible()
    expect(page.locator("#chat .error")).to_have_count(0)  # no error overlay over the conversation
    change_setting(page, "seed", "7")
    page.locator("#message .submit-button").click()
    wait_until_answered(page)
    page.locator("#retry").click()
    expect(figures(page)).to_have_count(0, timeout=ANSWER_TIMEOUT_MS)  # the answer is being redone
    wait_until_answered(page)
    expect(page.get_by_text("still answering")).to_have_count(0)


def test_one_over_long_message_is_reported_as_the_message_and_kept(open_page):
    page = open_page()
    question = "red " * 1500  # about 1,500 tokens: more than the tiny app's 1,024
    send(page, question)
    expect(page.locator("#chat").get_by_text(re.compile(r"Your message is [0-9,]+ tokens long"))).to_be_visible(
        timeout=ANSWER_TIMEOUT_MS)
    expect(page.get_by_text("Undo a few turns")).to_have_count(0)
    expect(page.locator("#chat .user-row .message-content").last).to_contain_text("red red red")  # kept


def ask_about_two_pictures(page: Page, pictures: dict[str, str]) -> None:
    """Two questions, each with its own picture: the first thread is then out of view."""
    attach(page, pictures["red"])
    send(page, "What color is the shape?")
    wait_until_answered(page)
    attach(page, pictures["blue"])
    send(page, "What color are the shapes?")
    wait_until_answered(page, 2)


# ---- accessibility -------------------------------------------------------------------------------------
def axe_problems(page: Page) -> list[str]:
    page.add_script_tag(path=str(AXE_SCRIPT))
    result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:4]}"
            for v in result["violations"] if v["impact"] in ("critical", "serious")]


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_axe_finds_no_serious_problem_empty_or_with_an_out_of_view_thread(open_page, pictures, dark):
    theme = "dark" if dark else "light"
    page = open_page(dark=dark)
    expect(page.locator("#chat .example").first).to_be_visible()
    problems = axe_problems(page)
    ask_about_two_pictures(page, pictures)
    expect(page.locator("#chat .oov-badge")).to_have_count(2)
    page.locator("#chat .user-row img").first.wait_for()
    problems += axe_problems(page)
    screenshot(page, f"page-desktop-two-threads-{theme}")
    assert not problems, "\n".join(problems)


def test_screenshots_of_the_phone_in_dark_mode(open_page, pictures):
    page = open_page(PHONE, dark=True, **TOUCH)
    screen(page, "page-phone-empty-dark")
    attach(page, pictures["green"])
    send(page, "What shape is this?")
    wait_until_answered(page)
    assert in_view_and_uncovered(answers(page).last)
    screen(page, "page-phone-answered-dark")


# ---- copying -------------------------------------------------------------------------------------------
def test_copy_gives_the_answer_and_the_conversation_as_plain_text(open_page, pictures):
    page = open_page(permissions=["clipboard-read", "clipboard-write"])
    ask_about_two_pictures(page, pictures)
    texts = [text.strip() for text in answers(page).all_inner_texts()]
    page.locator("#chat .bot-row + .message-buttons").last.get_by_role("button", name="Copy message").click()
    assert_clipboard(page, texts[-1])
    page.locator("#chat").get_by_role("button", name="Copy conversation").click()
    expected = (f"You: [picture]\nWhat color is the shape?\n\nAssistant: {texts[0]}\n\n"
                f"You: [picture]\nWhat color are the shapes?\n\nAssistant: {texts[1]}")
    assert_clipboard(page, expected)


def assert_clipboard(page: Page, expected: str) -> None:
    """Wait until the clipboard holds `expected` (copying is asynchronous); say what it holds if not."""
    holds = page.evaluate("""async expected => {
        for (let tries = 0; tries < 100; tries++) {
            const text = await navigator.clipboard.readText();
            if (text === expected) return text;
            await new Promise(resolve => setTimeout(resolve, 100));
        }
        return navigator.clipboard.readText();
    }""", expected)
    assert holds == expected


# ---- actions that cannot run ---------------------------------------------------------------------------
def test_actions_that_cannot_run_are_not_offered(open_page, talkative_app):
    page = open_page(app=talkative_app)
    expect(page.locator("#retry")).to_be_disabled()
    expect(page.locator("#undo")).to_be_disabled()
    set_settings(page, max_new_tokens="40")
    page.locator("#message textarea").fill("Hello!")
    page.locator("#message .submit-button").dblclick()
    wait_until_answered(page)
    expect(page.locator("#chat .user-row")).to_have_count(1)
    expect(page.locator("[data-testid=toast-body]")).to_have_count(0)
    expect(page.locator("#retry")).to_be_enabled()
    expect(page.locator("#undo")).to_be_enabled()
    change_setting(page, "max_new_tokens", LONG_BUDGET)
    send(page, "Write a long story about the sea.")
    expect(answers(page)).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#retry")).to_be_disabled()
    expect(page.locator("#undo")).to_be_disabled()
    stop(page, answered=2)
    expect(page.locator("#retry")).to_be_enabled()


def test_off_spaces_no_share_button_is_shown(open_page, pictures):
    page = open_page()
    attach(page, pictures["red"])
    send(page, "What color is the shape?")
    wait_until_answered(page)
    expect(page.locator("#chat").get_by_role("button", name="Share")).to_have_count(0)


# ---- the examples on a laptop --------------------------------------------------------------------------
def test_on_a_laptop_the_examples_are_in_view_and_one_click_sends_one(open_page):
    first = json.loads((EXAMPLES_DIR / "examples.json").read_text())[0]
    page = open_page(LAPTOP)
    example = page.locator("#chat .example").first
    expect(example).to_be_visible()
    box = example.bounding_box()
    assert box["y"] + box["height"] <= LAPTOP["height"], f"the first example is below the fold: {box}"
    example.click()
    sent = page.locator("#chat .user-row .message-content").filter(has_text=first["question"])
    expect(sent).to_have_count(1, timeout=ANSWER_TIMEOUT_MS)
    wait_until_answered(page)
    assert user_texts(page) == [first["question"]]
    assert first["answer"].lower().rstrip(".") in answers(page).last.inner_text().lower()


# ---- smaller things ------------------------------------------------------------------------------------
def test_the_attached_pictures_preview_shows_all_of_a_wide_picture(open_page, pictures):
    page = open_page()
    attach(page, pictures["green"])  # 900 x 200
    fit = page.locator("#message .thumbnail-item img").evaluate("img => getComputedStyle(img).objectFit")
    assert fit == "contain", f"the preview crops the picture (object-fit: {fit})"


def test_after_stop_typing_goes_on_in_the_message_box(open_page, talkative_app):
    page = open_page(app=talkative_app)
    start_long_answer(page)
    stop(page)
    page.keyboard.type("Next")
    expect(page.locator("#message textarea")).to_have_value("Next")


def test_after_choosing_a_picture_typing_goes_on_in_the_message_box(open_page, pictures):
    page = open_page()
    page.locator("#message .upload-button").focus()  # as after a click on the clip
    attach(page, pictures["red"])
    page.keyboard.type("What color?")
    expect(page.locator("#message textarea")).to_have_value("What color?")


def test_the_tab_has_the_apps_icon_and_the_link_preview_a_description(open_page, tiny_app):
    page = open_page()
    icon = page.request.get(tiny_app.url + "favicon.ico")
    assert icon.body() == (Path(__file__).parents[1] / "app" / "favicon.svg").read_bytes()
    description = page.locator("meta[name=description]").get_attribute("content")
    assert description and "picture" in description


def test_the_message_box_and_the_pictures_have_names(open_page, pictures):
    page = open_page()
    expect(page.get_by_role("textbox", name="Message")).to_be_visible()
    attach(page, pictures["red"])
    send(page, "What color is the shape?")
    wait_until_answered(page)
    for image in page.locator("#chat img, #active-picture img").all():
        assert (image.get_attribute("alt") or "").strip(), "every picture needs a text alternative"
    expect(page.get_by_role("button", name=re.compile("picture", re.IGNORECASE)).first).to_be_visible()


# ---- notices on a phone -----------------------------------------------------------------------------
def overlap(a: dict, b: dict) -> float:
    """The area two bounding boxes share, in square pixels."""
    width = min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"])
    height = min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"])
    return max(width, 0) * max(height, 0)


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_on_a_touch_phone_the_new_picture_notice_covers_no_message(open_page, pictures, dark):
    page = open_page(PHONE, dark=dark, **TOUCH)
    attach(page, pictures["red"])
    send(page, "What color is the shape?")
    wait_until_answered(page)
    attach(page, pictures["blue"])
    send(page, "What color are the shapes?")
    toast = page.locator("[data-testid=toast-body]").filter(has_text="New picture")
    expect(toast).to_be_visible()
    page.locator("#chat .user-row").nth(1).locator("img").wait_for()
    notice = toast.bounding_box()
    shown = [box for box in (row.bounding_box() for row in page.locator("#chat .message-row").all())
             if box and box["y"] < PHONE["height"] and box["y"] + box["height"] > 0]
    covered = [box for box in shown if overlap(notice, box) > 0]
    assert not covered, f"the notice at {notice} covers messages at {covered}"
    assert overlap(notice, page.locator("#message").bounding_box()) == 0, "the notice covers the message box"
    screen(page, f"page-phone-second-picture-{'dark' if dark else 'light'}")
    wait_until_answered(page, 2)


# ---- a second picture in the message box ---------------------------------------------------------------
def drop(page: Page, selector: str, paths: list[str]) -> None:
    """Drop the pictures at `paths` on the element at `selector`, as a file manager would."""
    files = [[list(Path(path).read_bytes()), Path(path).name] for path in paths]
    transfer = page.evaluate_handle("""files => {
        const transfer = new DataTransfer();
        for (const [bytes, name] of files) transfer.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/png'}));
        return transfer;
    }""", files)
    target = page.locator(selector)
    target.dispatch_event("dragover", {"dataTransfer": transfer})
    target.dispatch_event("drop", {"dataTransfer": transfer})


@pytest.mark.parametrize("where", ["#chat [role=log]", "#message textarea"], ids=["on-the-chat", "on-the-message-box"])
def test_a_second_picture_replaces_the_attached_one_and_the_page_says_so(open_page, pictures, where):
    page = open_page()
    attach(page, pictures["red"])
    page.locator("#message textarea").fill("What color is the shape?")
    drop(page, where, [pictures["blue"]])
    expect(page.locator("#picture-notice")).to_have_text(
        "A message takes one picture: blue_square.png replaced red_circle.png.")
    expect(page.locator("#message .thumbnail-item")).to_have_count(1)
    expect(page.locator("#message .thumbnail-item img")).to_have_attribute("src", re.compile("blue_square"))
    expect(page.locator("#message textarea")).to_have_value("What color is the shape?")
    screen(page, "page-second-picture-replaced")
    page.locator("#message .submit-button").click()
    wait_until_answered(page)
    assert "blue" in answers(page).last.inner_text().lower(), "the newer picture should be the one sent"
    expect(page.locator("#picture-notice")).to_be_hidden()  # the note was about the message just sent


def test_of_two_pictures_dropped_at_once_the_first_is_attached_and_the_page_says_so(open_page, pictures):
    page = open_page()
    drop(page, "#chat [role=log]", [pictures["green"], pictures["red"]])
    expect(page.locator("#picture-notice")).to_have_text(
        "A message takes one picture: green_triangle.png is attached, the first of the 2 pictures.")
    expect(page.locator("#message .thumbnail-item")).to_have_count(1)
    expect(page.locator("#message .thumbnail-item img")).to_have_attribute("src", re.compile("green_triangle"))


# ---- settings across reloads ---------------------------------------------------------------------------
def setting_values(page: Page) -> dict[str, str]:
    """The Generation settings as the page shows them (opening them if they are closed)."""
    if not page.locator("#temperature input[type=number]").is_visible():
        page.locator("#settings").get_by_text("Generation settings").click()
    values = {"system_prompt": page.locator("#system-prompt textarea").input_value()}
    for name in ["temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed"]:
        values[name] = page.locator(f"#{name.replace('_', '-')} input[type=number]").input_value()
    return values


def reload_with_system_prompt(page: Page, prompt: str) -> None:
    """Reload, and wait until the page has its settings back (the system prompt shows `prompt`)."""
    page.reload()
    page.wait_for_selector("#message textarea")
    page.locator("#settings").get_by_text("Generation settings").click()
    expect(page.locator("#system-prompt textarea")).to_have_value(prompt)


def kept_after(page: Page, change) -> None:
    """Do `change`, then wait until the browser's copy of the settings is rewritten (a reload before
    that would find the one before)."""
    before = page.evaluate("localStorage.getItem('mllama-chat-settings')")
    change()
    page.wait_for_function("before => localStorage.getItem('mllama-chat-settings') !== before", arg=before)


def test_settings_survive_a_reload_and_reset_forgets_them(open_page):
    page = open_page()
    defaults = setting_values(page)
    changed = {"temperature": "0.35", "seed": "7"}
    assert all(defaults[name] != value for name, value in changed.items())
    for name, value in changed.items():
        kept_after(page, lambda: change_setting(page, name, value))
    kept_after(page, lambda: page.locator("#system-prompt textarea").fill("Answer in one word.")
               or page.locator("#system-prompt textarea").press("Tab"))
    reload_with_system_prompt(page, "Answer in one word.")
    assert setting_values(page) == {**defaults, **changed, "system_prompt": "Answer in one word."}
    kept_after(page, lambda: page.locator("#reset-settings").click())
    reload_with_system_prompt(page, "Answer in one word.")
    # The model's defaults; the system prompt is the user's own, not a model default.
    assert setting_values(page) == {**defaults, "system_prompt": "Answer in one word."}


# ---- the API page -------------------------------------------------------------------------------------
def test_the_api_page_shows_ask_with_a_picture(open_page):
    page = open_page()
    page.get_by_text("Use via API").click()
    expect(page.get_by_text('client.predict(image=handle_file("photo.jpg")').first).to_be_visible()
