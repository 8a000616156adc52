"""Shared fixtures. Append new ones; don't rewrite others' (several helpers add fixtures here)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from reference import Variant, build_hf_model, save_hf


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory):
    """Factory: `tiny_hf_checkpoint(vision={...}, text={...}, seed=0, dtype=None, max_shard_size=None)`
    -> folder of a random transformers MllamaForConditionalGeneration saved with `save_pretrained`.

    The config is reference.BASE_VISION / BASE_TEXT with `vision` / `text` overrides; gates are
    opened (non-zero) by reference.build_hf_model. `dtype` casts the model before saving (so
    config.json and the safetensors say that dtype); `max_shard_size` (e.g. "20KB") makes a sharded
    checkpoint. Each distinct set of arguments is built once per session: treat the folder as
    read-only (copy it to tmp_path to damage it).
    """
    built: dict[str, Path] = {}

    def make(
        vision: dict | None = None,
        text: dict | None = None,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        max_shard_size: str | int | None = None,
    ) -> Path:
        key = json.dumps([vision, text, seed, str(dtype), max_shard_size], sort_keys=True)
        if key not in built:
            hf = build_hf_model(Variant("tiny", vision or {}, text or {}), seed=seed)
            if dtype is not None:
                hf = hf.to(dtype)
            built[key] = Path(save_hf(hf, tmp_path_factory.mktemp("hf_checkpoint"), max_shard_size))
        return built[key]

    return make


# --- processor fixtures (image processing, tokenizer, chat template) ------------------------------
HUB_PREPROCESSOR_CONFIG = {  # meta-llama/Llama-3.2-11B-Vision-Instruct preprocessor_config.json
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "MllamaImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "max_image_tiles": 4, "processor_class": "MllamaProcessor",
    "resample": 2, "rescale_factor": 0.00392156862745098, "size": {"height": 560, "width": 560},
}
OFFICIAL_CHAT_TEMPLATE_FILE = Path(__file__).parent / "data" / "chat_template.json"


@pytest.fixture(scope="session")
def mllama_processor_dir(tmp_path_factory) -> Path:
    """A checkpoint folder with only the processor files: a Llama-3-style byte-level BPE tokenizer with
    the real special-token ids (scripts/make_tokenizer.py), the official Instruct chat template and
    the Hub's preprocessor_config.json. Read-only: copy it to damage it."""
    from scripts.make_tokenizer import build_llama3_tokenizer, write_tokenizer_files

    folder = tmp_path_factory.mktemp("mllama_processor")
    template = json.loads(OFFICIAL_CHAT_TEMPLATE_FILE.read_text())["chat_template"]
    write_tokenizer_files(build_llama3_tokenizer(), folder, template)
    (folder / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR_CONFIG, indent=2))
    return folder


@pytest.fixture(scope="session")
def reference_image_processor():
    """transformers' MllamaImageProcessor, PIL backend, with the Hub's settings (the oracle)."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(**{k: v for k, v in HUB_PREPROCESSOR_CONFIG.items()
                                      if k not in ("image_processor_type", "processor_class")})


@pytest.fixture(scope="session")
def reference_processor(mllama_processor_dir, reference_image_processor):
    """transformers' MllamaProcessor over the same tokenizer.json and chat template (the oracle)."""
    from transformers import MllamaProcessor as ReferenceProcessor
    from transformers import PreTrainedTokenizerFast

    template = json.loads(OFFICIAL_CHAT_TEMPLATE_FILE.read_text())["chat_template"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(mllama_processor_dir))
    return ReferenceProcessor(image_processor=reference_image_processor, tokenizer=tokenizer, chat_template=template)


# --- app fixtures (the Gradio app) -------------------------------------------------------------------
def free_port() -> int:
    """A port the OS has just handed out. Gradio's own choice, the first free one from 7860, is the
    port that any other app started on this machine takes next, so a test that closes a server and
    expects it to be unreachable could reach someone else's server instead."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve_app(model: Path, **config: object):
    """Load the real engine on `model`, build the page, serve it on a free local port; yields a
    namespace with `url`, `engine` and `config`, and closes everything afterwards."""
    from types import SimpleNamespace

    from app.config import AppConfig
    from app.server import launch, load_engine
    from app.ui import build_demo

    settings = AppConfig(model=str(model), **config)
    engine = load_engine(settings)
    assert engine is not None, f"the engine could not load {model}"
    demo = build_demo(engine, settings)
    _, url, _ = launch(demo, settings, engine, server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield SimpleNamespace(url=url.rstrip("/") + "/", engine=engine, config=settings)
    demo.close()
    engine.close()


@pytest.fixture(scope="session")
def tiny_app():
    """The chat app on the real engine and assets/tiny-mllama; shared by the client and browser tests."""
    from app.config import TINY_MODEL

    if not (TINY_MODEL / "config.json").is_file():
        pytest.fail(f"{TINY_MODEL} is missing: the app tests need the trained tiny checkpoint "
                    "(scripts/train_tiny.py writes it)")
    yield from _serve_app(TINY_MODEL, max_new_tokens=2048, max_batch=4, queue_size=16)


@pytest.fixture(scope="session")
def talkative_app(tmp_path_factory):
    """The chat app on the real engine and a random-weights checkpoint that has no end token, so
    every answer runs to max_new_tokens (16,000 tokens: tens of seconds on a CPU).

    For the tests that need an answer long enough to be stopped: tiny-mllama always ends its
    answer after a few words, at any temperature.
    """
    from engine_checkpoint import write_talkative_checkpoint

    folder = write_talkative_checkpoint(tmp_path_factory.mktemp("talkative"))
    yield from _serve_app(folder, max_new_tokens=16000, context_tokens=16384, max_batch=4, queue_size=16)


def resident_bytes() -> int:
    """This process's resident memory now (Linux), for tests that bound what a request costs."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


# ---- Chromium, for the page's tests ---------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright's own browser download is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DESKTOP = {"width": 1366, "height": 900}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, request):
    """Factory: a fresh tab (its own browser storage and session) on `app` (default: tiny_app), at
    `viewport` size, in dark mode if asked; `options` go to the browser context (touch, say)."""
    contexts = []

    def open_(viewport: dict = DESKTOP, app=None, dark: bool = False, **options):
        app = app or request.getfixturevalue("tiny_app")
        context = browser.new_context(viewport=viewport, color_scheme="dark" if dark else "light", **options)
        contexts.append(context)
        page = context.new_page()
        page.goto(app.url)
        page.wait_for_selector("#message textarea")
        return page

    yield open_
    for context in contexts:
        context.close()
