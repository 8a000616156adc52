"""Find a checkpoint: a local folder as is, or a Hugging Face Hub id via the local cache, then the network."""
from __future__ import annotations

import os

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

_IGNORE = ["original/*"]  # Meta's consolidated.pth checkpoints, which we do not read


# What a download of a checkpoint fetches: config, tokenizer, template and weights (not Meta's original/*.pth).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja"]


class CheckpointNotFoundError(OSError):
    """Neither a local folder nor a Hub repository we can get."""


def resolve_checkpoint(path_or_id: str | os.PathLike, allow_patterns: list[str] | None = None) -> str:
    """Return a local folder holding the checkpoint `path_or_id`.

    A local folder is used as is. Anything else must be a Hub id ("org/name"): the local Hugging Face
    cache is tried first (no network), then the Hub, downloading only files matching `allow_patterns`
    (all by default) and never Meta's `original/` weights (another format, as big again).
    """
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointNotFoundError(f"{path!r} is a file: pass the checkpoint folder that holds it")
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise CheckpointNotFoundError(
            f"{path!r} is not a folder (nothing is there) and not a Hugging Face Hub id ('org/name'): "
            "pass the folder that holds config.json and the *.safetensors files"
        ) from None
    try:
        # Offline-first: a complete cached snapshot needs no network (an incomplete one raises).
        return snapshot_download(path, allow_patterns=allow_patterns, ignore_patterns=_IGNORE, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    how_to = (
        f"Download it where the Hub is reachable (`hf download {path} --local-dir DIR`) and pass that folder "
        "instead of the id; gated repos such as meta-llama/* also need you to accept the license on the model "
        "page and set HF_TOKEN."
    )
    try:
        return snapshot_download(path, allow_patterns=allow_patterns, ignore_patterns=_IGNORE)
    except GatedRepoError as e:
        raise CheckpointNotFoundError(
            f"{path!r} is a gated Hugging Face repository and this machine has no access to it ({e}). {how_to}"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointNotFoundError(
            f"{path!r} is not a local folder and the Hugging Face Hub has no such repository, or it is private "
            f"or gated and no valid HF_TOKEN is set. {how_to}"
        ) from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointNotFoundError(
            f"{path!r} is not a local folder, not in the local Hugging Face cache, and the Hub cannot be reached "
            f"(offline, HF_HUB_OFFLINE=1, or no network: {type(e).__name__}: {e}). {how_to}"
        ) from e
