"""Checks across config keys that the schemas alone cannot express; run before anything is loaded.

Kept free of heavy imports: ``ftcore run --dry-run`` runs them without importing transformers.
"""

from __future__ import annotations

from typing import Any

from ftcore.errors import ConfigError


def check_config(config: Any) -> None:
    """Cross-field checks done before anything is loaded: early stopping and trackers."""
    from ftcore.trackers import check_trackers

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
