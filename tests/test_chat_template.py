"""The official Instruct chat template renders like transformers and like the spec's reference strings."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from model.chat_template import ChatTemplateError, load_chat_template, render_chat_template

TEMPLATE_FILE = Path(__file__).parent / "data" / "chat_template.json"
TEMPLATE = json.loads(TEMPLATE_FILE.read_text())["chat_template"]
SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
DATE = "26 Jul 2024"


def render(messages, **kwargs) -> str:
    return render_chat_template(TEMPLATE, messages, **{"add_generation_prompt": True, "date_string": DATE,
                                                       **SPECIALS, **kwargs})


# Reference renderings of the current Instruct template, as transformers' processor gives them
def test_image_prompt_renders_as_the_spec_reference():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    assert render(messages) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe this image.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_text_prompt_renders_as_the_spec_reference_with_the_system_date_block():
    assert render([{"role": "user", "content": "Hello"}]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_system_message_with_image_renders_as_the_spec_reference():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert render(messages) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "<|image|>Describe.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


CONVERSATIONS = {
    "multi_turn_with_image": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": "And its colour?  "}],
    "system_text_only": [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "Hi"}],
    "text_then_image_parts": [{"role": "user", "content": [{"type": "text", "text": "Compare "},
                                                            {"type": "image"}, {"type": "text", "text": " and "},
                                                            {"type": "image"}]}],
    "unicode_text": [{"role": "user", "content": "Qu'est-ce que c'est ? 猫 🐈"}],
    "tool_call_and_result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": {"temperature": 21}}],
}


@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_transformers(case, add_generation_prompt, reference_processor):
    messages = CONVERSATIONS[case]
    expected = reference_processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                       date_string=DATE)
    assert render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_tools_render_equal_to_transformers(reference_processor):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {
                                                   "type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Zürich?"}]
    expected = reference_processor.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                       date_string=DATE)
    assert render(messages, tools=tools) == expected
    assert '"name": "get_weather"' in expected and "Zürich" in expected, "tools must be serialised as JSON"


def test_date_defaults_to_today_through_strftime_now():
    before = datetime.now().strftime("%d %b %Y")
    text = render_chat_template(TEMPLATE, [{"role": "user", "content": "Hi"}], **SPECIALS)
    after = datetime.now().strftime("%d %b %Y")  # the date may change while the template renders
    assert f"Today Date: {before}\n" in text or f"Today Date: {after}\n" in text


def test_raise_exception_in_a_template_becomes_a_clear_error():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(ChatTemplateError, match="refused this conversation: Cannot put tools in the first user"):
        render([{"role": "system", "content": "Only a system message"}], tools=tools)


def test_trim_and_lstrip_blocks_are_on():
    template = "{% for m in messages %}\n    {% if m %}\n{{ m['content'] }}\n    {% endif %}\n{% endfor %}"
    assert render_chat_template(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) \
        == "a\nb\n"


def test_template_sees_images_as_placeholders_only():
    class Secret:
        pass
    template = "{{ messages[0]['content'][0]['image'] }}"
    messages = [{"role": "user", "content": [{"type": "image", "image": Secret()}]}]
    assert render_chat_template(template, messages) == "<Secret>"


@pytest.mark.parametrize("messages, message", [
    ([{"role": "wizard", "content": "hi"}], "unknown role 'wizard'"),
    ([{"content": "hi"}], "must be a dict with 'role' and 'content'"),
    ([], "non-empty list"),
    ([{"role": "user", "content": 42}], "content must be a string or a list of parts"),
    ([{"role": "user", "content": [{"type": "video"}]}], "type 'video'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "needs a 'text' string"),
])
def test_malformed_conversations_are_refused_with_the_reason(messages, message):
    with pytest.raises(ChatTemplateError, match=message):
        render(messages)


def test_template_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match="syntax error on line 2"):
        render_chat_template("ok\n{% if %}", [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("name, content", [
    ("chat_template.jinja", "JINJA"),
    ("chat_template.json", json.dumps({"chat_template": "JSON"})),
    ("tokenizer_config.json", json.dumps({"chat_template": [{"name": "default", "template": "NAMED"}]})),
])
def test_template_is_found_in_each_file_the_hub_uses(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    assert load_chat_template(tmp_path) == {"chat_template.jinja": "JINJA", "chat_template.json": "JSON",
                                            "tokenizer_config.json": "NAMED"}[name]


def test_chat_template_jinja_wins_over_json(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("JINJA")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "JSON"}))
    assert load_chat_template(tmp_path) == "JINJA"
