"""No ftcore command runs code from a model folder unless model.trust_remote_code is set, and none asks.

The model folders here name custom classes in their auto_map, in a module that writes a marker file
when it is imported: the marker must never appear, with a "y" waiting on stdin for a prompt that
must never come.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

from ftcore.testing import finished_run

CUSTOM = '''
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class CustomTokenizer(PreTrainedTokenizerFast):
    pass


class CustomConfig(LlamaConfig):
    model_type = "custom-llama"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
'''


def custom_code_model(src: Path, dst: Path, marker: Path) -> Path:
    """The tiny model, re-declared as an architecture and a tokenizer only its own code (custom.py) defines."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type="custom-llama", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (dst / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((dst / "tokenizer_config.json").read_text())
    tokenizer.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": ["custom.CustomTokenizer", None]})
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (dst / "custom.py").write_text(CUSTOM.format(marker=str(marker)))
    return dst


def ftcore(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcore.cli", *args], input="y\ny\n", capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def custom(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote-code")
    marker = folder / "MARKER"
    model = custom_code_model(tiny_model_dir, folder / "custom-model", marker)
    data = write_jsonl(folder / "train.jsonl", [{"instruction": f"Say {i}.", "output": str(i)} for i in range(8)])
    adapter = finished_run(folder / "finished", model=tiny_model_dir) / "adapter"
    return folder, model, data, adapter, marker


COMMANDS = {
    "run": lambda m, d, a, o: ["run", "--model", m, "--data", d, "--output", o],
    "prepare": lambda m, d, a, o: ["prepare", "--model", m, "--data", d],
    "merge": lambda m, d, a, o: ["merge", "--adapter", a, "--base", m, "--output", o],
    "export": lambda m, d, a, o: ["export", "--plugins", "merge", "--model", a, "--base", m, "--output", o],
    "generate": lambda m, d, a, o: ["generate", "--model", m, "hello"],
    "chat": lambda m, d, a, o: ["chat", "--model", m],
    "estimate": lambda m, d, a, o: ["estimate", "--model", m],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_command_runs_a_model_folders_code_or_asks_for_it(custom, command, tmp_path):
    folder, model, data, adapter, marker = custom
    out = tmp_path / "out"
    proc = ftcore(*COMMANDS[command](str(model), str(data), str(adapter), str(out)), cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert not marker.exists(), f"{command} ran the model folder's code:\n{text}"
    assert "[y/N]" not in text and "Do you wish to run the custom code" not in text
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    if command != "estimate":   # estimate reads config.json alone: it names the unknown architecture instead
        assert "trust_remote_code" in text and str(model) in text, text
    else:
        assert "custom-llama" in text
    assert not out.exists()


def test_with_trust_remote_code_set_a_run_uses_the_models_own_code(tiny_model_dir, custom, tmp_path):
    """The setting is the one door: with it, a run loads the model through its own classes."""
    folder, _, data, _, _ = custom
    marker = tmp_path / "MARKER"
    model = custom_code_model(tiny_model_dir, tmp_path / "trusted-model", marker)
    proc = ftcore("run", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"),
                  "--set", "model.trust_remote_code=true", "--set", "training.max_steps=1",
                  "--set", "data.val_size=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert marker.read_text() == "custom code ran"
