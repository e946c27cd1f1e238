"""Model paths: the builtin offline model and the checks on a user's model folder."""

from __future__ import annotations

import pytest

import ftcore
from ftcore.models import builtin
from ftcore.models.paths import resolve_model_path


def test_builtin_model_is_built_offline_once_and_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("FTCORE_CACHE", str(tmp_path))   # empty: other tests may have built it in the session cache
    real = builtin.pretrain
    calls = []

    def short_pretrain(folder, log=print, **kw):
        calls.append(folder)
        return real(folder, log, epochs=1)

    monkeypatch.setattr(builtin, "pretrain", short_pretrain)
    seen = []
    path = resolve_model_path("ftcore:tiny-llama", seen.append)
    assert (path / "config.json").exists() and list(path.glob("*.safetensors"))
    assert (path / "tokenizer.json").exists()
    assert "license: apache-2.0" in (path / "README.md").read_text()
    assert any("building the builtin model" in m for m in seen)
    again = resolve_model_path("ftcore:tiny-llama", seen.append)
    assert again == path and len(calls) == 1            # cached: built once

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)


def test_unknown_builtin_lists_the_available_ones():
    with pytest.raises(ftcore.ConfigError, match="available: ftcore:tiny-llama"):
        resolve_model_path("ftcore:huge-llama")


def test_missing_model_folder_and_folder_without_weights(tmp_path):
    with pytest.raises(ftcore.ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ftcore.ConfigError, match="has no weights"):
        resolve_model_path(str(tmp_path / "m"))
