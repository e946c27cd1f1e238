"""Direct preference optimisation with TRL's DPOTrainer, on records ``{prompt, chosen, rejected}``.

The loss, the reference scoring and the reward metrics (rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies) are TRL's own; ftcore reads and checks the pairs (file, line and field of each problem),
builds the arguments from the run's settings, and hands the trainer its model, optimizer and callbacks.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

import ftcore
from ftcore_plugins.objectives import preference

NAME = "dpo"
KEYS = ("prompt", "chosen", "rejected")


class DpoSettings(preference.ReferenceSettings):
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "exo_pair",
                       "apo_zero", "apo_down", "sigmoid_norm"] = Field(
        "sigmoid", description="TRL's DPO loss: sigmoid (the DPO paper), ipo (IPO: a squared loss that does not "
        "push the margin without bound), hinge (SLiC), robust (noisy labels, with label_smoothing), and TRL's "
        "others.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="The assumed share of pairs whose labels are "
                                   "flipped (conservative DPO with sigmoid, robust DPO with robust); below 0.5.")

    @model_validator(mode="after")
    def _exo_needs_smoothing(self) -> DpoSettings:
        if self.loss_type == "exo_pair" and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing above 0 (the EXO paper uses 1e-3)")
        return self


@ftcore.hookimpl
def ftcore_config_schema():
    return DpoSettings


@ftcore.hookimpl
def ftcore_memory_profile(config: Any) -> ftcore.ObjectiveProfile:
    return preference.memory_profile(NAME, config)


@ftcore.hookimpl
def ftcore_prepare_data(config: Any, tokenizer: Any, ctx: Any) -> ftcore.PreparedData:
    return preference.read(config, tokenizer, ctx, preference.check_pair, KEYS, tokenize)


def tokenize(dataset: Any, tokenizer: Any, config: Any) -> Any:
    from trl import DPOTrainer

    return preference.trl_tokenized(DPOTrainer, dataset, tokenizer, config)


@ftcore.hookimpl
def ftcore_build_trainer(model: Any, args: dict[str, Any], train_dataset: Any, eval_dataset: Any,
                         callbacks: list[Any], optimizer: Any, config: Any, ctx: Any) -> Any:
    from trl import DPOConfig, DPOTrainer

    settings: DpoSettings = config.section(NAME)
    dpo_args = DPOConfig(**preference.trl_arguments(args, config, settings), loss_type=[settings.loss_type],
                         label_smoothing=settings.label_smoothing)
    trainer = preference.ftcore_trainer_class(DPOTrainer)(
        model=model, ref_model=preference.reference_model(model, settings, ctx.precision), args=dpo_args,
        train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=ctx.tokenizer,
        callbacks=callbacks, optimizers=(optimizer, None))
    preference.adapter_disabled_for_reference(trainer, ctx)
    preference.padding_free(trainer, config, ctx)
    return trainer
