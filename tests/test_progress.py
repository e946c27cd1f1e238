"""Progress and logs: plain lines through a callable, JSON lines, quiet, the live display in a terminal, the summary."""

from __future__ import annotations

import json
import os
import re
import resource
import select
import subprocess
import sys

import pytest
from click.testing import CliRunner
from ux_runs import shared_run

from ftcore.cli import main
from ftcore.cli.options import choose_mode
from ftcore.reporting.progress import JsonReporter, QuietReporter, Reporter, RichReporter, make_reporter

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_library_log_callable_gets_plain_lines_and_the_summary(tmp_path_factory, tiny_model_dir):
    result, lines = shared_run(tmp_path_factory, tiny_model_dir)
    text = "\n".join(lines)
    assert "preparing data..." in lines and "training: 10 steps, 2 epochs" in lines
    step_lines = [l for l in lines if re.match(r"step \d+/10 epoch [\d.]+ loss=", l)]
    assert len(step_lines) == 10
    assert all(re.search(r"learning_rate=\S+ .*tok/s=\d+ eta \d+:\d\d", l) for l in step_lines)
    assert any(re.match(r"step \d+/10 epoch [\d.]+ eval_loss=", l) for l in lines)
    # the summary table, last thing logged
    summary = lines[-1]
    for label in ("time", "steps", "tokens seen", "supervised tokens", "train loss (final / best)",
                  "eval loss (final / best)", "packing efficiency", "peak memory", "adapter", "report",
                  "metrics", "tensorboard", "output dir"):
        assert re.search(rf"│ {re.escape(label)}\s+│", summary), label
    m = result.metrics
    assert f"{m['tokens']:,}" in summary and f"{m['supervised_tokens']:,}" in summary
    assert str(result.model_dir) in summary and str(result.report_path) in text


def test_peak_memory_is_measured(tmp_path_factory, tiny_model_dir):
    result, _ = shared_run(tmp_path_factory, tiny_model_dir)
    peak = result.metrics["peak_rss_bytes"]
    assert 50 * 2**20 < peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert result.metrics["peak_cuda_bytes"] is None      # no GPU here; on a GPU, torch's CUDA peak


PARENT = """
import subprocess, sys
held = b"x" * (600 << 20)   # the parent's peak: 600 MiB, resident
child = "import resource; from ftcore.reporting.memory import peak_memory; " \\
        "print(peak_memory()['peak_rss_bytes'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
sys.stdout.write(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux keeps ru_maxrss across exec")
def test_peak_memory_is_the_process_own_not_its_parents():
    """A run started by a larger process reports its own peak, not the parent's carried over exec()."""
    out = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, check=True).stdout.split()
    own, inherited = int(out[0]), int(out[1])
    assert inherited >= 600 << 20              # ru_maxrss: the parent's peak (what the summary used to show)
    assert 5 << 20 < own < 300 << 20, own     # VmHWM: the child's own


def test_modes_from_flags():
    assert choose_mode() == "auto" and choose_mode(no_progress=True) == "plain"
    assert choose_mode(quiet=True) == "quiet" and choose_mode(quiet=True, log_format="json") == "json"
    assert type(make_reporter("plain")) is Reporter and isinstance(make_reporter("json"), JsonReporter)
    assert isinstance(make_reporter("quiet"), QuietReporter) and isinstance(make_reporter("rich"), RichReporter)
    master, slave = os.openpty()
    with open(slave, "w") as tty, open(os.devnull, "w") as pipe:
        assert isinstance(make_reporter("auto", stream=tty), RichReporter)
        assert type(make_reporter("auto", stream=pipe)) is Reporter
    os.close(master)


def test_quiet_flag_prints_warnings_only(tiny_model_dir, alpaca_file, tmp_path):
    res = CliRunner().invoke(main, ["run", "--model", str(tiny_model_dir), "--data", str(alpaca_file), "-o",
                                    str(tmp_path / "o"), "--set", "training.learning_rate=1e-3", "--quiet", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "warning: training.learning_rate=0.001" in res.stderr
    assert res.stderr.strip().count("\n") == 0          # that one warning, nothing else


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftcore.cli", "run", *args]


def test_json_log_format_writes_only_json_lines_on_stdout(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        _cli("--model", str(tiny_model_dir), "--data", str(alpaca_file), "--output", str(out), "--log-format", "json",
             "--set", "training.epochs=1", "--set", "training.gradient_accumulation=1", "--set", "data.val_size=4",
             "--set", "data.max_length=128", "--set", "training.logging_steps=1", "--set", "report.samples=0"),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]     # every line is JSON
    kinds = [e["event"] for e in events]
    first_phase = events[kinds.index("phase_start")]                     # after the licence message
    assert first_phase["phase"] == "preparing data"
    assert all(k == "message" for k in kinds[:kinds.index("phase_start")])
    assert kinds.index("train_start") < kinds.index("train_end") < kinds.index("summary") == len(kinds) - 1
    assert events[kinds.index("train_start")]["total_steps"] == 5
    train_logs = [e for e in events if e["event"] == "log" and "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2, 3, 4, 5]
    assert all({"learning_rate", "tokens_per_s", "eta_s", "epoch"} <= e.keys() for e in train_logs)
    assert any(e["event"] == "message" and e["message"].startswith("trainable params:") for e in events)
    summary = events[-1]
    assert summary["result"]["metrics"]["steps"] == 5 and summary["table"]["steps"].startswith("5")
    assert "trainable params" not in proc.stderr


def _run_in_pty(argv: list[str], timeout: float = 600) -> tuple[int, str]:
    master, slave = os.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="140", LINES="40")
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:      # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_live_display_in_a_terminal(tiny_model_dir, alpaca_file, tmp_path):
    code, screen = _run_in_pty(_cli(
        "--model", str(tiny_model_dir), "--data", str(alpaca_file), "--output", str(tmp_path / "run"),
        "--set", "training.epochs=1", "--set", "training.gradient_accumulation=1", "--set", "data.val_size=4",
        "--set", "data.max_length=128", "--set", "report.samples=0"))
    assert code == 0, screen[-3000:]
    assert "\x1b[?25l" in screen and "\x1b[2K" in screen     # a live display: hidden cursor, redrawn lines
    plain = ANSI.sub("", screen)
    assert re.search(r"preparing data .*1/1 .*done in", plain) and re.search(r"exporting .*1/1 .*done in", plain)
    bar = re.findall(r"training .*?(\d+)/5 +epoch ([\d.]+) · loss ([\d.]+) .*· lr \S+ · (\d+) tok/s .*ETA", plain)
    assert bar and bar[-1][0] == "5" and float(bar[-1][1]) == 1.0
    assert "ftcore run summary" in plain, plain[-3000:]
    assert re.search(r"│ peak memory\s+│ [\d.]+ [KMG]iB RSS", plain), plain[-3000:]   # over 1 GiB in a fresh venv


@pytest.mark.slow
def test_no_progress_in_a_terminal_gives_plain_lines(tiny_model_dir, alpaca_file, tmp_path):
    code, screen = _run_in_pty(_cli(
        "--model", str(tiny_model_dir), "--data", str(alpaca_file), "--output", str(tmp_path / "run"), "--no-progress",
        "--set", "training.epochs=1", "--set", "training.gradient_accumulation=1", "--set", "data.val_size=4",
        "--set", "data.max_length=128", "--set", "training.logging_steps=1", "--set", "report.samples=0"))
    assert code == 0, screen[-3000:]
    assert "\x1b[?25l" not in screen and "\x1b[2K" not in screen      # no live display, though stderr is a terminal
    lines = screen.replace("\r\n", "\n").split("\n")
    assert "preparing data..." in lines and "training: 5 steps, 1 epoch" in lines and "exporting..." in lines
    steps = [l for l in lines if re.match(r"step \d/5 epoch [\d.]+ loss=.* learning_rate=\S+ .*tok/s=\d+ eta ", l)]
    assert len(steps) == 5
    assert any(re.match(r"│ peak memory\s+│", l) for l in lines)           # the summary table, as plain text


def test_json_dry_run_is_one_json_event(tiny_model_dir, alpaca_file, tmp_path):
    res = CliRunner().invoke(main, ["run", "--model", str(tiny_model_dir), "--data", str(alpaca_file), "-o",
                                    str(tmp_path / "o"), "--log-format", "json", "--dry-run"])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert [e["event"] for e in events] == ["dry_run"]
    assert events[0]["config"]["model"]["path"] == str(tiny_model_dir)
    assert {p["name"] for p in events[0]["plugins"]} == {"lora", "alpaca"}
    assert not (tmp_path / "o").exists()
