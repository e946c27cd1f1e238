"""Experiment trackers through the trainer's integrations, validated before anything is loaded."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from ux_runs import metric_rows, shared_run

import ftcore
from ftcore.config.checks import TRACKERS


def test_tensorboard_event_files_hold_the_run_metrics(tmp_path_factory, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = shared_run(tmp_path_factory, tiny_model_dir)
    logdir = result.output_dir / "tensorboard"
    assert result.metrics["tracker_dirs"] == {"tensorboard": str(logdir)}
    assert list(logdir.glob("events.out.tfevents.*"))
    scalars: dict[str, list] = {}
    for events in sorted(logdir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    rows = metric_rows(result)
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    logged = {e.step: e.value for e in scalars["train/loss"]}
    assert logged.keys() == train.keys() and len(train) == 10
    assert all(logged[s] == pytest.approx(train[s], rel=1e-5) for s in train)
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert {e.step for e in scalars["eval/loss"]} == set(evals)
    assert "train/learning_rate" in scalars


def _resolve(tiny_model_dir, tmp_path, report_to):
    return ftcore.resolve({"model": str(tiny_model_dir), "data": {"datasets": ["x.jsonl"]},
                           "output_dir": str(tmp_path / "o"), "training": {"report_to": report_to}},
                          log=lambda m: None)


@pytest.mark.parametrize("name", sorted(TRACKERS))
def test_each_tracker_is_accepted_when_installed_or_names_its_pip_package(name, tiny_model_dir, tmp_path):
    modules, package = TRACKERS[name]
    if any(importlib.util.find_spec(m) for m in modules):
        config, _ = _resolve(tiny_model_dir, tmp_path, [name])
        assert config.training.report_to == [name]
    else:
        with pytest.raises(ftcore.ConfigError, match=rf"pip install {package}\b"):
            _resolve(tiny_model_dir, tmp_path, [name])


def test_tracker_names_are_validated(tiny_model_dir, tmp_path):
    with pytest.raises(ftcore.ConfigError, match='unknown tracker .tensorbord.. Did you mean "tensorboard"'):
        _resolve(tiny_model_dir, tmp_path, ["tensorbord"])
    with pytest.raises(ftcore.ConfigError, match='"none" cannot be combined'):
        _resolve(tiny_model_dir, tmp_path, ["none", "tensorboard"])
    config, _ = _resolve(tiny_model_dir, tmp_path, ["none"])
    assert config.training.report_to == ["none"]


def test_a_missing_tracker_package_is_a_config_error_naming_it(tiny_model_dir, tmp_path, monkeypatch):
    """As a user without tensorboard installed sees it: Python's own way of making a package unimportable (a None
    entry in sys.modules, which the import system and find_spec honour) for tensorboard and tensorboardX."""
    for module in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, module, None)
    assert importlib.util.find_spec("tensorboard") is None
    with pytest.raises(ftcore.ConfigError, match=r"pip install tensorboard"):
        _resolve(tiny_model_dir, tmp_path, ["tensorboard"])


def test_no_tracker_by_default(tiny_model_dir, alpaca_file, tmp_path):
    """Without training.report_to the trainer gets no integration callback (not even an installed one)."""
    from conftest import tiny_config

    seen = {}

    class Probe:
        @ftcore.hookimpl
        def ftcore_trainer_created(self, trainer, ctx):
            seen["report_to"] = trainer.args.report_to
            seen["callbacks"] = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]

    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    config["report"] = {"samples": 0}
    assert ftcore.resolve(config, log=lambda m: None)[0].training.report_to == []
    result = ftcore.run(config, plugins=[Probe()], log=lambda m: None)
    assert seen["report_to"] in ([], ["none"], "none")
    integrations = {"TensorBoardCallback", "TrackioCallback", "MLflowCallback", "WandbCallback"}
    assert not integrations & set(seen["callbacks"]), seen["callbacks"]
    assert "tracker_dirs" not in result.metrics and not (result.output_dir / "tensorboard").exists()
