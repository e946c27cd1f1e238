"""The lora adapter plugin: its options reach PEFT, and the saved adapter reproduces what ftcore trained."""

from __future__ import annotations

import re

import pytest
import torch
from capture_plugin import Capture, probe_ids
from conftest import tiny_config

import ftcore
from ftcore.types import RunContext


def _load(tiny_model_dir, tmp_path, lora: dict, added: list[str] = ()):
    """Resolve a config with this lora section and load the model through the plugin's hook (no training)."""
    from transformers import AutoTokenizer

    from ftcore_plugins.adapters import lora as lora_plugin

    config, plugins = ftcore.resolve({"model": str(tiny_model_dir), "plugins": ["lora"], "lora": lora,
                                      "output_dir": str(tmp_path / "o")}, log=lambda m: None)
    ctx = RunContext(config=config, plugins=plugins, output_dir=tmp_path)
    ctx.tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    if added:
        ctx.tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
        ctx.added_tokens = list(added)
    model = lora_plugin.ftcore_load_model(model_path=str(tiny_model_dir), tokenizer=ctx.tokenizer,
                                          config=config, ctx=ctx)
    return model, model.peft_config["default"]


def test_defaults_are_the_reference_recipe(tiny_model_dir, tmp_path):
    model, cfg = _load(tiny_model_dir, tmp_path, {})
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (16, 32, 0.05, "none")
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert cfg.task_type == "CAUSAL_LM"


def test_each_option_reaches_the_lora_config_and_the_model(tiny_model_dir, tmp_path):
    model, cfg = _load(tiny_model_dir, tmp_path, {
        "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear", "use_rslora": True,
        "use_dora": True, "modules_to_save": ["lm_head"], "bias": "lora_only"})
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (4, 8, 0.1, "lora_only")
    assert cfg.use_rslora and cfg.use_dora
    assert "lm_head" in cfg.modules_to_save
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4 ** 0.5)          # rsLoRA: alpha / sqrt(r)
    assert q.lora_A["default"].weight.shape[0] == 4
    assert "default" in q.lora_magnitude_vector                          # DoRA's magnitude
    assert type(model.base_model.model.lm_head).__name__ == "ModulesToSaveWrapper"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in n for n in trainable)


def test_tokens_a_format_adds_are_trainable_in_and_out(tiny_model_dir, tmp_path):
    model, cfg = _load(tiny_model_dir, tmp_path, {}, added=["<|im_start|>", "<|im_end|>"])
    vocab = model.get_input_embeddings().weight.shape[0]
    assert cfg.trainable_token_indices == {"embed_tokens": [vocab - 2, vocab - 1], "lm_head": [vocab - 2, vocab - 1]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)


def test_bad_lora_option_is_a_config_error_naming_the_key(tiny_model_dir, tmp_path):
    with pytest.raises(ftcore.ConfigError, match=r'"lora.alpah".*Did you mean "alpha"'):
        ftcore.resolve({"model": str(tiny_model_dir), "plugins": ["lora"], "lora": {"alpah": 8}})
    with pytest.raises(ftcore.ConfigError, match="lora.dropout"):
        ftcore.resolve({"model": str(tiny_model_dir), "plugins": ["lora"], "lora": {"dropout": 1.5}})


def test_saved_adapter_reproduces_the_trained_logits_with_plain_peft(tiny_model_dir, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cap, lines = Capture(), []
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", learning_rate=1e-3)
    cfg["plugins"] = ["lora", "alpaca"]
    result = ftcore.run(cfg, plugins=[cap], log=lines.append)

    # The run printed trainable vs total parameters, as PEFT counts them.
    trainable = sum(p.numel() for p in cap.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in cap.model.parameters())
    shown = next(line for line in lines if line.startswith("trainable params:"))
    numbers = [int(x.replace(",", "")) for x in re.findall(r"[\d,]+(?=\s|$)", shown.split("%")[0])]
    assert numbers[:2] == [trainable, total]
    assert f"{100 * trainable / total:.4f}" in shown

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    probe = probe_ids(len(cap.model.get_input_embeddings().weight))
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(base, str(result.model_dir)).eval()
        logits = reloaded(input_ids=probe).logits
    assert not torch.allclose(base_logits, cap.logits, atol=1e-4), "training changed nothing"
    torch.testing.assert_close(logits, cap.logits, atol=1e-5, rtol=1e-5)
