"""One small run shared by the UX tests (report, trackers, progress, generate): built once per session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import tiny_config, write_jsonl

import ftcore

_CACHE: dict[str, Any] = {}


def shared_run(tmp_path_factory: Any, model_dir: Path) -> tuple[Any, list[str]]:
    """A 10-step LoRA run with TensorBoard, evaluations every 2 steps, a report with 2 samples.

    Logs go through a plain callable (the library path); returns ``(RunResult, lines)``.
    """
    if "run" not in _CACHE:
        root = tmp_path_factory.mktemp("ux-run")
        records = [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": str(2 * a + 1)} for a in range(24)]
        data = write_jsonl(root / "train.jsonl", records)
        config = tiny_config(model_dir, data, root / "out", epochs=2, report_to=["tensorboard"],
                             eval_strategy="steps", eval_steps=2)
        config["report"] = {"samples": 2, "max_new_tokens": 6}
        lines: list[str] = []
        result = ftcore.run(config, log=lines.append)
        _CACHE["run"] = (result, lines)
    return _CACHE["run"]


def metric_rows(result: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
