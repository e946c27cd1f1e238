"""One test per hook, named test_hook_<hook> (tests/test_hooks_doc.py checks every hook has one).

Most use one tiny run with plugins passed as objects: a recorder (an extension implementing the
lifecycle and adjustment hooks), a format, an optimizer and an exporter of the test's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config, write_jsonl
from distributions import install
from transformers import TrainerCallback

import ftcore
from ftcore.registry.selection import select


class Recorder:
    """An extension: records what each lifecycle and adjustment hook was given."""

    name = "recorder"

    class Settings(ftcore.PluginConfig):
        note: str = "none"

    def __init__(self) -> None:
        self.calls: dict[str, dict] = {}

    @ftcore.hookimpl
    def ftcore_config_schema(self):
        return {"recorder": self.Settings}

    @ftcore.hookimpl
    def ftcore_run_started(self, config, ctx):
        self.calls["run_started"] = {"note": config.section("recorder").note, "out_exists": ctx.output_dir.is_dir(),
                                     "model_path": ctx.model_path, "main": ctx.is_main_process,
                                     "world_size": ctx.world_size, "tokenizer": ctx.tokenizer}

    @ftcore.hookimpl
    def ftcore_prepare_tokenizer(self, tokenizer, config, ctx):
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|note|>"]}, replace_extra_special_tokens=False)
        self.calls["prepare_tokenizer"] = {"vocab": len(tokenizer)}
        return ["<|note|>"]

    @ftcore.hookimpl
    def ftcore_data_prepared(self, train_dataset, eval_dataset, stats, ctx):
        self.calls["data_prepared"] = {"train": len(train_dataset), "eval": len(eval_dataset) if eval_dataset else 0,
                                       "stats": dict(stats), "columns": sorted(train_dataset.column_names)}

    @ftcore.hookimpl
    def ftcore_model_loaded(self, model, ctx):
        self.calls["model_loaded"] = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                                      "total": sum(p.numel() for p in model.parameters())}

    @ftcore.hookimpl
    def ftcore_training_arguments(self, args, config, ctx):
        self.calls["training_arguments"] = {"logging_steps": args["logging_steps"]}
        args["logging_steps"] = 1   # the config says 2: every step is logged only if this adjustment is used

    @ftcore.hookimpl
    def ftcore_trainer_callbacks(self, ctx):
        steps = self.calls.setdefault("trainer_callbacks", {"steps": []})["steps"]

        class Steps(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                steps.append(state.global_step)

        return [Steps()]

    @ftcore.hookimpl
    def ftcore_trainer_created(self, trainer, ctx):
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        self.calls["trainer_created"] = {"trainer": type(trainer).__name__, "optimizer": type(inner).__name__}

    @ftcore.hookimpl
    def ftcore_run_finished(self, result, ctx):
        self.calls["run_finished"] = {"steps": result.metrics["steps"], "report": result.report_path,
                                      "summary": (result.output_dir / "summary.json").is_file()}


class QAFormat:
    """A format: {q, a} records, the answer supervised."""

    name = "qa"

    @ftcore.hookimpl
    def ftcore_validate_record(self, record, config, ctx):
        return [] if isinstance(record.get("a"), str) and record["a"] else [("a", "expected a non-empty string")]

    @ftcore.hookimpl
    def ftcore_format_record(self, record, tokenizer, config, ctx):
        return ftcore.Example.from_segments([(f"Q: {record['q']}\nA:", False), (f" {record['a']}{tokenizer.eos_token}",
                                                                              True)], add_special_tokens=True)


class Sgd:
    """An optimizer: plain SGD with the run's learning rate."""

    name = "sgd"

    @ftcore.hookimpl
    def ftcore_build_optimizer(self, model, training_args, config, ctx):
        import torch

        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=training_args.learning_rate)


class Notes:
    """An exporter: writes what it was given about the finished run."""

    name = "notes"

    def __init__(self) -> None:
        self.seen: dict = {}

    @ftcore.hookimpl
    def ftcore_export(self, run_dir, model_dir, config, ctx):
        self.seen = {"summary_exists": (Path(run_dir) / "summary.json").is_file(), "steps": ctx.result.metrics["steps"],
                     "records": ctx.result.data_stats["records"], "model_dir": Path(model_dir),
                     "export_output": ctx.export_output}
        target = Path(ctx.export_output or Path(run_dir) / "notes.json")
        ftcore.write_json_atomic(target, {"eval_loss": ctx.result.metrics["eval_loss"]})
        return [target]


QA = [{"q": f"{i} plus one?", "a": str(i + 1)} for i in range(20)] + [{"q": "broken", "a": 7}]


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory):
    """One tiny run with the recorder, the qa format, SGD and the notes exporter passed as objects."""
    tmp = tmp_path_factory.mktemp("hooks")
    data = write_jsonl(tmp / "qa.jsonl", QA)
    recorder, notes = Recorder(), Notes()
    config = tiny_config(tiny_model_dir, data, tmp / "out", logging_steps=2, learning_rate=1e-2)
    config.update(plugins=["lora"], recorder={"note": "hello"})
    config["data"]["on_bad_record"] = "skip"
    result = ftcore.run(config, plugins=[recorder, QAFormat(), Sgd(), notes], log=lambda m: None)
    return result, recorder.calls, notes.seen


def test_hook_ftcore_config_schema(recorded):
    _, calls, _ = recorded
    assert calls["run_started"]["note"] == "hello"
    with pytest.raises(ftcore.ConfigError, match='unknown config key "recorder.nte".*Did you mean "note"'):
        ftcore.resolve({"model": "m", "recorder": {"nte": "x"}}, plugin_objects=[Recorder()], log=lambda m: None)


def test_hook_ftcore_validate_record(recorded):
    result, _, _ = recorded
    assert result.data_stats["records"] == 21 and result.data_stats["bad_records"] == 1


def test_hook_ftcore_format_record(tiny_model_dir, tmp_path):
    from ftcore.data.show import render_marked

    data = write_jsonl(tmp_path / "qa.jsonl", QA[:4])
    report = ftcore.prepare_data({"model": str(tiny_model_dir), "data": {"datasets": [str(data)], "val_size": 0}},
                                 plugins=[QAFormat()], log=lambda m: None)
    shown = [render_marked(ids, labels, report.tokenizer) for ids, labels in report.examples(4)]
    assert sorted(shown) == sorted(f"<s>Q: {r['q']}\nA:[[ {r['a']}</s>]]" for r in QA[:4])


def test_hook_ftcore_prepare_tokenizer(recorded):
    result, calls, _ = recorded
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(result.model_dir))
    assert "<|note|>" in saved.get_vocab() and len(saved) == calls["prepare_tokenizer"]["vocab"]


def test_hook_ftcore_run_started(recorded, tiny_model_dir):
    _, calls, _ = recorded
    started = calls["run_started"]
    assert started["out_exists"] and started["main"] and started["world_size"] == 1
    assert started["model_path"] == Path(tiny_model_dir) and started["tokenizer"] is None   # nothing loaded yet


def test_hook_ftcore_data_prepared(recorded):
    _, calls, _ = recorded
    prepared = calls["data_prepared"]
    assert prepared["train"] + prepared["eval"] == 20 and prepared["eval"] == 4
    assert prepared["columns"] == ["input_ids", "labels"] and prepared["stats"]["bad_records"] == 1


def test_hook_ftcore_model_loaded(recorded):
    _, calls, _ = recorded
    loaded = calls["model_loaded"]
    assert 0 < loaded["trainable"] < loaded["total"]   # LoRA: adapters (and the new token's rows) only


def test_hook_ftcore_training_arguments(recorded):
    result, calls, _ = recorded
    assert calls["training_arguments"]["logging_steps"] == 2
    steps = [json.loads(line)["step"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, result.metrics["steps"] + 1))   # every step logged: the adjustment took


def test_hook_ftcore_trainer_callbacks(recorded):
    result, calls, _ = recorded
    assert calls["trainer_callbacks"]["steps"] == list(range(1, result.metrics["steps"] + 1))


def test_hook_ftcore_trainer_created(recorded):
    _, calls, _ = recorded
    assert calls["trainer_created"]["trainer"] in ("Trainer", "FastLossTrainer")


def test_hook_ftcore_build_optimizer(recorded):
    _, calls, _ = recorded
    assert calls["trainer_created"]["optimizer"] == "SGD"


def test_hook_ftcore_export(recorded):
    result, _, seen = recorded
    assert seen["summary_exists"] and seen["steps"] == result.metrics["steps"] and seen["records"] == 21
    assert seen["model_dir"] == result.model_dir and seen["export_output"] is None
    assert result.output_dir / "notes.json" in result.exports
    assert json.loads((result.output_dir / "notes.json").read_text())["eval_loss"] == result.metrics["eval_loss"]


def test_hook_ftcore_run_finished(recorded):
    result, calls, _ = recorded
    finished = calls["run_finished"]
    assert finished["steps"] == result.metrics["steps"] and finished["summary"] and finished["report"].is_file()


def test_hook_ftcore_load_model(tiny_model_dir, alpaca_file, tmp_path):
    class QueryOnly:
        """An adapter method: rank-2 LoRA on q_proj only."""

        name = "query-only"

        @ftcore.hookimpl
        def ftcore_load_model(self, model_path, tokenizer, config, ctx):
            from peft import LoraConfig, get_peft_model

            base = ftcore.load_base_model(model_path, tokenizer, config, ctx)
            return get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))

    result = ftcore.run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out"), plugins=[QueryOnly()],
                        log=lambda m: None)
    adapter = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["target_modules"] == ["q_proj"]
    assert json.loads((result.output_dir / "plugins.json").read_text())[0]["kind"] == "adapter"


def test_hook_ftcore_merge_adapter(recorded, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    result, _, _ = recorded
    asked = []

    class Merger:
        name = "merger"

        @ftcore.hookimpl
        def ftcore_merge_adapter(self, adapter_dir, base_path, dtype, ctx):
            asked.append((adapter_dir, dtype))
            return ftcore.merge_peft_adapter(adapter_dir, base_path, dtype)

    out = ftcore.merge_adapter(result.model_dir, tmp_path / "merged", plugins=select([], [Merger()], defaults=False),
                               log=lambda m: None)
    assert asked == [(str(result.model_dir), "auto")]
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(json.loads((result.model_dir / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"])
    ids = torch.tensor([[1, 5, 9, 13]])
    assert not torch.allclose(merged(ids).logits[..., :base.config.vocab_size], base(ids).logits)


STRATEGY = '''
    """A strategy that records how it was asked to launch, and launches nothing."""
    import json
    import os

    import ftcore


    @ftcore.hookimpl
    def ftcore_launch(argv, config, ctx):
        with open(os.environ["FTCORE_TEST_LAUNCH_RECORD"], "w") as fh:
            json.dump({"argv": argv, "config": open(argv[-1]).read(), "world_size": ctx.world_size}, fh)
        return 0
'''


def test_hook_ftcore_launch(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    install(tmp_path / "site", monkeypatch, "ftcore-recording-launcher", "0.1", {"recording-launcher": "ftcore_rec_launch"},
            {"ftcore_rec_launch.py": STRATEGY})
    record = tmp_path / "launch.json"
    monkeypatch.setenv("FTCORE_TEST_LAUNCH_RECORD", str(record))
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    config.update(plugins=["recording-launcher", "lora", "alpaca"], launch={"num_processes": 2})
    result = ftcore.run(config, log=lambda m: None)
    seen = json.loads(record.read_text())
    assert result.exit_code == 0 and seen["argv"][:4] == ["-m", "ftcore.cli", "run", seen["argv"][3]]
    assert "recording-launcher" in seen["config"] and "num_processes: 2" in seen["config"]
    assert seen["world_size"] == 2 and not Path(seen["argv"][3]).exists()   # the launch file is removed


def test_hook_ftcore_memory_profile():
    class Tiny:
        name = "tiny-adapter"

        @ftcore.hookimpl
        def ftcore_load_model(self, model_path):
            raise AssertionError("not called by the estimate")

        @ftcore.hookimpl
        def ftcore_memory_profile(self, config, ctx):
            assert ctx.config is config
            return ftcore.MemoryProfile(trains="adapters", base_storage="compute", adapter_rank=1,
                                        adapter_targets=("q_proj",), assumptions="rank 1 on q_proj.")

    shape = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 192, "vocab_size": 512}
    result = ftcore.estimate(shape, plugin_objects=[Tiny()])
    row = next(r for r in result["methods"] if r["method"] == "tiny-adapter")
    assert row["trainable_params"] == 2 * (64 + 64) * 1 and result["selected"] == ["tiny-adapter"]
