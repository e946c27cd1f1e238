"""Loading is safe by default: safetensors weights, no remote code unless configured, and
checkpoint state unpickled weights-only."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import tiny_config, write_jsonl

import ftcore

EVIL = """
from pathlib import Path
Path(__file__).with_name("REMOTE-CODE-RAN").write_text("the model's own code was executed")
from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel
"""


def test_remote_code_shipped_with_a_model_is_not_run_by_default(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "evil.py").write_text(EVIL)
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Say {i}.", "output": str(i)} for i in range(6)])
    result = ftcore.run(tiny_config(model, data, tmp_path / "out", max_steps=1), log=lambda m: None)
    assert result.metrics["steps"] == 1
    assert not (model / "REMOTE-CODE-RAN").exists()
    assert ftcore.RunConfig.model_fields["model"].annotation.model_fields["trust_remote_code"].default is False


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_checkpoint_with_a_pickled_payload_is_refused_not_run(tiny_model_dir, alpaca_file, tmp_path):
    import torch

    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, alpaca_file, out, max_steps=2, save_strategy="steps", save_steps=1)
    ftcore.run(cfg, log=lambda m: None)
    checkpoint = out / "checkpoints" / "checkpoint-1"
    sentinel = tmp_path / "PAYLOAD-RAN"
    torch.save({"state": _Payload(str(sentinel))}, checkpoint / "optimizer.pt")
    resumed = dict(cfg, output_dir=str(tmp_path / "again"))
    with pytest.raises(ftcore.ConfigError, match="weights-only loading refused to unpickle it"):
        ftcore.run(resumed, resume=str(checkpoint), log=lambda m: None)
    assert not sentinel.exists()


def test_pickle_weights_next_to_safetensors_are_never_unpickled(tiny_model_dir, tmp_path):
    import torch

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    sentinel = tmp_path / "BIN-PAYLOAD-RAN"
    torch.save({"model.embed_tokens.weight": _Payload(str(sentinel))}, model / "pytorch_model.bin")
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Say {i}.", "output": str(i)} for i in range(6)])
    result = ftcore.run(tiny_config(model, data, tmp_path / "out", max_steps=1), log=lambda m: None)
    assert result.metrics["steps"] == 1
    assert not sentinel.exists()
