"""Trainer callbacks the core always installs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class MetricsCallback(TrainerCallback):
    """Appends every log event (train loss, eval loss, learning rate, tokens) to metrics.jsonl and prints it."""

    def __init__(self, path: Path, counter: Any, log: Callable[[str], None]) -> None:
        self.path = path
        self.counter = counter
        self.log = log
        self.started = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - transformers' signature
        if not state.is_world_process_zero:
            return
        logs = dict(logs or {})
        elapsed = time.time() - self.started
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs,
               "tokens": self.counter.real, "supervised_tokens": self.counter.supervised,
               "computed_positions": self.counter.computed, "elapsed_s": round(elapsed, 3),
               "tokens_per_s": round(self.counter.real / elapsed, 2) if elapsed > 0 else None}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        shown = {k: v for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate", "grad_norm")}
        if shown:
            parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            self.log(f"step {state.global_step} epoch {state.epoch or 0:.2f} {parts}")
