"""The page: a chat about pictures. First what is on the page, then how its events are wired."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from .answering import RANDOM_SEED, RunningAnswers
from .api import add_ask_endpoint
from .config import EXAMPLES_DIR, LLAMA_VISION, TINY_MODEL, AppConfig
from .conversation import Conversation
from .display import POLICY, picture_card
from .examples import chat_examples, load_examples
from .handlers import ChatHandlers
from .saved import restored_settings, saved_settings

if TYPE_CHECKING:
    from serving import Engine

HERE = Path(__file__).parent
CSS = (HERE / "theme.css").read_text()
if not os.environ.get("SPACE_ID"):  # Gradio's share buttons only work on Hugging Face Spaces
    CSS += "\n#chat button[aria-label=Share] { display: none !important; }\n"
PAGE_JS = (HERE / "page.js").read_text()
FAVICON = HERE / "favicon.svg"
DESCRIPTION = ("Chat with Llama 3.2 Vision about a picture: add a photo, a receipt or a drawing and ask about it. "
               "Runs the model in plain PyTorch.")
HEAD = (f'<meta name="description" content="{DESCRIPTION}">\n'
        f'<meta property="og:description" content="{DESCRIPTION}">')
# No single `$`: "it costs $5 and that one $10" is a price, not math.
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "\\(", "right": "\\)", "display": False},
         {"left": "\\[", "right": "\\]", "display": True}]
DEMO_NOTE = (
    "**Demo model.** Answers come from `tiny-mllama`, a few-MB model trained on simple drawings: it only "
    "knows the colour, shape and number of shapes in a picture. To chat with the real model, run "
    f"`python app.py --model {LLAMA_VISION}` (a GPU with 24 GB or more; accept the license on the model "
    "page and set `HF_TOKEN`).")


def build_demo(engine: Engine, config: AppConfig) -> gr.Blocks:
    info = engine.info
    defaults = info.defaults
    examples = load_examples(EXAMPLES_DIR) if EXAMPLES_DIR.is_dir() else []
    # Served from their folder, not copied to Gradio's cache: the cache's cleaning (see delete_cache
    # below) would delete the copies the empty chat's examples point to, and picking one would fail.
    gr.set_static_paths([str(EXAMPLES_DIR)])
    handlers = ChatHandlers(engine, config.max_new_tokens, RunningAnswers(),
                            [Path(gr.utils.get_upload_folder()), EXAMPLES_DIR], examples)
    default_seed = RANDOM_SEED if defaults.seed is None else defaults.seed

    # Uploads pile up in Gradio's temporary folder whether or not a message is sent: delete old ones.
    max_age = config.upload_max_age_s
    with gr.Blocks(title="Llama 3.2 Vision chat", fill_height=True, delete_cache=(max_age, max_age)) as demo:
        conversation = gr.State(Conversation())
        # Copies the conversation as plain text (the page's script writes it): questions and answers only.
        copy_all = gr.Button("Copy conversation", elem_id="copy-conversation", render=False)
        # The browser's copy of the conversation, so that a reload keeps it (encrypted by Gradio).
        kept = gr.BrowserState(None, storage_key="mllama-chat-conversation")
        kept_settings = gr.BrowserState(None, storage_key="mllama-chat-settings")  # the same for the settings

        # ---- the page -------------------------------------------------------------------------
        with gr.Row(elem_id="header"):
            gr.Markdown(f"# Llama 3.2 Vision chat\n`{model_name(info.model_id)}` · ask about a picture, "
                        "or just chat" + (f" · {info.quantization} weights" if info.quantization else ""))
        if not config.backend and Path(config.model).resolve() == TINY_MODEL.resolve():  # only a demo
            gr.Markdown(DEMO_NOTE, elem_id="demo-note")

        with gr.Row(equal_height=False, elem_id="main"):
            with gr.Column(scale=3, min_width=320, elem_id="chat-column"):
                chatbot = gr.Chatbot(
                    label="Conversation", show_label=False, elem_id="chat", scale=1, min_height=360,
                    height="62vh", buttons=["copy", copy_all], latex_delimiters=LATEX,
                    feedback_options=None, layout="bubble", autoscroll=False,  # the page's script follows
                    allow_file_downloads=False, examples=chat_examples(examples),
                    placeholder="### Ask about a picture\nAdd one with the clip button, paste it or drop it "
                                "here, or start from an example:")
                textbox = gr.MultimodalTextbox(
                    label="Message", show_label=False, elem_id="message", file_types=["image"],
                    file_count="single", sources=["upload"],
                    placeholder="Ask a question, or add a picture with the clip",
                    max_plain_text_length=20000, submit_btn=True, stop_btn=False)
                with gr.Row(elem_id="actions"):
                    retry_button = gr.Button("↻ Retry", size="sm", elem_id="retry", min_width=80, interactive=False)
                    undo_button = gr.Button("↶ Undo", size="sm", elem_id="undo", min_width=80, interactive=False)
                    clear_button = gr.Button("✕ Clear", size="sm", elem_id="clear", min_width=80)

            with gr.Column(scale=1, min_width=280, elem_id="side-column"):
                with gr.Group(elem_id="picture-card"):
                    thumbnail = gr.Image(label="What the model sees", interactive=False, height=200,
                                         buttons=["fullscreen"], elem_id="active-picture",
                                         placeholder="No picture")
                    caption = gr.Markdown(picture_card(None, info.tile_size), elem_id="picture-caption")
                with gr.Accordion("One picture at a time", open=True, elem_id="policy"):
                    gr.Markdown(POLICY)
                with gr.Accordion("Generation settings", open=False, elem_id="settings"):
                    system_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt",
                                               placeholder="Optional, e.g. “Answer in one short sentence.”")
                    temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature",
                                            info="0 = greedy: always the most likely next token",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p", elem_id="top-p")
                    top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k", info="0 = off",
                                      elem_id="top-k")
                    max_new_tokens = gr.Slider(1, config.max_new_tokens, step=1, label="Max new tokens",
                                               value=min(defaults.max_new_tokens, config.max_new_tokens),
                                               elem_id="max-new-tokens")
                    repetition_penalty = gr.Slider(1, 2, value=defaults.repetition_penalty, step=0.05,
                                                   label="Repetition penalty", info="1 = off",
                                                   elem_id="repetition-penalty")
                    # No `minimum`: Gradio's own check would fail the answer without naming the field.
                    seed = gr.Number(label="Seed", value=default_seed, precision=0,
                                     info="-1 = a new random seed for every answer", elem_id="seed")
                    reset_button = gr.Button("Reset to the model's defaults", size="sm", elem_id="reset-settings")

        add_ask_endpoint(engine, config.max_new_tokens, config.max_batch)

        # ---- the wiring -----------------------------------------------------------------------
        settings = [system_prompt, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed]
        shown = [conversation, chatbot]
        card = [thumbnail, caption]
        buttons = [retry_button, undo_button]
        quick = {"api_visibility": "private", "concurrency_limit": None, "show_progress": "hidden"}
        # What only books state (the browser's copy, the buttons after an answer) skips the queue:
        # when answers fill it, a queued event would be refused as "busy" and the change lost.
        immediate = {"api_visibility": "private", "queue": False, "show_progress": "hidden"}
        answering = {"api_visibility": "private", "concurrency_id": "answer",
                     "concurrency_limit": config.max_batch, "show_progress": "minimal"}

        # Sending: from the message box, or an example picked in the empty chat (sent as it is).
        def sending(checked: gr.events.Dependency) -> gr.events.Dependency:
            submitted = checked.success(handlers.submit, [conversation, textbox],
                                        [*shown, textbox, *card, *buttons, kept], **quick)
            answer = submitted.success(handlers.answer, [conversation, *settings], shown, **answering)
            answer.then(handlers.answered, conversation, [textbox, *buttons, kept], **immediate)
            return answer

        typed = textbox.submit(handlers.check_message, [conversation, textbox, seed], None, trigger_mode="once",
                               **quick)
        picked = chatbot.example_select(handlers.send_example, seed, textbox, **quick)
        answers = [sending(typed), sending(picked.success(handlers.check_message, [conversation, textbox, seed],
                                                          None, **quick))]

        retry_checked = retry_button.click(handlers.check_retry, [conversation, seed], None, **quick)
        retried = retry_checked.success(handlers.retry, conversation, [*shown, textbox, *buttons], **quick)
        retry_answer = retried.success(handlers.answer, [conversation, *settings], shown, **answering)
        retry_answer.then(handlers.answered, conversation, [textbox, *buttons, kept], **immediate)

        # Stop and Clear skip the queue too: they must work when it is full (they only free work).
        textbox.stop(handlers.stop, conversation, [*shown, textbox, *buttons, kept],
                     cancels=[*answers, retry_answer], **immediate)
        undo_button.click(handlers.undo, conversation, [*shown, textbox, *card, *buttons, kept], **quick)
        # The chat's own trash icon is a Clear too: the server forgets the turns, the card its picture.
        gr.on([clear_button.click, chatbot.clear], handlers.clear, None, [*shown, textbox, *card, *buttons, kept],
              cancels=[*answers, retry_answer], **immediate)
        # The settings as the model's defaults, by name; the browser keeps every change (Reset's too).
        setting_defaults = {"system_prompt": "", "temperature": defaults.temperature, "top_p": defaults.top_p,
                            "top_k": defaults.top_k,
                            "max_new_tokens": min(defaults.max_new_tokens, config.max_new_tokens),
                            "repetition_penalty": defaults.repetition_penalty, "seed": default_seed}
        setting_bounds = {name: (field.minimum, field.maximum) for name, field in zip(setting_defaults, settings)
                          if isinstance(field, gr.Slider)}
        reset_button.click(lambda: list(setting_defaults.values())[1:], None, settings[1:], **quick)
        gr.on([field.change for field in settings], lambda *values: saved_settings(list(setting_defaults), values),
              settings, kept_settings, **immediate)
        copy_all.click(None, chatbot, None, js="(messages) => window.mllamaCopyConversation(messages)")
        demo.load(handlers.restore, [conversation, kept], [*shown, *card, *buttons], **immediate)
        demo.load(lambda data: restored_settings(data, setting_defaults, setting_bounds), kept_settings, settings,
                  **immediate)
        demo.unload(handlers.leave)
    return demo


def model_name(model_id: str) -> str:
    """A checkpoint folder is shown by its name, a Hub id as it is."""
    path = Path(model_id)
    return path.name if path.is_absolute() or path.exists() else model_id
