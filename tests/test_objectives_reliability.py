"""Preference runs survive faults as supervised ones do: a DPO run killed with SIGKILL resumes (--resume auto) to
the uninterrupted run's every step and adapter; SIGTERM saves a checkpoint and exits 3."""

from __future__ import annotations

import signal

import pytest
import yaml
from conftest import write_jsonl
from procs import assert_same_training, finish, losses, run, send, start, wait_for_step, write_config
from test_objectives import preference_pairs

from ftcore.errors import EXIT_INTERRUPTED
from ftcore.training import checkpoints


@pytest.fixture(scope="module")
def dpo_resumable(tmp_path_factory, tiny_model_dir):
    """A DPO run of 12 steps (2 epochs, a checkpoint every 2 steps) and its uninterrupted output."""
    folder = tmp_path_factory.mktemp("dpo-resumable")
    data = write_jsonl(folder / "pairs.jsonl", preference_pairs(16, seed=8))
    config = write_config(folder, tiny_model_dir, data)
    settings = yaml.safe_load(config.read_text())
    settings["plugins"] = ["lora", "dpo"]
    config.write_text(yaml.safe_dump(settings))
    reference = folder / "reference"
    rc, log = run(config, reference)
    assert rc == 0, log
    return config, reference


@pytest.mark.slow
def test_dpo_killed_mid_epoch_resumes_to_the_uninterrupted_runs_steps_and_adapter(dpo_resumable, tmp_path):
    config, reference = dpo_resumable
    out = tmp_path / "out"
    proc = start(config, out)
    wait_for_step(proc, out, 5)
    send(proc, signal.SIGKILL)
    finish(proc)
    assert not (out / "adapter").exists()
    newest = checkpoints.newest_complete(out)
    assert newest is not None and checkpoints.step_of(newest) >= 4
    assert not (newest / "README.md").exists()   # TRL's model card is left to ftcore
    rc, log = run(config, out, "--resume", "auto", log_name="resume.log")
    assert rc == 0, log
    assert f"resuming from {newest}" in log
    assert_same_training(out, reference)
    assert [r for r in losses(out).values() if "rewards/margins" in r]


@pytest.mark.slow
def test_dpo_sigterm_saves_a_checkpoint_and_exits_3(dpo_resumable, tmp_path):
    config, reference = dpo_resumable
    out = tmp_path / "out"
    proc = start(config, out)
    wait_for_step(proc, out, 3)
    send(proc, signal.SIGTERM)
    rc, log = finish(proc)
    assert rc == EXIT_INTERRUPTED, log
    assert "--resume auto" in log and checkpoints.newest_complete(out) is not None
