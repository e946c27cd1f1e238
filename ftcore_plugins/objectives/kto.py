"""Kahneman-Tversky optimisation with TRL's KTOTrainer, on records ``{prompt, completion, label}``: each
completion judged desirable (true) or undesirable (false) on its own, no pairs needed.

The loss, the KL estimate and the reward metrics are TRL's own; ftcore reads and checks the records and builds
the trainer as for ``dpo``. KTO estimates its KL term from the other completions of a batch: batch_size >= 2.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

import ftcore
from ftcore_plugins.objectives import preference

NAME = "kto"
KEYS = ("prompt", "completion", "label")


class KtoSettings(preference.ReferenceSettings):
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the desirable completions' loss; with "
                                    "fewer desirable than undesirable records, raise it so that weight x count "
                                    "is about the same on both sides (TRL warns when it is far off).")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the undesirable completions' loss.")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="kto (the KTO paper) or "
                                                           "apo_zero_unpaired (anchored, no KL term).")


@ftcore.hookimpl
def ftcore_config_schema():
    return KtoSettings


@ftcore.hookimpl
def ftcore_run_started(config: Any, ctx: Any) -> None:
    settings: KtoSettings = config.section(NAME)
    if settings.loss_type == "kto" and config.training.batch_size < 2:
        raise ftcore.ConfigError("kto estimates its KL term from the other completions of a batch, and "
                                 "training.batch_size is 1: set training.batch_size to 2 or more.")


@ftcore.hookimpl
def ftcore_memory_profile(config: Any) -> ftcore.ObjectiveProfile:
    return preference.memory_profile(NAME, config)


@ftcore.hookimpl
def ftcore_prepare_data(config: Any, tokenizer: Any, ctx: Any) -> ftcore.PreparedData:
    return preference.read(config, tokenizer, ctx, preference.check_unpaired, KEYS, tokenize)


def tokenize(dataset: Any, tokenizer: Any, config: Any) -> Any:
    from trl import KTOTrainer

    return preference.trl_tokenized(KTOTrainer, dataset, tokenizer, config, calculate_KL=False)


@ftcore.hookimpl
def ftcore_build_trainer(model: Any, args: dict[str, Any], train_dataset: Any, eval_dataset: Any,
                         callbacks: list[Any], optimizer: Any, config: Any, ctx: Any) -> Any:
    from trl import KTOConfig, KTOTrainer

    settings: KtoSettings = config.section(NAME)
    kto_args = KTOConfig(**preference.trl_arguments(args, config, settings), loss_type=settings.loss_type,
                         desirable_weight=settings.desirable_weight, undesirable_weight=settings.undesirable_weight,
                         train_sampling_strategy="sequential")   # ftcore shuffled the records; TRL pairs neighbours
    trainer = preference.ftcore_trainer_class(KTOTrainer)(
        model=model, ref_model=preference.reference_model(model, settings, ctx.precision), args=kto_args,
        train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=ctx.tokenizer,
        callbacks=callbacks, optimizers=(optimizer, None))
    preference.adapter_disabled_for_reference(trainer, ctx)
    preference.padding_free(trainer, config, ctx)
    return trainer
