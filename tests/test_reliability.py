"""Runs against each other and against signals, with real processes: one run per output folder, a previous
run that an --overwrite set aside always comes back, and every interruption resumes to the same files."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import pytest
from procs import (  # noqa: F401
    STEPS,
    assert_same_outputs,
    finish,
    log_of,
    resumable,
    run,
    send,
    start,
    start_script,
    wait_for_file,
    wait_for_step,
    write_config,
)

from ftcore.errors import EXIT_INTERRUPTED
from ftcore.training import checkpoints

# A run whose steps last long enough for other processes to meet it while it trains: each step waits its
# seconds (argv[3]), or until the file argv[4] exists (the test is done with it: the rest of the run goes fast).
SLOW_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import ftcore
    from transformers import TrainerCallback

    class Slow:
        name = "slow"

        @ftcore.hookimpl
        def ftcore_trainer_callbacks(self, ctx):
            release = Path(sys.argv[4]) if len(sys.argv) > 4 else None

            class Wait(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    deadline = time.monotonic() + float(sys.argv[3])
                    while time.monotonic() < deadline and not (release and release.exists()):
                        time.sleep(0.05)
            return [Wait()]

    from ftcore.cli.options import user_errors   # the command's exit statuses
    user_errors(ftcore.run)(sys.argv[1], output_dir=sys.argv[2], plugins=[Slow()])
""")


def lock_file(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@pytest.mark.slow
def test_a_second_run_an_overwrite_and_a_resume_against_a_live_run_are_refused(resumable, tmp_path):
    config, reference = resumable
    out = tmp_path / "out"
    release = tmp_path / "release"      # 30 s a step until the three others were tried, then at full speed
    live = start_script(SLOW_RUN, tmp_path, config, out, 30, release, name="live")
    try:
        wait_for_step(live, out, 1)
        owner = f"in use by another ftcore run (process {live.pid} on "
        for extra in ((), ("--overwrite",), ("--resume", "auto")):
            rc, text = run(config, out, *extra, log_name=f"second{'-'.join(extra)}.log")
            assert rc == 2, text
            assert owner in text and "Traceback" not in text
        assert live.poll() is None, "the live run ended before the others were tried: make its steps slower"
    finally:
        release.touch()
    rc, text = finish(live)
    assert rc == 0, text
    for name in ("ftcore-run.json", "config.yaml", "plugins.json", "summary.json", "report.html"):
        assert (out / name).is_file(), name      # the live run kept everything it wrote
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)) == list(range(1, STEPS + 1))
    assert not lock_file(out).exists()          # released at the end


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_taken_over(resumable, tmp_path):
    config, reference = resumable
    out = tmp_path / "out"
    killed = start_script(SLOW_RUN, tmp_path, config, out, 0.3, name="killed")
    wait_for_step(killed, out, 3)
    killed.kill()
    killed.wait(timeout=60)
    assert json.loads(lock_file(out).read_text())["pid"] == killed.pid   # left behind, but no longer locked
    rc, text = run(config, out, "--resume", "auto", log_name="resume.log")
    assert rc == 0, text
    assert f"took over the lock of {out} from a run that ended without releasing it (process {killed.pid}" in text
    assert_same_outputs(out, reference)
    assert not lock_file(out).exists()


def test_the_lock_refuses_a_second_holder_in_process(tmp_path):
    from ftcore import ConfigError
    from ftcore.training.outputs import OutputLock

    out = tmp_path / "out"
    with OutputLock(out):
        with pytest.raises(ConfigError, match=r"in use by another ftcore run \(process \d+ on "):
            OutputLock(out).acquire()
    with OutputLock(out):   # released: free again
        pass


def test_a_filesystem_without_locks_runs_unlocked_and_says_so(tmp_path, monkeypatch):
    """Some network filesystems refuse flock (ENOLCK): the run goes on, and the user learns nothing guards it."""
    import errno

    import ftcore
    from ftcore.training import engine, outputs
    from ftcore.training.outputs import OutputLock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outputs.fcntl, "flock", no_locks)
    out = tmp_path / "out"
    with OutputLock(out) as lock:
        assert lock.unlocked == "No locks available"
        with OutputLock(out):   # nothing can refuse a second holder here
            pass
    config = ftcore.RunConfig.model_validate({"model": "m", "output_dir": str(out)})
    lines = []
    with engine.output_lock(config, lines.append):
        pass
    assert any(line.startswith("warning:") and "cannot be locked (No locks available" in line
               and "its own --output" in line and "docs/safety.md" in line for line in lines)


# -- --overwrite: the previous run comes back when the new one stops before training ------------

PAUSE_BEFORE_TRAINING = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import ftcore

    class Pause:
        name = "pause"

        @ftcore.hookimpl
        def ftcore_data_prepared(self, ctx):
            Path(sys.argv[3]).write_text("preparing")
            time.sleep(600)

    from ftcore.cli.options import user_errors   # the command's exit statuses
    user_errors(ftcore.run)(sys.argv[1], output_dir=sys.argv[2], overwrite=True, plugins=[Pause()])
""")


def _finished_previous(reference: Path, out: Path) -> dict[str, bytes]:
    import shutil

    shutil.copytree(reference, out)
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigterm_before_training_with_overwrite_puts_the_previous_run_back(resumable, tmp_path):
    config, reference = resumable
    out, flag = tmp_path / "out", tmp_path / "paused"
    before = _finished_previous(reference, out)
    proc = start_script(PAUSE_BEFORE_TRAINING, tmp_path, config, out, flag, name="overwrite")
    wait_for_file(proc, flag)
    assert any(tmp_path.glob(".out.previous-*"))          # the previous run is set aside meanwhile
    send(proc, signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 143, log_of(proc)
    assert "SIGTERM" in log_of(proc)
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before and not list(tmp_path.glob(".out.previous-*"))


@pytest.mark.slow
def test_a_previous_run_stranded_by_a_kill_is_put_back_by_the_next_run(resumable, tmp_path):
    config, reference = resumable
    out, flag = tmp_path / "out", tmp_path / "paused"
    before = _finished_previous(reference, out)
    proc = start_script(PAUSE_BEFORE_TRAINING, tmp_path, config, out, flag, name="overwrite")
    wait_for_file(proc, flag)
    proc.kill()
    proc.wait(timeout=60)
    assert list(tmp_path.glob(".out.previous-*"))        # SIGKILL: nothing could put it back
    rc, text = run(config, out, log_name="next.log")      # the next run on that folder, without --overwrite
    assert rc == 2 and "put back the previous run" in text and "already holds another run's results" in text
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before and not list(tmp_path.glob(".out.previous-*"))


# -- interruptions resume to the same files ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_a_kill_then_resume_gives_the_uninterrupted_runs_files(resumable, tmp_path, where):
    """metrics.jsonl row for row, summary.json, the adapter and the report, timings aside."""
    config, reference = resumable
    out = tmp_path / "out"
    proc = start(config, out)
    step = 5 if where == "mid-epoch" else 7      # 6 steps an epoch; checkpoints every 2 steps
    wait_for_step(proc, out, step)
    proc.kill()
    proc.wait(timeout=60)
    rc, text = run(config, out, "--resume", "auto", log_name="resume.log")
    assert rc == 0, text
    assert_same_outputs(out, reference)


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_uninterrupted_runs_files(resumable, tmp_path):
    config, reference = resumable
    out = tmp_path / "out"
    proc = start(config, out)
    wait_for_step(proc, out, 3)
    send(proc, signal.SIGTERM)
    rc, text = finish(proc, timeout=120)
    assert rc == EXIT_INTERRUPTED, text
    rc, text = run(config, out, "--resume", "auto", log_name="resume.log")
    assert rc == 0, text
    assert_same_outputs(out, reference)


STALL_FINAL_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import safetensors.torch

    real = safetensors.torch.save_file

    def stalled(tensors, filename, *a, **k):
        real(tensors, filename, *a, **k)
        if ".adapter.tmp" in str(filename):
            Path(sys.argv[3]).write_text(str(filename))
            time.sleep(600)

    safetensors.torch.save_file = stalled   # before peft and ftcore import it
    import ftcore
    from ftcore.cli.options import user_errors   # the command's exit statuses
    user_errors(ftcore.run)(sys.argv[1], output_dir=sys.argv[2])
""")


@pytest.fixture(scope="module")
def ends_mid_epoch(tmp_path_factory, tiny_model_dir):
    """A run whose last step (4) is checkpointed in the middle of an epoch (6 steps), and its reference."""
    from conftest import write_jsonl
    from procs import records

    folder = tmp_path_factory.mktemp("mid-epoch")
    data = write_jsonl(folder / "train.jsonl", records())
    config = write_config(folder, tiny_model_dir, data, max_steps=4)
    rc, text = run(config, folder / "reference")
    assert rc == 0, text
    return config, folder / "reference"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_an_interruption_inside_the_final_save_resumes_to_the_same_files(ends_mid_epoch, tmp_path, how):
    """The last checkpoint is the last step, mid-epoch: the resumed run trains no step past the end."""
    config, reference = ends_mid_epoch
    out, flag = tmp_path / "out", tmp_path / "saving"
    proc = start_script(STALL_FINAL_SAVE, tmp_path, config, out, flag, name="final-save")
    wait_for_file(proc, flag)
    if how == "SIGKILL":
        proc.kill()
        proc.wait(timeout=60)
    else:
        send(proc, signal.SIGTERM)
        rc = proc.wait(timeout=60)
        text = log_of(proc)
        assert rc == EXIT_INTERRUPTED, text
        assert "nothing partial was kept" in text and "checkpoint-4" in text and "Traceback" not in text
        assert not (out / ".adapter.tmp").exists()
    rc, text = run(config, out, "--resume", "auto", log_name="resume.log")
    assert rc == 0, text
    assert "step 5" not in text and not (out / ".adapter.tmp").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["steps"] == 4
    assert_same_outputs(out, reference)


SLOW_TRAIN_END = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import ftcore
    from transformers import TrainerCallback

    class SlowEnd:
        name = "slow-end"

        @ftcore.hookimpl
        def ftcore_trainer_callbacks(self, ctx):
            class Wait(TrainerCallback):
                def on_train_end(self, args, state, control, **kwargs):
                    Path(sys.argv[3]).write_text(str(state.global_step))
                    time.sleep(3)
            return [Wait()]

    from ftcore.cli.options import user_errors   # the command's exit statuses
    user_errors(ftcore.run)(sys.argv[1], output_dir=sys.argv[2], plugins=[SlowEnd()])
""")


@pytest.mark.slow
def test_a_second_ctrl_c_after_the_checkpoint_is_saved_still_exits_3(resumable, tmp_path):
    config, reference = resumable
    out, flag = tmp_path / "out", tmp_path / "ending"
    proc = start_script(SLOW_TRAIN_END, tmp_path, config, out, flag, name="ctrl-c")
    wait_for_step(proc, out, 3)
    send(proc, signal.SIGINT)
    wait_for_file(proc, flag)          # the checkpoint is saved; training is winding down
    send(proc, signal.SIGINT)
    rc = proc.wait(timeout=60)
    assert rc == EXIT_INTERRUPTED, log_of(proc)
    assert "already stopping, and the checkpoint is saved" in log_of(proc)
    assert checkpoints.is_complete(checkpoints.newest_complete(out))
