"""Checks across config keys that the schemas alone cannot express; run before anything is loaded.

Kept free of heavy imports: ``ftcore run --dry-run`` runs them without importing transformers.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ftcore.errors import ConfigError, suggest

# Experiment trackers (``training.report_to``), through the trainer's own integrations:
# tracker name -> (modules that provide it, the pip package to install). None is a dependency of ftcore.
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "trackio": (("trackio",), "trackio"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
}
NO_TRACKER = "none"


def check_config(config: Any) -> None:
    """Cross-field checks done before anything is loaded: early stopping and trackers."""
    t = config.training
    check_trackers(t.report_to)
    if t.early_stopping_patience is None:
        return
    if t.eval_strategy == "no":
        raise ConfigError("training.early_stopping_patience needs evaluations: set training.eval_strategy to "
                          "steps or epoch (and keep a held-out set: data.val_size > 0 or data.eval_datasets).")
    if config.data.val_size <= 0 and not config.data.eval_datasets:
        raise ConfigError("training.early_stopping_patience needs a held-out set to evaluate on: set "
                          "data.val_size > 0 or give data.eval_datasets.")
    if t.save_strategy != t.eval_strategy:
        raise ConfigError(f"training.early_stopping_patience keeps the best checkpoint, so checkpoints must be saved "
                          f"where evaluations happen: training.save_strategy is {t.save_strategy!r} but "
                          f"training.eval_strategy is {t.eval_strategy!r}; set both to {t.eval_strategy!r}.")
    if t.save_strategy == "steps" and t.save_steps % (t.eval_steps or t.logging_steps):
        raise ConfigError(f"training.early_stopping_patience: training.save_steps ({t.save_steps}) must be a multiple "
                          f"of training.eval_steps ({t.eval_steps}); e.g. set training.save_steps: {t.eval_steps}.")


def check_trackers(names: list[str]) -> list[str]:
    """Validate ``training.report_to``; return the trackers to enable (empty for none).

    A selected tracker whose package is missing is an error naming the package to install.
    """
    for name in names:
        if name != NO_TRACKER and name not in TRACKERS:
            raise ConfigError(f'config key "training.report_to": unknown tracker {name!r}.'
                              f"{suggest(name, [*TRACKERS, NO_TRACKER])} Choose from {', '.join([*TRACKERS, NO_TRACKER])}.")
    if NO_TRACKER in names and len(names) > 1:
        raise ConfigError('config key "training.report_to": "none" cannot be combined with other trackers.')
    chosen = [n for n in names if n != NO_TRACKER]
    for name in chosen:
        modules, package = TRACKERS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError(f'config key "training.report_to" selects {name}, but its package is not installed: '
                              f"pip install {package}  (or remove {name} from training.report_to).")
    return chosen
