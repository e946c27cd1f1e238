"""The full plugin: every weight trains unless frozen by name or layer; a whole model is saved."""

from __future__ import annotations

import torch
from capture_plugin import Capture
from conftest import tiny_config
from safetensors.torch import load_file

import ftcore


def test_full_trains_all_weights_and_saves_a_safetensors_model(tiny_model_dir, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    cap = Capture()
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", learning_rate=1e-3)
    cfg["plugins"] = ["full", "alpaca"]
    result = ftcore.run(cfg, plugins=[cap], log=lambda m: None)
    assert all(p.requires_grad for p in cap.model.parameters())
    assert result.model_dir == tmp_path / "out" / "model"
    assert list(result.model_dir.glob("*.safetensors")) and not list(result.model_dir.glob("*.bin"))   # no pickle
    assert (result.model_dir / "tokenizer.json").exists()
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(result.model_dir / "model.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) == len(base), "some weights did not train"
    reloaded = AutoModelForCausalLM.from_pretrained(str(result.model_dir)).eval()
    from capture_plugin import probe_ids

    with torch.no_grad():
        logits = reloaded(input_ids=probe_ids(len(cap.model.get_input_embeddings().weight))).logits
    torch.testing.assert_close(logits, cap.logits, atol=1e-5, rtol=1e-5)


def test_freeze_modules_and_first_layers_stay_unchanged(tiny_model_dir, alpaca_file, tmp_path):
    cap = Capture()
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", learning_rate=1e-3)
    cfg["plugins"] = ["full", "alpaca"]
    cfg["full"] = {"freeze_modules": [r"embed_tokens", r"\.mlp\.down_proj\."], "freeze_layers": 1}
    result = ftcore.run(cfg, plugins=[cap], log=lambda m: None)

    def frozen(name: str) -> bool:
        return "embed_tokens" in name or ".mlp.down_proj." in name or ".layers.0." in name

    grads = {n: p.requires_grad for n, p in cap.model.named_parameters()}
    assert any(frozen(n) for n in grads) and any(not frozen(n) for n in grads)
    assert all(grads[n] == (not frozen(n)) for n in grads), grads
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(result.model_dir / "model.safetensors"))
    for name in base:
        if frozen(name):
            assert torch.equal(base[name], trained[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(base[name], trained[name]), f"trainable {name} did not change"
