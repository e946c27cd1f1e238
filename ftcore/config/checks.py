"""Checks across config keys that the schemas alone cannot express; run before anything is loaded.

Kept free of heavy imports: ``ftcore run --dry-run`` runs them without importing transformers.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ftcore.errors import ConfigError, DataError, suggest

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
    """Cross-field checks done before anything is loaded: resume, early stopping and trackers."""
    if config.resume and config.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --overwrite deletes the checkpoints "
                          "--resume would continue from. Pass one of them.")
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


def resolve_format(spec: Any, format_plugins: list[str]) -> str:
    """The format plugin a dataset is read with: its own ``format:``, else the run's only format plugin."""
    if spec.format:
        return spec.format
    if len(format_plugins) == 1:
        return format_plugins[0]
    if not format_plugins:
        raise DataError("no dataset format plugin is selected: add one to --plugins (e.g. alpaca or chatml).")
    raise DataError(f"dataset {spec.path} does not say its format and several format plugins are selected "
                    f"({' and '.join(format_plugins)}): set format: in its data.datasets entry.")


def check_dataset_formats(config: Any, format_plugins: list[str]) -> None:
    """Every dataset has exactly one format plugin of the run (checked before anything is loaded)."""
    for spec in [*config.data.datasets, *config.data.eval_datasets]:
        fmt = resolve_format(spec, format_plugins)
        if fmt not in format_plugins:
            raise DataError(f"dataset {spec.path} asks for format {fmt!r}, which is not a format plugin of this "
                            f"run (selected formats: {', '.join(format_plugins) or 'none'}).")

