"""`ftcore prepare`: the data pipeline alone, its counts, and examples with supervision visible."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner
from conftest import write_jsonl

from ftcore.cli import main

CHATS = [{"messages": [{"role": "user", "content": f"Name number {i}."},
                       {"role": "assistant", "content": f"Number {i}."}]} for i in range(8)]


@pytest.fixture
def tokenizer_only_model(tiny_model_dir, tmp_path):
    """The tiny model's folder with its weights replaced by garbage: loading them would fail."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


def _config(tmp_path, model, data, plugins, **data_cfg):
    path = tmp_path / "prep.yaml"
    path.write_text(yaml.safe_dump({"plugins": plugins, "model": str(model),
                                    "data": {"datasets": [str(data)], "max_length": 64, **data_cfg},
                                    "training": {"batch_size": 4}}))
    return str(path)


def test_prepare_prints_counts_and_marked_examples_without_loading_weights(tokenizer_only_model, alpaca_file,
                                                                         tmp_path):
    cfg = _config(tmp_path, tokenizer_only_model, alpaca_file, ["alpaca"], val_size=4, packing=False)
    result = CliRunner().invoke(main, ["prepare", cfg, "--show", "2", "--no-color"])
    assert result.exit_code == 0, result.output
    out = result.output
    for label, value in (("records read", 24), ("invalid records", 0), ("train examples", 20),
                         ("eval examples", 4), ("truncated (too long)", 0), ("dropped (too long)", 0)):
        assert any(line.startswith(label) and line.split()[-1] == str(value) for line in out.splitlines()), label
    assert "supervised tokens" in out and "packing efficiency" in out and "padded" in out
    assert out.count("--- example") == 2
    # the response and EOS are marked as supervised, the prompt is not
    shown = out.split("--- example 1")[1]
    assert "### Instruction:" in shown and "[[" in shown and "</s>]]" in shown
    assert "[[### Instruction" not in shown
    assert "\x1b[" not in out                                 # no colour codes when not asked


def test_prepare_colours_supervised_tokens_in_a_terminal(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    result = CliRunner().invoke(main, ["prepare", "--plugins", "chatml", "--model", str(tiny_model_dir),
                                       "--data", str(data), "--show", "1", "--color"])
    assert result.exit_code == 0, result.output
    assert "\x1b[1;32m" in result.output                       # bold green: supervised
    assert "\x1b[2m" in result.output                          # dim: masked
    assert "[[" not in result.output


def test_prepare_json_reports_stats_added_tokens_and_examples(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [*CHATS, {"messages": []}])
    result = CliRunner().invoke(main, ["prepare", "--plugins", "chatml", "--model", str(tiny_model_dir),
                                       "--data", str(data), "--set", "data.on_bad_record=skip",
                                       "--set", "data.val_size=0", "--show", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["stats"]["records"] == 9 and report["stats"]["bad_records"] == 1
    assert report["stats"]["train_examples"] == 8
    assert report["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert report["problems"] == [f"{data}:9: messages: is empty: a conversation needs at least one user and one "
                                  f"assistant turn"]
    assert len(report["examples"]) == 3
    for shown in report["examples"]:
        assert shown.startswith("<|im_start|>user\nName number ")
        assert shown.count("[[") == 1 and shown.endswith("[[Number " + shown.split("[[Number ")[1])
        assert shown.rstrip("\n").endswith(".<|im_end|>]]")


def test_prepare_needs_no_weight_files_in_a_local_model_folder(tiny_model_dir, alpaca_file, tmp_path):
    folder = tmp_path / "tokenizer-and-config"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    result = CliRunner().invoke(main, ["prepare", "--model", str(folder), "--data", str(alpaca_file)])
    assert result.exit_code == 0, result.output
    assert any(line.startswith("records read") and line.split()[-1] == "24" for line in result.output.splitlines())


def test_prepared_tokens_live_in_an_arrow_file_that_goes_with_the_process(tiny_model_dir, alpaca_file, tmp_path):
    """The tokenized data is written to a file as it is made (memory does not grow with the dataset's tokens),
    read back memory-mapped, and removed when the process ends; a folder left by a process that died is removed
    by the next one."""
    import os
    import socket
    import subprocess
    import sys

    cache = tmp_path / "cache"
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = cache / "data" / "work" / f"{socket.gethostname()}-{dead.pid}-x"
    left.mkdir(parents=True)
    (left / "rows-1.arrow").write_bytes(b"left by a killed run")
    script = (
        "import json, os, sys\n"
        "from ftcore.tools.prepare import prepare_data\n"
        "r = prepare_data(flags={'model': sys.argv[1], 'data': {'datasets': [sys.argv[2]], 'cache': False,"
        " 'val_size': 2}}, log=lambda m: None)\n"
        "files = [f['filename'] for f in r.data.train.cache_files] + [f['filename'] for f in r.data.eval.cache_files]\n"
        "print(json.dumps({'files': files, 'exist': [os.path.exists(f) for f in files],"
        " 'rows': len(r.data.train) + len(r.data.eval), 'examples': r.stats.examples}))\n")
    out = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(alpaca_file)], capture_output=True,
                         text=True, env={**os.environ, "FTCORE_CACHE": str(cache)}, timeout=300)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["files"] and all(seen["exist"]) and seen["rows"] == seen["examples"]
    assert all(f.startswith(str(cache / "data" / "work")) and f.endswith(".arrow") for f in seen["files"])
    assert not any(os.path.exists(f) for f in seen["files"])   # gone with the process
    assert not left.exists()
