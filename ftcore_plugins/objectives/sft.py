"""Supervised fine-tuning: the default objective, used when a run names none.

The loss is the causal-LM cross-entropy over the tokens the format plugin supervises, on ftcore's
batches (padding-free packing by default) with the loss computed at supervised positions only. It
answers ``ftcore_build_trainer`` last (``trylast``), so any other objective a run selects is used instead.
"""

from __future__ import annotations

from typing import Any

import ftcore


@ftcore.hookimpl(trylast=True)
def ftcore_build_trainer(model: Any, training_args: Any, train_dataset: Any, eval_dataset: Any,
                         callbacks: list[Any], optimizer: Any, ctx: ftcore.RunContext) -> Any:
    return ftcore.supervised_trainer(model, training_args, train_dataset, eval_dataset, callbacks, optimizer, ctx)
