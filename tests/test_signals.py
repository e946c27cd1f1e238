"""SIGTERM and SIGINT to a real training process: checkpoint, exit status 3, in time, resumable."""

from __future__ import annotations

import signal
import time

import pytest
from procs import assert_same_training, finish, losses, resumable, run, send, start, wait_for_step  # noqa: F401

from ftcore.errors import EXIT_INTERRUPTED
from ftcore.training import checkpoints

GRACE_S = 30   # Kubernetes' default terminationGracePeriodSeconds; Slurm's KillWait is 30 s too


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_exits_3_and_the_run_resumes_exactly(resumable, tmp_path, sig):
    config, reference = resumable
    out = tmp_path / "out"
    proc = start(config, out)
    wait_for_step(proc, out, 3)          # 3 is not a save step: the checkpoint is the signal's
    sent = time.time()
    send(proc, sig)
    rc, log = finish(proc, timeout=120)
    took = time.time() - sent
    assert rc == EXIT_INTERRUPTED, log
    assert took < GRACE_S, f"took {took:.1f}s to stop"
    assert f"{sig.name} received" in log and f"interrupted by {sig.name} at step" in log
    assert "--resume auto" in log and "Traceback" not in log
    newest = checkpoints.newest_complete(out)
    step = checkpoints.step_of(newest)
    assert step >= 3 and f"checkpoint-{step}" in log
    assert (newest / "optimizer.pt").exists() and (newest / "scheduler.pt").exists()
    assert (newest / "rng_state.pth").exists() and (newest / "trainer_state.json").exists()
    assert max(losses(out)) == step      # it stopped right after the step it saved
    assert not (out / "adapter").exists()

    resume = "auto" if sig == signal.SIGTERM else str(newest)   # both forms of --resume
    rc, log = run(config, out, "--resume", resume, log_name="resume.log")
    assert rc == 0, log
    assert f"resuming from {newest}" in log
    assert_same_training(out, reference)


def test_signal_handlers_are_restored_after_training(tiny_model_dir, alpaca_file, tmp_path):
    from conftest import tiny_config

    import ftcore

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    ftcore.run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=1), log=lambda m: None)
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_a_second_signal_stops_at_once_without_a_checkpoint(resumable, tmp_path):
    """The documented status 130: a second signal (here SIGINT right after SIGTERM) stops without saving,
    and leaves no checkpoint that --resume auto could take half-written."""
    config, _ = resumable
    out = tmp_path / "out"
    proc = start(config, out)
    wait_for_step(proc, out, 3)
    send(proc, signal.SIGTERM)
    send(proc, signal.SIGINT)       # a different signal, so the two are never merged into one delivery
    rc, log = finish(proc, timeout=120)
    assert rc == 130, log
    assert "received again: stopping now, without a checkpoint" in log and "stopped (no checkpoint saved)" in log
    assert "interrupted by" not in log and not (out / "adapter").exists()
    assert all(checkpoints.is_complete(c) for c in checkpoints.checkpoint_folders(out))
