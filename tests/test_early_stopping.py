"""The overfitting warning and early stopping that keeps the best checkpoint."""

from __future__ import annotations

import pytest
from conftest import tiny_config, write_jsonl
from safetensors.torch import load_file

import ftcore
from ftcore.reporting.progress import QuietReporter
from ftcore.training.callbacks import overfitting_message


def _history(train: list[float], evals: dict[int, float]) -> tuple[list, list]:
    history = [{"step": i + 1, "loss": v} for i, v in enumerate(train)]
    return [(s, v) for s, v in sorted(evals.items())], history


def test_warns_when_eval_rises_while_train_falls():
    evals, history = _history([3.0, 2.5, 2.0, 1.5, 1.0], {1: 2.0, 2: 1.8, 3: 1.9, 4: 2.0, 5: 2.1})
    message = overfitting_message(evals, history, rises=3)
    assert message.startswith("warning: the model looks like it is overfitting")
    assert "1.8000 -> 1.9000 -> 2.0000 -> 2.1000" in message and "training.early_stopping_patience" in message
    assert overfitting_message(evals, history, rises=4) is None          # only three rises so far


def test_no_warning_when_train_loss_rises_too_or_eval_dips():
    evals, history = _history([1.0, 1.2, 1.4, 1.6, 1.8], {1: 2.0, 2: 1.8, 3: 1.9, 4: 2.0, 5: 2.1})
    assert overfitting_message(evals, history, rises=3) is None           # diverging, not overfitting
    evals, history = _history([3.0, 2.5, 2.0, 1.5, 1.0], {1: 2.0, 2: 2.1, 3: 2.05, 4: 2.2, 5: 2.3})
    assert overfitting_message(evals, history, rises=3) is None           # not rising at every evaluation


def _resolve(tiny_model_dir, tmp_path, **training):
    config = tiny_config(tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "o", early_stopping_patience=2, **training)
    return ftcore.resolve(config, log=lambda m: None)


def test_early_stopping_needs_checkpoints_where_it_evaluates(tiny_model_dir, tmp_path):
    with pytest.raises(ftcore.ConfigError, match=r"save_strategy is 'no' but training.eval_strategy is 'epoch'; "
                                                 r"set both to 'epoch'"):
        _resolve(tiny_model_dir, tmp_path)                      # tiny_config saves nothing
    with pytest.raises(ftcore.ConfigError, match=r"save_steps \(3\) must be a multiple of training.eval_steps \(2\)"):
        _resolve(tiny_model_dir, tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=3)
    with pytest.raises(ftcore.ConfigError, match="needs evaluations"):
        _resolve(tiny_model_dir, tmp_path, eval_strategy="no", save_strategy="no")
    config, _ = _resolve(tiny_model_dir, tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                         save_steps=4)
    assert config.training.early_stopping_patience == 2


def test_early_stopping_needs_a_held_out_set(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "o", early_stopping_patience=2,
                         save_strategy="epoch")
    config["data"]["val_size"] = 0
    with pytest.raises(ftcore.ConfigError, match="needs a held-out set"):
        ftcore.resolve(config, log=lambda m: None)


def test_overfitting_run_warns_stops_early_and_keeps_the_best_checkpoint(tiny_model_dir, tmp_path):
    """Train on one answer, evaluate on a contradicting one: train loss falls, eval loss turns up."""
    prompt = "Name the capital of France ({}).".format
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": prompt(a), "input": "",
                                                    "output": "Paris is the capital of France."} for a in range(24)])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": prompt(a), "input": "",
                                                  "output": "One, two, three, four, five."} for a in range(100, 104)])
    config = tiny_config(tiny_model_dir, train, tmp_path / "out", epochs=2, learning_rate=1e-3, warmup_ratio=0,
                         eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                         early_stopping_patience=2, overfit_warning_evals=2)
    config.update(plugins=["full", "alpaca"], alpaca={"add_eos": False}, report={"samples": 0})
    config["data"]["eval_datasets"] = [str(held)]
    lines: list[str] = []
    result = ftcore.run(config, log=QuietReporter(write=lines.append))

    m = result.metrics
    assert m["stopped_early"] is True and m["steps"] < 12           # 12 steps were planned
    overfit = [l for l in lines if "overfitting" in l]
    assert len(overfit) == 1 and "early stopping will end the run" in overfit[0]
    assert all(l.startswith("warning:") for l in lines)             # quiet: warnings only
    best = tmp_path / "out" / "checkpoints" / f"checkpoint-{m['steps'] - 2}"
    assert m["best_checkpoint"] == str(best)
    assert m["eval_loss"] == pytest.approx(m["best_checkpoint_eval_loss"]) == pytest.approx(m["best_eval_loss"])
    saved = load_file(result.model_dir / "model.safetensors")
    kept = load_file(best / "model.safetensors")
    assert saved.keys() == kept.keys() and all((saved[k] == kept[k]).all() for k in saved)
    last = load_file(tmp_path / "out" / "checkpoints" / f"checkpoint-{m['steps']}" / "model.safetensors")
    assert any((saved[k] != last[k]).any() for k in saved)          # not simply the last weights
    assert "kept the best checkpoint" in result.report_path.read_text()      # the report's summary says so
