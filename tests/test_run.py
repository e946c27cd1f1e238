"""End-to-end runs on a tiny model: CLI, library, plugin objects, lifecycle order, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import yaml
from conftest import tiny_config

import ftcore

QUIET = {"log": lambda m: None}


def test_cli_end_to_end_writes_the_documented_layout(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "ftcore.cli", "run", "--plugins", "lora,alpaca", "--model", str(tiny_model_dir),
         "--data", str(alpaca_file), "--output", str(out), "--set", "training.epochs=1",
         "--set", "training.batch_size=4", "--set", "training.gradient_accumulation=1",
         "--set", "training.logging_steps=1", "--set", "data.val_size=4", "--set", "data.max_length=128"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "trainable params:" in proc.stderr
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr    # DeepSpeed's notice, on every CPU run
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert (adapter / "tokenizer.json").exists()
    assert not [f.name for f in adapter.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl")]   # no pickle
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["plugins"] == ["lora", "alpaca"] and resolved["training"]["epochs"] == 1
    versions = json.loads((out / "plugins.json").read_text())
    assert {v["name"]: v["version"] for v in versions} == {"lora": ftcore.__version__, "alpaca": ftcore.__version__}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "learning_rate" in r for r in rows)
    assert any("eval_loss" in r for r in rows)
    assert all(r["tokens"] >= 0 for r in rows) and rows[-1]["tokens"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["steps"] == 5 and summary["model_dir"].endswith("adapter")


def test_resolved_config_repeats_the_run(tiny_model_dir, alpaca_file, tmp_path):
    """Every logged loss, learning rate and gradient norm, every eval loss, and the adapter: the same run."""
    first = ftcore.run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "a"), **QUIET)
    second = ftcore.run(str(first.config_path), output_dir=str(tmp_path / "b"), **QUIET)
    keys = ("step", "loss", "learning_rate", "grad_norm", "eval_loss", "tokens", "supervised_tokens")

    def logged(result):
        rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        return [{k: r[k] for k in keys if k in r} for r in rows]

    a, b = logged(first), logged(second)
    assert len([r for r in a if "loss" in r]) == first.metrics["steps"] and len(a) == len(b)
    assert a == b   # one process, same seed and data: bit-for-bit the same numbers
    from safetensors.torch import load_file

    wa = load_file(str(first.model_dir / "adapter_model.safetensors"))
    wb = load_file(str(second.model_dir / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_library_run_returns_paths_and_metrics(tiny_model_dir, alpaca_file, tmp_path):
    result = ftcore.run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out"), plugins=(), **QUIET)
    assert isinstance(result, ftcore.RunResult)
    assert result.model_dir == tmp_path / "out" / "adapter"
    assert result.metrics["steps"] == 5
    assert result.metrics["eval_loss"] is not None and result.metrics["eval_loss_start"] is not None
    assert result.data_stats["train_examples"] == 20 and result.data_stats["eval_examples"] == 4


class Recorder:
    """A plugin object passed directly to ftcore.run: records each lifecycle hook in order."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    @ftcore.hookimpl
    def ftcore_run_started(self, config, ctx):
        self.calls.append("run_started")

    @ftcore.hookimpl
    def ftcore_prepare_tokenizer(self, tokenizer):
        self.calls.append("prepare_tokenizer")

    @ftcore.hookimpl
    def ftcore_data_prepared(self, train_dataset, eval_dataset, stats):
        self.calls.append("data_prepared")
        self.stats = stats

    @ftcore.hookimpl
    def ftcore_model_loaded(self, model):
        self.calls.append("model_loaded")

    @ftcore.hookimpl
    def ftcore_training_arguments(self, args):
        self.calls.append("training_arguments")
        args["logging_steps"] = 2      # a strategy-style hook may change the trainer's arguments

    @ftcore.hookimpl
    def ftcore_trainer_callbacks(self, ctx):
        from transformers import TrainerCallback

        recorder = self

        class OnStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if "step" not in recorder.calls:
                    recorder.calls.append("step")

        self.calls.append("trainer_callbacks")
        return [OnStep()]

    @ftcore.hookimpl
    def ftcore_trainer_created(self, trainer):
        self.calls.append("trainer_created")
        self.logging_steps = trainer.args.logging_steps

    @ftcore.hookimpl
    def ftcore_export(self, run_dir, model_dir):
        self.calls.append("export")
        target = run_dir / "exported.txt"
        target.write_text(str(model_dir))
        return [target]

    @ftcore.hookimpl
    def ftcore_run_finished(self, result):
        self.calls.append("run_finished")


def test_every_lifecycle_hook_fires_in_order(tiny_model_dir, alpaca_file, tmp_path):
    rec = Recorder()
    result = ftcore.run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out"), plugins=[rec], **QUIET)
    assert rec.calls == ["run_started", "prepare_tokenizer", "data_prepared", "model_loaded",
                         "training_arguments", "trainer_callbacks", "trainer_created", "step",
                         "export", "run_finished"]
    assert rec.logging_steps == 2
    assert rec.stats["train_examples"] == 20
    assert result.exports == [tmp_path / "out" / "exported.txt"]


def test_in_process_format_plugin_module(tiny_model_dir, tmp_path):
    """A format plugin defined in the application, passed as a module, no entry point."""
    mod = types.ModuleType("qa_format")
    mod.__doc__ = "Question/answer records."

    @ftcore.hookimpl
    def ftcore_validate_record(record):
        return [] if isinstance(record.get("q"), str) and isinstance(record.get("a"), str) else [("q", "bad")]

    @ftcore.hookimpl
    def ftcore_format_record(record, tokenizer):
        return ftcore.Example.from_segments([(f"Q: {record['q']}\nA: ", False), (record["a"] + tokenizer.eos_token, True)])

    mod.ftcore_validate_record, mod.ftcore_format_record = ftcore_validate_record, ftcore_format_record
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}+1?", "a": str(i + 1)}) + "\n" for i in range(12)))
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out")
    cfg["plugins"] = ["lora"]
    result = ftcore.run(cfg, plugins=[mod], **QUIET)
    assert result.metrics["steps"] == 2
    assert [p["name"] for p in result.plugins] == ["qa_format", "lora"]


def test_two_runs_in_one_process_do_not_share_plugin_state(tiny_model_dir, alpaca_file, tmp_path):
    first, second = Recorder(), Recorder()
    ftcore.run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "a"), plugins=[first], **QUIET)
    ftcore.run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "b"), plugins=[second], **QUIET)
    assert first.calls.count("run_started") == 1 and second.calls.count("run_started") == 1


def test_output_dir_with_a_previous_run_is_not_overwritten(tiny_model_dir, alpaca_file, tmp_path):
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    ftcore.run(cfg, **QUIET)
    before = (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ftcore.ConfigError, match="--overwrite"):
        ftcore.run(cfg, **QUIET)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes() == before
    ftcore.run(cfg, overwrite=True, **QUIET)


class ArgsProbe:
    name = "args-probe"

    @ftcore.hookimpl
    def ftcore_trainer_created(self, trainer, ctx):
        self.args = trainer.args


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="about machines without a GPU")
def test_bf16_on_a_cpu_trains_and_fp16_is_refused_before_anything_is_written(tiny_model_dir, alpaca_file, tmp_path):
    """A GPU config (precision: bf16) copied to a CPU machine runs with the CPU's bf16 autocast instead of
    failing inside transformers; fp16, which needs CUDA, is a user error naming the key."""
    import math

    probe = ArgsProbe()
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "bf16", precision="bf16")
    result = ftcore.run(cfg, plugins=[probe], **QUIET)
    assert probe.args.bf16 and probe.args.use_cpu
    assert json.loads((result.output_dir / "ftcore-run.json").read_text())["precision"] == "bf16"
    assert math.isfinite(result.metrics["eval_loss"]) and result.metrics["steps"] == 5

    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "fp16", precision="fp16")
    with pytest.raises(ftcore.ConfigError, match='training.precision "fp16" needs a CUDA GPU'):
        ftcore.run(cfg, **QUIET)
    assert not (tmp_path / "fp16").exists()
