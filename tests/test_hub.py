"""Checkpoints named by a Hugging Face Hub id: the local cache first, then the network; offline or
unknown ids give an error that says how to use a local folder instead."""
from __future__ import annotations

import shutil

import httpx
import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

import model.hub
from loading_helpers import assert_same_weights, transformers_weights
from model import MllamaForConditionalGeneration
from model.hub import CheckpointNotFoundError


def fake_hub(monkeypatch, network):
    """Replace snapshot_download: nothing is cached; `network(**kwargs)` answers the download. Returns
    the keyword arguments of every call."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return network()

    monkeypatch.setattr(model.hub, "snapshot_download", snapshot_download)
    return calls


def http_error(cls, status: int):
    request = httpx.Request("GET", "https://huggingface.co/api/models/some-org/tiny-mllama")
    return cls(f"{status} from the Hub", response=httpx.Response(status, request=request))


def test_unknown_hub_id_offline_says_how_to_use_a_local_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    repo = "no-such-org/no-such-mllama"
    with pytest.raises(CheckpointNotFoundError) as err:
        MllamaForConditionalGeneration.from_pretrained(repo)
    message = str(err.value)
    assert repo in message and "pass that folder instead of the id" in message and "HF_TOKEN" in message


def test_hub_id_in_the_local_cache_loads_without_network(tiny_hf_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--some-org--tiny-mllama"
    shutil.copytree(tiny_hf_checkpoint(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    ours = MllamaForConditionalGeneration.from_pretrained("some-org/tiny-mllama")
    assert_same_weights(ours.state_dict(), transformers_weights(tiny_hf_checkpoint()))


def test_hub_id_not_cached_is_downloaded_without_meta_original_weights(tiny_hf_checkpoint, monkeypatch):
    calls = fake_hub(monkeypatch, lambda: str(tiny_hf_checkpoint()))
    MllamaForConditionalGeneration.from_pretrained("some-org/tiny-mllama")
    assert [c.get("local_files_only", False) for c in calls] == [True, False], "cache first, then the network"
    assert all("original/*" in c["ignore_patterns"] for c in calls)
    assert all("*.safetensors" in c["allow_patterns"] for c in calls)


def test_gated_hub_id_says_to_accept_the_license_and_set_hf_token(monkeypatch):
    def gated():
        raise http_error(GatedRepoError, 401)

    fake_hub(monkeypatch, gated)
    with pytest.raises(CheckpointNotFoundError, match="'some-org/tiny-mllama' is a gated .*accept the license .*HF_TOKEN"):
        MllamaForConditionalGeneration.from_pretrained("some-org/tiny-mllama")


def test_unknown_hub_id_online_says_it_does_not_exist(monkeypatch):
    def missing():
        raise http_error(RepositoryNotFoundError, 404)

    fake_hub(monkeypatch, missing)
    with pytest.raises(CheckpointNotFoundError, match="Hugging Face Hub has no such repository.*pass that folder"):
        MllamaForConditionalGeneration.from_pretrained("some-org/tiny-mllama")


def test_missing_local_folder_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="is not a folder .* pass the folder that holds config.json"):
        MllamaForConditionalGeneration.from_pretrained(tmp_path / "nowhere")


def test_a_file_instead_of_a_folder_is_refused(tiny_hf_checkpoint):
    with pytest.raises(CheckpointNotFoundError, match="is a file: pass the checkpoint folder that holds it"):
        MllamaForConditionalGeneration.from_pretrained(tiny_hf_checkpoint() / "config.json")
