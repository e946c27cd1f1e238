"""Experiment trackers through the trainer's own integrations (``training.report_to``).

None of them is a dependency of ftcore: a selected tracker whose package is missing is a
config error that names the package to install, raised before any model is loaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ftcore.errors import ConfigError, suggest

# tracker name -> (modules that provide it, the pip package to install)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "trackio": (("trackio",), "trackio"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
}
NONE = "none"


def check_trackers(names: list[str]) -> list[str]:
    """Validate ``training.report_to``; return the trackers to enable (empty for none)."""
    for name in names:
        if name != NONE and name not in TRACKERS:
            raise ConfigError(f'config key "training.report_to": unknown tracker {name!r}.'
                              f"{suggest(name, [*TRACKERS, NONE])} Choose from {', '.join([*TRACKERS, NONE])}.")
    if NONE in names and len(names) > 1:
        raise ConfigError('config key "training.report_to": "none" cannot be combined with other trackers.')
    chosen = [n for n in names if n != NONE]
    for name in chosen:
        modules, package = TRACKERS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError(f'config key "training.report_to" selects {name}, but its package is not installed: '
                              f"pip install {package}  (or remove {name} from training.report_to).")
    return chosen


def tracker_dirs(output_dir: Path, names: list[str]) -> dict[str, Path]:
    """Where file-based trackers write inside the run's output directory."""
    return {"tensorboard": output_dir / "tensorboard"} if "tensorboard" in names else {}


def configure_trainer(trainer: Any, output_dir: Path) -> dict[str, Path]:
    """Point the trainer's file-based tracker callbacks into the run's output dir; return those dirs."""
    dirs: dict[str, Path] = {}
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", None) is None:
            cb.logging_dir = str(output_dir / "tensorboard")
            dirs["tensorboard"] = output_dir / "tensorboard"
    return dirs
