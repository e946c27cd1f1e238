"""Resume after a crash: SIGKILL mid-epoch, a kill while a checkpoint is being written, --resume rules."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import textwrap

import pytest
from procs import (  # noqa: F401
    SAVE_STEPS,
    assert_same_training,
    finish,
    losses,
    resumable,
    rows,
    run,
    send,
    start,
    wait_for_file,
    wait_for_step,
)

from ftcore.errors import ConfigError
from ftcore.training import checkpoints


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_reproduces_every_step(resumable, tmp_path):
    config, reference = resumable
    out = tmp_path / "out"
    proc = start(config, out)
    reached = wait_for_step(proc, out, 5)       # epoch 1 has 6 steps: this is mid-epoch
    send(proc, signal.SIGKILL)
    finish(proc)
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    newest = checkpoints.newest_complete(out)
    assert newest is not None and checkpoints.step_of(newest) >= 4
    assert max(losses(out)) >= reached          # rows past the checkpoint exist before the resume...

    rc, log = run(config, out, "--resume", "auto", log_name="resume.log")
    assert rc == 0, log
    assert f"resuming from {newest}" in log
    assert_same_training(out, reference)        # ...and are replaced, once each, by the resumed ones
    train_rows = [r for r in rows(out) if "loss" in r]
    assert [r["step"] for r in train_rows] == sorted(r["step"] for r in train_rows)
    tokens = [r["tokens"] for r in train_rows]
    assert tokens == sorted(tokens) and tokens[-1] > 0     # counts continue from the checkpoint
    elapsed = [r["elapsed_s"] for r in train_rows]
    assert elapsed == sorted(elapsed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["steps"] == 12


@pytest.mark.slow
def test_resume_from_the_epochs_last_checkpoint_reproduces_the_next_epoch(resumable, tmp_path):
    """Step 6 ends epoch 1 and is checkpointed before the epoch's evaluation: the resumed epoch 2 must
    draw the same dropout masks as the uninterrupted run, so evaluation may not consume training randomness."""
    config, reference = resumable
    out = tmp_path / "out"
    proc = start(config, out)
    wait_for_step(proc, out, 7)
    send(proc, signal.SIGKILL)
    finish(proc)
    newest = checkpoints.newest_complete(out)
    assert newest is not None and checkpoints.step_of(newest) >= 6

    rc, log = run(config, out, "--resume", "auto", log_name="resume.log")
    assert rc == 0, log
    assert f"resuming from {newest}" in log
    assert_same_training(out, reference)


def kill_while_saving(script_text: str, config, tmp_path):
    """Run ``script_text`` (a run that writes the path in argv[3] once it stalls inside a save), SIGKILL it
    there, and return its output dir."""
    import subprocess

    from procs import env

    out, flag = tmp_path / "out", tmp_path / "saving-now"
    script = tmp_path / "stalled_save.py"
    script.write_text(script_text)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(config), str(out), str(flag)],
                                stdout=log, stderr=subprocess.STDOUT, env=env())
    proc.log_path = tmp_path / "killed.log"
    wait_for_file(proc, flag)
    proc.kill()
    proc.wait(timeout=60)
    return out


SLOW_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import ftcore

    class SlowSecondSave:
        '''An extension plugin that stalls inside the trainer's second checkpoint save.'''
        name = "slow-save"

        @ftcore.hookimpl
        def ftcore_trainer_created(self, trainer, ctx):
            original = trainer._save_rng_state
            calls = []

            def slow(output_dir):
                calls.append(output_dir)
                if len(calls) == 2:
                    Path(sys.argv[3]).write_text(output_dir)
                    time.sleep(600)
                return original(output_dir)

            trainer._save_rng_state = slow

    ftcore.run(sys.argv[1], output_dir=sys.argv[2], plugins=[SlowSecondSave()])
""")


@pytest.mark.slow
def test_a_checkpoint_cut_off_while_saving_is_never_resumed_from(resumable, tmp_path):
    config, reference = resumable
    out = kill_while_saving(SLOW_SAVE, config, tmp_path)
    second = f"checkpoint-{2 * SAVE_STEPS}"
    staged = out / "checkpoints" / checkpoints.STAGING / second
    assert staged.is_dir() and (staged / "adapter_model.safetensors").exists()   # killed halfway through
    assert not (staged / checkpoints.MARKER).exists() and not (staged / "trainer_state.json").exists()
    assert not (out / "checkpoints" / second).exists()                           # never published
    first = out / "checkpoints" / f"checkpoint-{SAVE_STEPS}"
    assert checkpoints.is_complete(first)
    # A newer-looking folder without the marker (as a kill mid-save in another tool leaves it):
    # transformers' own get_last_checkpoint would take it; --resume auto must not.
    fake = out / "checkpoints" / "checkpoint-10"
    shutil.copytree(first, fake)
    (fake / checkpoints.MARKER).unlink()
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(out / "checkpoints")) == str(fake)
    assert checkpoints.newest_complete(out, lambda m: None) == first

    rc, text = run(config, out, "--resume", "auto", log_name="resume.log")
    assert rc == 0, text
    assert f"skipping {fake}" in text and f"resuming from {first}" in text
    assert not (out / "checkpoints" / checkpoints.STAGING).exists()   # leftovers of the kill are cleaned
    assert_same_training(out, reference)


SLOW_FINAL_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import safetensors.torch

    real = safetensors.torch.save_file

    def stalled(tensors, filename, *a, **k):
        # write the final adapter's weights, then stall before its save completes
        real(tensors, filename, *a, **k)
        if ".adapter.tmp" in str(filename):
            Path(sys.argv[3]).write_text(str(filename))
            time.sleep(600)

    safetensors.torch.save_file = stalled   # before peft and ftcore import it
    import ftcore
    ftcore.run(sys.argv[1], output_dir=sys.argv[2])
""")


@pytest.mark.slow
def test_a_kill_while_saving_the_final_adapter_publishes_nothing_and_resume_finishes(resumable, tmp_path):
    """Training is over and the adapter is half-written when the run is killed: no `adapter/` appears,
    and `--resume auto` takes the last checkpoint, writes the same adapter as the uninterrupted run and
    removes the leftovers."""
    config, reference = resumable
    out = kill_while_saving(SLOW_FINAL_SAVE, config, tmp_path)
    assert (out / ".adapter.tmp" / "adapter_model.safetensors").exists()    # killed halfway through
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    last = checkpoints.newest_complete(out)
    assert last is not None and checkpoints.step_of(last) == 12

    rc, text = run(config, out, "--resume", "auto", log_name="resume.log")
    assert rc == 0, text
    assert f"resuming from {last}" in text
    assert not (out / ".adapter.tmp").exists()
    assert_same_training(out, reference)


# -- the rules of --resume, without training -------------------------------------------

def test_resume_auto_in_an_empty_place_starts_from_the_beginning(tmp_path):
    logged = []
    assert checkpoints.resolve_resume("auto", tmp_path / "new", False, logged.append) is None
    assert "starting from the beginning" in logged[0]


def test_resume_auto_refuses_a_finished_run(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="finished run.*--overwrite"):
        checkpoints.resolve_resume("auto", tmp_path, False, print)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume and --overwrite"):
        checkpoints.resolve_resume("auto", tmp_path, True, print)


def test_resume_path_must_be_a_complete_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        checkpoints.resolve_resume(str(tmp_path / "nope"), tmp_path, False, print)
    partial = tmp_path / "checkpoints" / "checkpoint-4"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    with pytest.raises(ConfigError, match="not a complete ftcore checkpoint"):
        checkpoints.resolve_resume(str(partial), tmp_path, False, print)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        checkpoints.resolve_resume(str(tmp_path), tmp_path, False, print)   # a run folder
    complete = tmp_path / "checkpoints" / "checkpoint-2"
    complete.mkdir()
    (complete / checkpoints.MARKER).write_text("{}")
    assert checkpoints.resolve_resume(str(complete), tmp_path, False, print) == complete
    assert checkpoints.resolve_resume(str(tmp_path), tmp_path, False, lambda m: None) == complete


def test_metrics_are_trimmed_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    checkpoints.trim_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_resuming_with_a_changed_config_names_each_change(tmp_path):
    import yaml

    import ftcore

    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    config, _ = ftcore.resolve({"model": "m", "output_dir": str(run_dir), "training": {"learning_rate": 2e-4}},
                               log=lambda m: None)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    again, _ = ftcore.resolve({"model": "m", "output_dir": "elsewhere", "resume": "auto",
                               "training": {"learning_rate": 1e-4}}, log=lambda m: None)
    assert checkpoints.config_changes(checkpoint, again) == ["training.learning_rate: 0.0002 -> 0.0001"]
