"""Optimizers: torch AdamW by default, bitsandbytes 8-bit AdamW with the paged-adamw-8bit plugin."""

from __future__ import annotations

import logging

import torch
from capture_plugin import Capture
from conftest import tiny_config

import ftcore

SETTINGS = dict(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.01,
                max_steps=2)


def _optimizer_in_use(trainer):
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)      # accelerate wraps it in an AcceleratedOptimizer


def _check_settings(opt):
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7 and group["weight_decay"] == 0.01
    assert group["initial_lr"] == 3e-4


def test_default_optimizer_is_torch_adamw(tiny_model_dir, alpaca_file, tmp_path):
    cap = Capture()
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", **SETTINGS)
    ftcore.run(cfg, plugins=[cap], log=lambda m: None)
    opt = _optimizer_in_use(cap.trainer)
    assert type(opt) is torch.optim.AdamW
    _check_settings(opt)


def test_paged_adamw_8bit_is_used_with_8bit_state_and_falls_back_once_without_cuda(
        tiny_model_dir, alpaca_file, tmp_path, caplog):
    import bitsandbytes as bnb

    cap = Capture()
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", **SETTINGS)
    cfg["plugins"] = ["full", "alpaca", "paged-adamw-8bit"]          # full: tensors big enough for 8-bit state
    with caplog.at_level(logging.WARNING, logger="ftcore"):
        ftcore.run(cfg, plugins=[cap], log=lambda m: None)
    opt = _optimizer_in_use(cap.trainer)
    assert type(opt) is bnb.optim.AdamW8bit and not opt.is_paged     # no CUDA here: non-paged
    _check_settings(opt)
    said = [r for r in caplog.records if "no CUDA" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    embed = cap.model.get_input_embeddings().weight
    state = opt.state[embed]
    assert state["step"] >= 1
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert state["state1"].numel() == embed.numel() and state["absmax1"].numel() > 0
    norms = [p for n, p in cap.model.named_parameters() if p.ndim == 1]
    assert all(p in {q for g in opt.param_groups if g["weight_decay"] == 0.0 for q in g["params"]} for p in norms)


def test_with_cuda_the_optimizer_is_paged(tiny_model_dir, monkeypatch, caplog):
    """A GPU cannot exist here: only its presence is faked, to check which optimizer is chosen."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, TrainingArguments

    from ftcore_plugins.optimizers import paged_adamw_8bit

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    args = TrainingArguments(output_dir="unused", learning_rate=5e-5, weight_decay=0.1, use_cpu=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="ftcore"):
        opt = paged_adamw_8bit.ftcore_build_optimizer(model=model, training_args=args, config=None)
    assert type(opt) is bnb.optim.PagedAdamW8bit and opt.is_paged
    assert opt.param_groups[0]["lr"] == 5e-5 and opt.param_groups[0]["weight_decay"] == 0.1
    assert not caplog.records
