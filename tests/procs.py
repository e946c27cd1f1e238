"""Helpers for the reliability tests: real `ftcore run` processes that are killed, signalled and resumed.

The runs are tiny (12 optimizer steps over 2 epochs, a checkpoint every 2 steps) and
log every step, so metrics.jsonl holds the per-step losses that a resumed run must
reproduce.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

STEPS = 12
SAVE_STEPS = 2


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"       # same numerics in every process, less contention on small machines
    e["PYTHONUNBUFFERED"] = "1"
    return e


def write_config(folder: Path, model_dir: Path, data: Path, **training) -> Path:
    t = {"epochs": 2, "batch_size": 2, "gradient_accumulation": 1, "logging_steps": 1,
         "save_strategy": "steps", "save_steps": SAVE_STEPS, "seed": 7}
    t.update(training)
    cfg = {"plugins": ["lora", "alpaca"], "model": str(model_dir),
           "data": {"datasets": [str(data)], "max_length": 96, "val_size": 4}, "training": t}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, out: Path, *extra: str, log_name: str = "run.log") -> subprocess.Popen:
    """Start `ftcore run` in a new process; its output goes to a log file next to the output dir."""
    path = out.parent / f"{out.name}.{log_name}"
    with open(path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftcore.cli", "run", str(config), "--output", str(out), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env())
    proc.log_path = path
    return proc


def log_of(proc: subprocess.Popen) -> str:
    path = getattr(proc, "log_path", None)
    return path.read_text() if path and path.exists() else ""


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    return rc, log_of(proc)


def run(config: Path, out: Path, *extra: str, log_name: str = "run.log") -> tuple[int, str]:
    return finish(start(config, out, *extra, log_name=log_name))


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            pass   # a line being written
    return found


def losses(out: Path) -> dict[int, dict]:
    """Per-step training rows (loss, grad_norm, learning_rate) by step; a step logged twice fails."""
    by_step: dict[int, dict] = {}
    for r in rows(out):
        if "loss" in r:
            assert r["step"] not in by_step, f"step {r['step']} logged twice in {out}/metrics.jsonl"
            by_step[r["step"]] = r
    return by_step


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> int:
    """Wait until metrics.jsonl shows a logged loss at ``step`` or later; return that step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen = [r["step"] for r in rows(out) if "loss" in r]
        if seen and max(seen) >= step:
            return max(seen)
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before step {step}:\n{log_of(proc)}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s:\n{log_of(proc)}")


def wait_for_file(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {path} appeared:\n{log_of(proc)}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{path} did not appear in {timeout}s")


def assert_same_training(resumed: Path, reference: Path) -> None:
    """Every step's loss, grad norm and learning rate, and the final adapter, match the uninterrupted run."""
    got, want = losses(resumed), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, len(want) + 1))
    for step in want:
        for key in ("loss", "grad_norm", "learning_rate"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-7), (step, key)
    from safetensors.torch import load_file

    a = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k


def send(proc: subprocess.Popen, sig: signal.Signals) -> None:
    os.kill(proc.pid, sig)


def records() -> list[dict]:
    return [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": f"{a} plus {a + 1} is {2 * a + 1}."}
            for a in range(16)]


@pytest.fixture(scope="session")
def resumable(tmp_path_factory, tiny_model_dir):
    """The config of a small resumable run and its uninterrupted reference output."""
    folder = tmp_path_factory.mktemp("resumable")
    data = write_jsonl(folder / "train.jsonl", records())
    config = write_config(folder, tiny_model_dir, data)
    reference = folder / "reference"
    rc, log = run(config, reference)
    assert rc == 0, log
    assert sorted(losses(reference)) == list(range(1, STEPS + 1))
    return config, reference


def start_script(script_text: str, folder: Path, *args: str, name: str = "script") -> subprocess.Popen:
    """Run a Python script (a run with plugin objects of the test's own) in a new process, logged to a file."""
    script = folder / f"{name}.py"
    script.write_text(script_text)
    path = folder / f"{name}.log"
    with open(path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=log,
                                stderr=subprocess.STDOUT, env=env())
    proc.log_path = path
    return proc


TIMING_KEYS = {"elapsed_s", "tokens_per_s", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
               "eval_model_preparation_time"}   # the trainer times its first evaluation's model preparation
# Summary figures that describe the process, not the result: how long it took and how much memory it peaked at,
# and whether the tokenized data came from the cache (a resumed run's always does).
PROCESS_KEYS = {"runtime_s", "peak_rss_bytes", "peak_cuda_bytes", "cached"}


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-4, abs=1e-7)
    return a == b


def assert_same_outputs(resumed: Path, reference: Path) -> None:
    """The final files of a resumed run equal the uninterrupted run's, timings aside: every row of
    metrics.jsonl (losses to float rounding of resumed sums: rel 1e-4, as assert_same_training), the
    adapter, summary.json's metrics and data statistics, and the report's samples and data tables."""
    assert_same_training(resumed, reference)
    got, want = rows(resumed), rows(reference)
    assert [sorted(set(r) - TIMING_KEYS) for r in got] == [sorted(set(r) - TIMING_KEYS) for r in want], \
        "metrics.jsonl rows differ in their keys"
    for g, w in zip(got, want):
        for key in set(w) - TIMING_KEYS:
            assert _close(g[key], w[key]), (w.get("step"), key, g[key], w[key])
    a, b = (json.loads((d / "summary.json").read_text()) for d in (resumed, reference))
    for section in ("metrics", "data_stats"):
        assert set(a[section]) == set(b[section])
        for key in set(b[section]) - PROCESS_KEYS:
            if key in ("best_checkpoint",):
                assert Path(a[section][key]).name == Path(b[section][key]).name
                continue
            assert _close(a[section][key], b[section][key]), (section, key, a[section][key], b[section][key])
    assert a["exit_code"] == b["exit_code"] == 0 and a["export_errors"] == b["export_errors"]
    assert _report_tables(resumed) == _report_tables(reference)


def _report_tables(out: Path) -> list[str]:
    """The report's sample rows and its data table, as text (the timed summary table left out)."""
    import re

    page = (out / "report.html").read_text()
    samples = re.findall(r'<tr class="sample-row">.*?</tr>', page, re.S)
    data = re.search(r'<h2 id="data">Data</h2>(.*?)<h2', page, re.S).group(1)
    data = re.sub(r"<tr><td>cached</td><td>\w+</td></tr>", "", data)
    return [*samples, data]
