"""Shared fixtures: a tiny Llama model built in-process, data files, an isolated cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"          # nothing may come from a hub
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ftcore-cache")
    old = os.environ.get("FTCORE_CACHE")
    os.environ["FTCORE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FTCORE_CACHE", None)
    else:
        os.environ["FTCORE_CACHE"] = old


def corpus() -> list[str]:
    return (REPO / "ftcore" / "assets" / "tokenizer-corpus.txt").read_text().split("\n\n")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a tokenizer trained on the quickstart corpus (no chat template)."""
    from ftcore.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny-llama"), corpus())


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    records = [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": str(2 * a + 1)} for a in range(24)]
    return write_jsonl(tmp_path / "train.jsonl", records)


def tiny_config(model_dir: Path, data: Path, out: Path, **training) -> dict:
    """A config dict for a run of a few steps."""
    t = {"epochs": 1, "batch_size": 4, "gradient_accumulation": 1, "logging_steps": 1, "save_strategy": "no"}
    t.update(training)
    return {"model": str(model_dir), "data": {"datasets": [str(data)], "max_length": 128, "val_size": 4},
            "training": t, "output_dir": str(out)}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub on 127.0.0.1 (tests/hub_server.py) that the real huggingface_hub client talks to, with an
    empty Hugging Face cache of its own; user "alice" (token ``hub_server.TOKEN``) writes to alice/* and acme/*.

    No token is set: a test that needs one sets HF_TOKEN. ``hub.env`` is the same setup as environment
    variables for a subprocess; ``hub.go_offline()`` sets HF_HUB_OFFLINE for this process and ``hub.env``.
    """
    from hub_server import TOKEN, HubServer, client_settings, patch_client

    home = tmp_path / "hf-home"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer(tmp_path / "hub-server") as state:
        state.add_user("alice", TOKEN, orgs=("acme",))
        state.home = home
        state.env = client_settings(state.url, home)

        def go_offline():
            patch_client(monkeypatch, state.url, home, offline=True)
            state.env = client_settings(state.url, home, offline=True)

        state.go_offline = go_offline
        patch_client(monkeypatch, state.url, home)
        yield state
