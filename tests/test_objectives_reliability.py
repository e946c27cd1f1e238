"""Preference runs survive faults as supervised ones do: a DPO or KTO run killed with SIGKILL resumes (--resume auto) to
the uninterrupted run's every step and adapter; SIGTERM saves a checkpoint and exits 3."""

from __future__ import annotations

import signal

import pytest
import yaml
from conftest import tiny_config, write_jsonl
from procs import assert_same_training, finish, losses, run, send, start, wait_for_step, write_config
from test_deepspeed_ranks import ZERO2_REL, assert_same_losses, base_args, run_cli, train_losses
from test_objectives import preference_pairs, unpaired

import ftcore
from ftcore.errors import EXIT_INTERRUPTED
from ftcore.training import checkpoints


@pytest.fixture(scope="module", params=["dpo", "kto"])
def dpo_resumable(request, tmp_path_factory, tiny_model_dir):
    """A DPO (pairs) or KTO (unpaired judgements) run of 2 epochs, a checkpoint every 2 steps, and its
    uninterrupted output."""
    objective = request.param
    folder = tmp_path_factory.mktemp(f"{objective}-resumable")
    pairs = preference_pairs(16, seed=8)
    data = write_jsonl(folder / "pairs.jsonl", pairs if objective == "dpo" else unpaired(pairs)[:16])
    config = write_config(folder, tiny_model_dir, data)
    settings = yaml.safe_load(config.read_text())
    settings["plugins"] = ["lora", objective]
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
    assert not (out / "checkpoints" / "README.md").exists()   # TRL's model card is left to ftcore
    rc, log = run(config, out, "--resume", "auto", log_name="resume.log")
    assert rc == 0, log
    assert f"resuming from {newest}" in log
    assert_same_training(out, reference)
    assert [r for r in losses(out).values() if any(k.startswith("rewards/") for k in r)]


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


@pytest.mark.slow
def test_dpo_zero2_on_two_cpu_ranks_matches_one_process(tiny_model_dir, tmp_path):
    """deepspeed-zero (ZeRO-2, two CPU ranks of 2 pairs each) against one process of 4 pairs: the same losses."""
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(20, seed=9))
    settings = ["training.epochs=1", "training.batch_size=2", "training.gradient_accumulation=1",
                "training.logging_steps=1", "training.learning_rate=1e-3", "training.save_strategy='no'",
                "data.val_size=4", "data.max_length=128", "lora.dropout=0"]
    out = tmp_path / "zero2"
    status, output = run_cli(base_args(tiny_model_dir, data, out, "deepspeed-zero,lora,dpo", settings)
                             + ["--num-processes", "2"])
    assert status == 0, output
    assert "DeepSpeed ZeRO stage 2" in output
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "one", epochs=1, batch_size=4, learning_rate=1e-3)
    cfg["plugins"] = ["lora", "dpo"]
    cfg["lora"] = {"dropout": 0}
    one = ftcore.run(cfg, log=lambda m: None)
    assert_same_losses(train_losses(out), train_losses(one.output_dir), ZERO2_REL)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
