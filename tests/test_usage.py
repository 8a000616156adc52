"""The reference's own usage examples run with only the import line changed."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
from PIL import Image

from engine_checkpoint import write_engine_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = write_engine_checkpoint(tmp_path_factory.mktemp("usage_ck"))
    picture = tmp_path_factory.mktemp("pictures") / "rabbit.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(picture)
    return folder, picture


def test_model_card_example_runs(checkpoint, capsys):
    folder, picture = checkpoint
    # The Llama-3.2-11B-Vision-Instruct model card example; only the import line differs, and the
    # model id and picture point at local files (there is no network here).
    example = textwrap.dedent('''
        import requests
        import torch
        from PIL import Image
        from model import MllamaForConditionalGeneration, AutoProcessor

        model_id = MODEL_ID

        model = MllamaForConditionalGeneration.from_pretrained(
            model_id,
            torch_dtype=torch.bfloat16,
            device_map="auto",
        )
        processor = AutoProcessor.from_pretrained(model_id)

        image = Image.open(PICTURE)

        messages = [
            {"role": "user", "content": [
                {"type": "image"},
                {"type": "text", "text": "If I had to write a haiku for this one, it would be: "}
            ]}
        ]
        input_text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(
            image,
            input_text,
            add_special_tokens=False,
            return_tensors="pt"
        ).to(model.device)

        output = model.generate(**inputs, max_new_tokens=30)
        print(processor.decode(output[0]))
    ''').replace("import requests\n", "")
    exec(example, {"MODEL_ID": str(folder), "PICTURE": str(picture)})
    printed = capsys.readouterr().out
    assert printed.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>If I had to write a haiku")


def test_pipeline_answers_an_image_and_a_question(checkpoint):
    from model import pipeline

    folder, picture = checkpoint
    pipe = pipeline("image-text-to-text", model=str(folder))
    out = pipe(images=str(picture), text="What does this image show?", max_new_tokens=5, do_sample=False)
    assert isinstance(out, list) and set(out[0]) == {"input_text", "generated_text"}
    assert out[0]["generated_text"].startswith("What does this image show?")


def test_pipeline_takes_chat_messages(checkpoint):
    from model import pipeline

    folder, picture = checkpoint
    pipe = pipeline("image-text-to-text", model=str(folder))
    messages = [{"role": "user", "content": [{"type": "image", "path": str(picture)}, {"type": "text", "text": "Describe."}]}]
    out = pipe(text=messages, max_new_tokens=5, do_sample=False)
    chat = out[0]["generated_text"]
    assert chat[:-1] == messages and chat[-1]["role"] == "assistant" and isinstance(chat[-1]["content"], str)


def test_the_model_cards_text_first_call_is_understood(checkpoint):
    """pipe("What does this image show?", "path.png"): transformers refuses this order, the seed
    page writes it; the argument that is a picture is the picture."""
    from model import pipeline

    folder, picture = checkpoint
    pipe = pipeline("image-text-to-text", model=str(folder))
    swapped = pipe("What does this image show?", str(picture), max_new_tokens=5, do_sample=False)
    assert swapped == pipe(images=str(picture), text="What does this image show?", max_new_tokens=5, do_sample=False)


def test_chat_messages_with_picture_urls_and_lists_of_conversations_match_transformers(checkpoint):
    import base64

    from transformers import pipeline as reference_pipeline

    from model import pipeline

    folder, picture = checkpoint
    data = "data:image/jpeg;base64," + base64.b64encode(picture.read_bytes()).decode()
    first = [{"role": "user", "content": [{"type": "image", "url": str(picture)}, {"type": "text", "text": "Describe."}]}]
    second = [{"role": "user", "content": [{"type": "image", "url": data}, {"type": "text", "text": "What is it?"}]}]
    ours = pipeline("image-text-to-text", model=str(folder), semantics="transformers")
    theirs = reference_pipeline("image-text-to-text", model=str(folder))
    options = dict(max_new_tokens=6, generate_kwargs={"do_sample": False})
    assert ours(text=first, **options) == theirs(text=first, **options)
    # transformers pads a list of conversations into one batch; compare with each run alone, the
    # arithmetic ours does, so float rounding cannot flip a token on another CPU.
    assert ours(text=[first, second], **options) == [theirs(text=first, **options), theirs(text=second, **options)]
