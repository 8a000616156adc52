"""Command-line flags and their environment variables.

A flag wins over its variable, a variable over the default. Hosts such as Hugging Face Spaces
configure an app through variables only; Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT /
GRADIO_SHARE are honoured, the rest use the MLLAMA_ prefix.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO_ROOT / "assets" / "tiny-mllama"
EXAMPLES_DIR = REPO_ROOT / "assets" / "examples"
LLAMA_VISION = "meta-llama/Llama-3.2-11B-Vision-Instruct"
DTYPES = ("auto", "bfloat16", "float16", "float32")
ZERO_GPU_VARIABLE = "SPACES_ZERO_GPU"  # set by Hugging Face on Spaces whose hardware is ZeroGPU
QUANTIZATIONS = ("int8", "int4")


@dataclass(frozen=True)
class AppConfig:
    model: str
    dtype: str = "auto"
    device_map: str = "auto"     # GPUs when there are any, else the CPU
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    max_new_tokens: int = 1024   # upper bound for the slider and for /ask
    context_tokens: int = 4096   # prompt + answer budget per conversation
    max_batch: int = 8           # answers generated at the same time
    queue_size: int = 32         # requests waiting beyond those
    auth: tuple[str, str] | None = None
    api_key: str | None = None   # required as "Authorization: Bearer KEY" by /v1
    backend: str | None = None   # an OpenAI-compatible server that answers instead of a local model
    backend_api_key: str | None = None
    backend_model: str | None = None
    compile: bool = False        # fixed-shape decoding through torch.compile (+ CUDA graphs on a GPU)
    quantize: str | None = None  # "int8" / "int4": weight-only quantization of the text decoder
    upload_max_age_s: int = 3600  # uploaded files older than this are deleted (checked as often)
    zero_gpu: bool = False       # a Hugging Face ZeroGPU Space: a GPU is attached per answer


# flag -> (environment variable, help)
_FLAGS = {
    "model": ("MLLAMA_MODEL", "checkpoint folder or Hugging Face Hub id (default: "
                              f"{LLAMA_VISION} if it is in the local Hub cache, else the tiny demo model)"),
    "dtype": ("MLLAMA_DTYPE", f"weights dtype, one of {', '.join(DTYPES)}"),
    "device_map": ("MLLAMA_DEVICE_MAP", "where to put the model: 'auto' (the GPUs if any, else the CPU), "
                                        "'cuda', 'cuda:1', 'cpu', ..."),
    "host": ("GRADIO_SERVER_NAME", "address to listen on; 0.0.0.0 for every interface"),
    "port": ("GRADIO_SERVER_PORT", "port to listen on"),
    "share": ("GRADIO_SHARE", "also open a public *.gradio.live link (expires after a week)"),
    "max_new_tokens": ("MLLAMA_MAX_NEW_TOKENS", "most tokens one answer may have"),
    "context_tokens": ("MLLAMA_CONTEXT_TOKENS", "most tokens one conversation may hold (prompt + answer)"),
    "max_batch": ("MLLAMA_MAX_BATCH", "answers generated at the same time"),
    "queue_size": ("MLLAMA_QUEUE_SIZE", "requests that may wait beyond those; more get 'queue full'"),
    "auth": ("MLLAMA_AUTH", "require a login, given as USER:PASSWORD"),
    "api_key": ("MLLAMA_API_KEY", "require 'Authorization: Bearer KEY' on the OpenAI-compatible /v1 API (with "
                                  "--auth and no key, /v1 is closed)"),
    "backend": ("MLLAMA_BACKEND", "URL of an OpenAI-compatible server (e.g. http://gpu-box:8000/v1) that answers "
                                  "instead of a model loaded here; --model, --dtype, --device-map and --quantize then do nothing"),
    "backend_api_key": ("MLLAMA_BACKEND_API_KEY", "the key that server wants (sent as a Bearer token)"),
    "backend_model": ("MLLAMA_BACKEND_MODEL", "the server's model to use (default: the first one it lists)"),
    "compile": ("MLLAMA_COMPILE", "decode through torch.compile, with CUDA graphs on a single GPU (faster "
                                  "answers; each batch size compiles once, on first use, for up to minutes)"),
    "quantize": ("MLLAMA_QUANTIZE", "store the text decoder's weights in int8 (half of bfloat16, near-identical "
                                    "answers) or int4 (a quarter; the 11B on a 12-16 GB GPU; Ampere or newer)"),
}
SWITCHES = ("share", "compile")  # flags without a value


def on_zero_gpu(environ: Mapping[str, str]) -> bool:
    """Whether this is a Hugging Face ZeroGPU Space, tested as `spaces.config.Config.zero_gpu`
    tests it: the variable is 1, t or true, in any case."""
    value = environ.get(ZERO_GPU_VARIABLE)
    return value is not None and value.lower() in ("1", "t", "true")


class FlagError(ValueError):
    """A flag or variable has a value we cannot use; the message names it and says what to pass."""


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Read the flags in `argv` (default: none) with `environ` (default: os.environ) as fallback."""
    environ = os.environ if environ is None else environ
    args = _parser().parse_args(list(argv or []))
    raw = {name: getattr(args, name) for name in _FLAGS}
    for name, (variable, _) in _FLAGS.items():
        if raw[name] in (None, False) and environ.get(variable, "").strip():
            raw[name] = environ[variable].strip()
    defaults = AppConfig(model="")
    model = raw["model"] or default_model()
    dtype = raw["dtype"] or defaults.dtype
    if dtype not in DTYPES:
        raise FlagError(f"--dtype / MLLAMA_DTYPE is {dtype!r}; use one of {', '.join(DTYPES)}.")
    quantize = raw["quantize"] or None
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise FlagError(f"{_flag('quantize')} is {quantize!r}; use int8 or int4, or leave it out for none.")
    return AppConfig(
        model=model,
        dtype=dtype,
        device_map=raw["device_map"] or defaults.device_map,
        host=raw["host"] or defaults.host,
        port=_positive_int("port", raw["port"], defaults.port),
        share=_boolean("share", raw["share"]),
        max_new_tokens=_positive_int("max_new_tokens", raw["max_new_tokens"], defaults.max_new_tokens),
        context_tokens=_positive_int("context_tokens", raw["context_tokens"], defaults.context_tokens),
        max_batch=_positive_int("max_batch", raw["max_batch"], defaults.max_batch),
        queue_size=_positive_int("queue_size", raw["queue_size"], defaults.queue_size),
        auth=_auth(raw["auth"]),
        api_key=raw["api_key"] or None,
        backend=raw["backend"] or None,
        backend_api_key=raw["backend_api_key"] or None,
        backend_model=raw["backend_model"] or None,
        compile=_boolean("compile", raw["compile"]),
        quantize=quantize,
        zero_gpu=on_zero_gpu(environ),
    )


def default_model() -> str:
    """Llama 3.2 Vision Instruct if a complete copy is already in the local Hub cache, else the tiny model.

    Looks only at files on disk: starting the app never waits on the network.
    """
    return cached_checkpoint(LLAMA_VISION) or str(TINY_MODEL)


def cached_checkpoint(repo_id: str, cache_dir: str | None = None) -> str | None:
    """The cached snapshot folder of `repo_id` if config, tokenizer and every weight shard are there."""
    index = try_to_load_from_cache(repo_id, "model.safetensors.index.json", cache_dir=cache_dir)
    if not isinstance(index, str):
        return None
    folder = Path(index).parent
    try:
        shards = set(json.loads(Path(index).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return None
    needed = ["config.json", "tokenizer.json", "preprocessor_config.json", *sorted(shards)]
    return str(folder) if all((folder / name).is_file() for name in needed) else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py", description="Chat with Llama 3.2 Vision about pictures, in the browser.",
        epilog="Every flag has an environment variable (shown in brackets); the flag wins.")
    defaults = AppConfig(model="")
    for name, (variable, text) in _FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if name in SWITCHES:
            parser.add_argument(flag, action="store_true", help=f"{text} (default: off) [{variable}]")
            continue
        default = getattr(defaults, name)
        shown = "" if name == "model" else f" (default: {'none' if default is None else default})"
        parser.add_argument(flag, default=None, help=f"{text}{shown} [{variable}]")
    return parser


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')} / {_FLAGS[name][0]}"


def _positive_int(name: str, value: object, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        number = int(str(value))
    except ValueError:
        raise FlagError(f"{_flag(name)} is {value!r}; pass a whole number such as {default}.") from None
    if number < 1:
        raise FlagError(f"{_flag(name)} is {number}; pass a number of 1 or more, such as {default}.")
    return number


def _boolean(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise FlagError(f"{_flag(name)} is {value!r}; use true or false.")


def _auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise FlagError(f"{_flag('auth')} must look like USER:PASSWORD (got {len(value)} characters without "
                          "a user and a password around a colon).")
    return user, password
