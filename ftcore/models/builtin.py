"""The builtin model (``ftcore:tiny-llama``): a small Llama built, briefly pretrained and cached on first use, offline."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from ftcore.files import cache_root

BUILTIN_PREFIX = "ftcore:"
BUILTINS = {"tiny-llama": "tiny-llama-v2"}


def builtin_root() -> Path:
    return cache_root() / "models"


def builtin_model(name: str, log: Callable[[str], None] = print) -> Path:
    """The small Llama-architecture model for the quickstart, built once, offline, and cached."""
    folder = builtin_root() / BUILTINS[name]
    if (folder / "config.json").exists():
        return folder
    log(f"building the builtin model {BUILTIN_PREFIX}{name} in {folder} (once, offline)...")
    from ftcore.models.tiny import build_model, build_tokenizer

    corpus = resources.files("ftcore").joinpath("assets/tokenizer-corpus.txt").read_text(encoding="utf-8")
    tok = build_tokenizer(corpus.split("\n\n"), vocab_size=1024)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))
    try:
        build_model(tmp, tok, hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384, seed=0)
        pretrain(tmp, log)
        (tmp / "README.md").write_text(
            f"---\nlicense: apache-2.0\n---\n# {BUILTIN_PREFIX}{name}\n\nA small Llama-architecture model "
            "(4 layers, hidden 128) with a byte-level BPE tokenizer, built by ftcore for the offline quickstart: "
            "randomly initialised, then pretrained for about a minute on ftcore's bundled fact sentences.\n")
        (tmp / "ftcore-builtin.json").write_text(json.dumps({"name": name, "license": "apache-2.0"}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pretrain(folder: Path, log: Callable[[str], None] = print, epochs: int = 30, block: int = 64) -> None:
    """A short causal-LM pretraining of the model in ``folder`` on the bundled fact sentences (in place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False)
    text = resources.files("ftcore").joinpath("assets/pretrain-corpus.txt").read_text(encoding="utf-8")
    ids: list[int] = []
    for para in text.split("\n\n"):
        ids += tok(para.strip(), add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps = epochs * ((len(blocks) + 15) // 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(blocks))
        for i in range(0, len(blocks), 16):
            batch = blocks[order[i:i + 16]]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        log(f"  pretraining the builtin model: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}")
    model.save_pretrained(str(folder), safe_serialization=True)
