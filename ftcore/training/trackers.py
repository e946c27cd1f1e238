"""Experiment trackers in a run (``training.report_to``, checked by ``ftcore.config.checks``):
file-based trackers write inside the run's output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def configure_trainer(trainer: Any, output_dir: Path) -> dict[str, Path]:
    """Point the trainer's file-based tracker callbacks into the run's output dir; return those dirs."""
    dirs: dict[str, Path] = {}
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", None) is None:
            cb.logging_dir = str(output_dir / "tensorboard")
            dirs["tensorboard"] = output_dir / "tensorboard"
    return dirs
