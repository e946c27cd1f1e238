"""Mixtures: several datasets of different formats in one run, each with a sampling weight or a record cap,
the mix reported by `ftcore prepare` and recorded in the data statistics (summary.json, the report)."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from conftest import write_jsonl

from ftcore.data.cache import cache_key
from ftcore.tools.prepare import prepare_data

QUIET = {"log": lambda m: None}


def _files(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Add {a} and {a + 1}.", "input": "",
                                                      "output": str(2 * a + 1)} for a in range(20)])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Name number {i}."},
                                                               {"role": "assistant", "content": f"Number {i}."}]}
                                                 for i in range(10)])
    return alpaca, chat


def _cfg(model, alpaca, chat, a=None, c=None, **data):
    return {"model": str(model), "plugins": ["alpaca", "chatml"],
            "data": {"datasets": [{"path": str(alpaca), "format": "alpaca", **(a or {})},
                                  {"path": str(chat), "format": "chatml", **(c or {})}],
                     "max_length": 64, "val_size": 0, "cache": False, **data},
            "training": {"batch_size": 4}}


def _source(ids, tokenizer) -> str:
    return "chat" if "<|im_start|>" in tokenizer.decode(ids) else "alpaca"


def test_alpaca_and_chatml_mix_with_weight_and_cap(tiny_model_dir, tmp_path):
    alpaca, chat = _files(tmp_path)
    report = prepare_data(_cfg(tiny_model_dir, alpaca, chat, a={"max_records": 12}, c={"weight": 2.5}), **QUIET)
    stats = report.stats
    mix = {m["path"]: m for m in stats.mixture}
    a, c = mix[str(alpaca)], mix[str(chat)]
    assert (a["format"], a["records"], a["examples"], a["train_examples"], a["weight"], a["max_records"]) == \
        ("alpaca", 12, 12, 12, 1.0, 12)
    assert (c["format"], c["records"], c["examples"], c["train_examples"], c["weight"]) == ("chatml", 10, 10, 25, 2.5)
    assert stats.records == 22 and stats.train_examples == 37 == len(report.data.train)
    assert abs(a["token_share"] + c["token_share"] - 1) < 1e-3
    assert a["train_tokens"] + c["train_tokens"] == sum(len(x) for x in report.data.train["input_ids"])
    sources = [_source(ids, report.tokenizer) for ids in report.data.train["input_ids"]]
    assert sources.count("chat") == 25 and sources.count("alpaca") == 12
    # every chat example at least twice, five of them three times
    chats = {}
    for ids in report.data.train["input_ids"]:
        if _source(ids, report.tokenizer) == "chat":
            chats[tuple(ids)] = chats.get(tuple(ids), 0) + 1
    assert sorted(chats.values()) == [2] * 5 + [3] * 5
    # the first 12 alpaca records, none of the rest
    texts = " ".join(report.tokenizer.decode(ids) for ids in report.data.train["input_ids"])
    assert "Add 11 and 12." in texts and "Add 12 and 13." not in texts
    # upsampled copies are not reported as duplicates
    assert "exact_duplicates" not in stats.audit.get("findings", {})


def test_mixture_is_deterministic_with_the_seed_and_downsamples(tiny_model_dir, tmp_path):
    alpaca, chat = _files(tmp_path)
    cfg = _cfg(tiny_model_dir, alpaca, chat, a={"weight": 0.5}, seed=7)
    one = prepare_data(cfg, **QUIET).data.train["input_ids"]
    two = prepare_data(cfg, **QUIET).data.train["input_ids"]
    assert one == two and len(one) == 10 + 10
    other = prepare_data(_cfg(tiny_model_dir, alpaca, chat, a={"weight": 0.5}, seed=8), **QUIET).data.train
    assert sorted(map(tuple, other["input_ids"])) != sorted(map(tuple, one))   # another half of alpaca
    unweighted = prepare_data(_cfg(tiny_model_dir, alpaca, chat, seed=7), **QUIET)
    assert len(unweighted.data.train) == 30 and [m["train_examples"] for m in unweighted.stats.mixture] == [20, 10]


def test_weight_and_cap_enter_the_cache_key(tiny_model_dir, tmp_path):
    alpaca, chat = _files(tmp_path)
    keys = set()
    for a in ({}, {"weight": 2}, {"weight": 3}, {"max_records": 5}):
        report = prepare_data(_cfg(tiny_model_dir, alpaca, chat, a=a), **QUIET)
        keys.add(cache_key(report.config, report.plugins, report.tokenizer))
    assert len(keys) == 4
    cached = {**_cfg(tiny_model_dir, alpaca, chat, a={"weight": 2})}
    cached["data"]["cache"] = True
    first = prepare_data(cached, **QUIET)
    again = prepare_data(cached, **QUIET)
    assert again.stats.cached and again.stats.mixture == first.stats.mixture
    assert len(again.data.train) == 50


def test_prepare_prints_the_mix(tiny_model_dir, tmp_path):
    alpaca, chat = _files(tmp_path)
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tiny_model_dir, alpaca, chat, a={"max_records": 8}, c={"weight": 2})))
    proc = subprocess.run([sys.executable, "-m", "ftcore.cli", "prepare", str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"  {alpaca} (alpaca): 8 -> 8 -> 8 (weight 1, max_records 8)" in out
    assert f"  {chat} (chatml): 10 -> 10 -> 20 (weight 2)" in out
    proc = subprocess.run([sys.executable, "-m", "ftcore.cli", "prepare", str(cfg), "--json"], capture_output=True,
                          text=True, timeout=300)
    mix = json.loads(proc.stdout[proc.stdout.index("{"):])["stats"]["mixture"]
    assert [(m["format"], m["train_examples"]) for m in mix] == [("alpaca", 8), ("chatml", 20)]


def test_bad_weight_is_a_clear_error(tiny_model_dir, tmp_path):
    alpaca, chat = _files(tmp_path)
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tiny_model_dir, alpaca, chat, c={"weight": -1})))
    proc = subprocess.run([sys.executable, "-m", "ftcore.cli", "prepare", str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "weight" in proc.stderr
