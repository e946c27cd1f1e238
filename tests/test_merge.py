"""Merging adapters into their base: `ftcore merge`, and the `merge` exporter a run can ask for."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from capture_plugin import probe_ids
from click.testing import CliRunner
from conftest import tiny_config, write_jsonl

import ftcore
from ftcore.cli import main

QUIET = {"log": lambda m: None}


def _logits(model, vocab):
    with torch.no_grad():
        return model.eval()(input_ids=probe_ids(vocab)).logits.float()


def _base_plus_adapter(base_dir, adapter_dir):
    """What a PEFT user gets: the unquantized base (embeddings fitted to the run's tokenizer) + the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if len(tok) > base.config.vocab_size:
        base.resize_token_embeddings(len(tok))
    return PeftModel.from_pretrained(base, str(adapter_dir)), len(tok)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """One lora run that asks for the merge as part of its outputs (the `merge` exporter)."""
    tmp = tmp_path_factory.mktemp("lora-merge")
    data = write_jsonl(tmp / "train.jsonl", [{"instruction": f"Add {a} and {a + 1}.", "output": str(2 * a + 1)}
                                             for a in range(24)])
    cfg = tiny_config(tiny_model_dir, data, tmp / "run", learning_rate=1e-3)
    cfg["plugins"] = ["lora", "alpaca", "merge"]
    return ftcore.run(cfg, **QUIET)


def test_a_run_can_ask_for_the_merged_model(lora_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    merged_dir = lora_run.output_dir / "merged"
    assert lora_run.exports == [merged_dir]
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "tokenizer.json").exists()
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    reference, vocab = _base_plus_adapter(tiny_model_dir, lora_run.model_dir)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), vocab)
    expected = _logits(reference, vocab)
    assert not torch.allclose(base_logits, expected, atol=1e-4), "the adapter changes nothing to compare"
    torch.testing.assert_close(_logits(merged, vocab), expected, atol=1e-4, rtol=1e-4)
    assert json.loads((lora_run.output_dir / "summary.json").read_text())["exports"] == [str(merged_dir)]


def test_merge_command_finds_the_plugin_from_the_run_and_writes_safetensors(lora_run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", "--adapter", str(lora_run.model_dir), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert list(out.glob("*.safetensors")) and (out / "tokenizer_config.json").exists()
    assert json.loads((out / "ftcore-merge.json").read_text())["plugins"] == ["lora"]
    ours, exported = load_file(str(out / "model.safetensors")), load_file(str(lora_run.output_dir / "merged" / "model.safetensors"))
    assert ours.keys() == exported.keys() and all(torch.equal(ours[k], exported[k]) for k in ours)


def test_merge_dtype_option(lora_run, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    result = CliRunner().invoke(main, ["merge", "-a", str(lora_run.model_dir), "-o", str(out),
                                       "--dtype", "bfloat16", "--base", str(tiny_model_dir), "--plugins", "lora"])
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(str(out)).dtype == torch.bfloat16


def _chat(n):
    return [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                          {"role": "assistant", "content": f"It is {2 * a}."}]} for a in range(n)]


def test_a_qlora_adapter_is_merged_into_the_unquantized_base(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "chat.jsonl", _chat(16))
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "run", learning_rate=1e-3)
    cfg["plugins"] = ["qlora", "chatml"]
    run = ftcore.run(cfg, **QUIET)
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", "--adapter", str(run.model_dir), "--output", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.dtype == torch.float32
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    reference, vocab = _base_plus_adapter(tiny_model_dir, run.model_dir)
    assert merged.config.vocab_size == vocab                      # ChatML tokens the run added are kept
    expected = _logits(reference, vocab)
    with reference.disable_adapter():
        assert not torch.allclose(_logits(reference, vocab), expected, atol=1e-4), "the adapter changes nothing"
    torch.testing.assert_close(_logits(merged, vocab), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["missing", "not-an-adapter", "base-missing", "bad-base", "output-taken",
                                  "unknown-plugin", "no-run"])
def test_bad_input_is_a_clear_error_with_exit_status_2(case, lora_run, tmp_path):
    adapter, out, extra = str(lora_run.model_dir), tmp_path / "out", []
    if case == "missing":
        adapter, expect = str(tmp_path / "nope"), "does not exist"
    elif case == "not-an-adapter":
        (tmp_path / "plain").mkdir()
        adapter, extra, expect = str(tmp_path / "plain"), ["--plugins", "lora"], "is not an adapter"
    elif case == "base-missing":
        copy = tmp_path / "copy"
        shutil.copytree(lora_run.model_dir, copy)
        cfg = json.loads((copy / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(tmp_path / "gone")
        (copy / "adapter_config.json").write_text(json.dumps(cfg))
        adapter, extra, expect = str(copy), ["--plugins", "lora"], "--base"
    elif case == "bad-base":
        extra, expect = ["--base", str(tmp_path / "gone")], "(--base) is not a model folder"
    elif case == "output-taken":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expect = "not empty"
    elif case == "unknown-plugin":
        extra, expect = ["--plugins", "lorra"], 'Did you mean "lora"'
    else:
        copy = tmp_path / "copy"
        shutil.copytree(lora_run.model_dir, copy)
        adapter, expect = str(copy), "--plugins"
    result = CliRunner().invoke(main, ["merge", "--adapter", adapter, "--output", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert expect in result.output and "Traceback" not in result.output
    if case == "output-taken":
        assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists()


def test_merge_exporter_refuses_a_run_without_a_mergeable_adapter_before_training(tiny_model_dir, alpaca_file,
                                                                                   tmp_path):
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run")
    cfg["plugins"] = ["full", "alpaca", "merge"]
    with pytest.raises(ftcore.ConfigError, match="merge.*full fine-tune"):
        ftcore.run(cfg, **QUIET)
    assert not (tmp_path / "run" / "model").exists()
