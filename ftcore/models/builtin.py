"""The builtin model (``ftcore:tiny-llama``): a small Llama built offline, briefly pretrained, cached on first use."""

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
# The folder name carries a version: a new build recipe gets a new folder, so an old cache is never reused.
BUILTINS = {"tiny-llama": "tiny-llama-v3"}


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
            "randomly initialised, then pretrained for about half a minute on ftcore's bundled fact sentences.\n")
        (tmp / "ftcore-builtin.json").write_text(json.dumps({"name": name, "license": "apache-2.0"}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pretrain(folder: Path, log: Callable[[str], None] = print, epochs: int = 200, batch: int = 16) -> None:
    """A short causal-LM pretraining of the model in ``folder`` on the bundled fact sentences (in place).

    Each sentence is one sequence (padded, the padding masked), so the model reads every fact from its
    start; 200 passes over the 114 sentences take about half a minute on two cores and leave the model
    knowing them, which the quickstart's fine-tune then teaches it to answer questions about.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False)
    text = resources.files("ftcore").joinpath("assets/pretrain-corpus.txt").read_text(encoding="utf-8")
    seqs = [tok(p.strip(), add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
            for p in text.split("\n\n") if p.strip()]
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps = epochs * ((len(ids) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(ids))
        for i in range(0, len(ids), batch):
            rows = order[i:i + batch]
            loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        if (epoch + 1) % 20 == 0 or epoch + 1 == epochs:
            log(f"  pretraining the builtin model: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}")
    model.save_pretrained(str(folder), safe_serialization=True)
