"""The hooks a plugin can implement: everything needed to write one is on this page.

A plugin is a module or object with functions marked ``@ftcore.hookimpl`` named as below.
ftcore calls every hook with keyword arguments, and an implementation may accept any subset
of them, so adding an argument later breaks no plugin. *first result* hooks stop at the first
plugin that returns something other than None; the others call every selected plugin and
collect their non-None answers in a list.

A plugin's kind is set by the one kind hook it implements (``KIND_HOOKS``); the other hooks
(configuration, lifecycle, adjustments, merging, memory) never decide a kind, so a plugin that
only adjusts the training arguments or adds callbacks is an ``extension`` and runs beside any
strategy. A run uses at most one adapter, optimizer, strategy and objective.

Ranks: in a multi-process run every process ("rank") runs the whole pipeline, so each hook
below runs in every rank unless it says otherwise; ``ctx.is_main_process`` tells rank 0, the
one that writes files. ``ftcore_launch`` runs once, in the process that starts the ranks.

docs/hooks.md documents each hook under a heading with its real signature (a test checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:   # annotations only
    from ftcore.config.schema import PluginConfig, RunConfig
    from ftcore.types import Example, MemoryProfile, ObjectiveProfile, OptimizerProfile, RunContext, RunResult

hookspec = pluggy.HookspecMarker("ftcore")
hookimpl = pluggy.HookimplMarker("ftcore")

# The hook that makes a plugin each kind. A plugin implements at most one of them.
KIND_HOOKS: dict[str, str] = {
    "format": "ftcore_format_record",
    "adapter": "ftcore_load_model",
    "optimizer": "ftcore_build_optimizer",
    "strategy": "ftcore_launch",
    "exporter": "ftcore_export",
    "objective": "ftcore_build_trainer",
}
EXTENSION = "extension"   # the kind of a plugin that implements none of them
SINGLE_KINDS = ("adapter", "optimizer", "strategy", "objective")   # a run uses at most one plugin of each


# -- configuration ----------------------------------------------------------------

@hookspec
def ftcore_config_schema() -> type[PluginConfig] | dict[str, type[PluginConfig]] | None:
    """Declare this plugin's config section: a ``ftcore.PluginConfig`` subclass for the section named after
    the plugin, or ``{"section": Schema, ...}`` to name the sections it owns, or None.

    The one hook without ``ctx``: it is a declaration, read while the configuration is validated,
    before any run (and so any context) exists. Runs in every rank.
    """


# -- dataset format ---------------------------------------------------------------

@hookspec(firstresult=True)
def ftcore_validate_record(record: dict[str, Any], config: RunConfig, ctx: RunContext
                           ) -> list[tuple[str | None, str]] | None:
    """Say what is wrong with one raw record: ``(field, message)`` pairs (field None: the whole record);
    an empty list when it is good. Called on the dataset's format plugin only."""


@hookspec(firstresult=True)
def ftcore_format_record(record: dict[str, Any], tokenizer: Any, config: RunConfig, ctx: RunContext
                         ) -> Example | None:
    """Render one valid record as an ``ftcore.Example``: its text and the character spans to supervise.
    Kind hook: *format*. Called on the dataset's format plugin only."""


@hookspec
def ftcore_prepare_tokenizer(tokenizer: Any, config: RunConfig, ctx: RunContext) -> list[str] | None:
    """Adjust the tokenizer in place before data is tokenized (special tokens, a chat template);
    return the tokens added (the adapter then trains their embedding rows), or None."""


# -- adapter method -----------------------------------------------------------------

@hookspec(firstresult=True)
def ftcore_load_model(model_path: str, tokenizer: Any, config: RunConfig, ctx: RunContext) -> Any:
    """Load the base model from the local folder ``model_path``, wrap it for training (LoRA, QLoRA,
    nothing for full fine-tuning) and return it (a ``torch.nn.Module``). Kind hook: *adapter*."""


@hookspec(firstresult=True)
def ftcore_merge_adapter(adapter_dir: str, base_path: str | None, dtype: str, ctx: RunContext | None) -> Any:
    """Return a plain transformers model: the adapter saved in ``adapter_dir`` merged into its base
    (``base_path``, else the base the adapter names), in ``dtype`` (``"auto"``, ``"float32"``,
    ``"bfloat16"``, ``"float16"``); None when ``adapter_dir`` is not an adapter this plugin made.
    ``ctx`` is None when no run is in progress (``ftcore merge``, ``ftcore generate``)."""


# -- optimizer ------------------------------------------------------------------------

@hookspec(firstresult=True)
def ftcore_build_optimizer(model: Any, training_args: Any, config: RunConfig, ctx: RunContext) -> Any:
    """Return a ``torch.optim.Optimizer`` over the model's trainable parameters, using
    ``training_args`` (``transformers.TrainingArguments``) for the learning rate and betas.
    Kind hook: *optimizer*. None: the trainer's default AdamW."""


# -- strategy ---------------------------------------------------------------------------

@hookspec(firstresult=True)
def ftcore_launch(argv: list[str], config: RunConfig, ctx: RunContext) -> int | None:
    """Start the run's processes (each runs ``python *argv``; they know they are ranks and do not
    launch again), wait for them and return the exit status; None to run in this process.
    Kind hook: *strategy*. Runs once, in the launching process, before any rank exists."""


@hookspec
def ftcore_training_arguments(args: dict[str, Any], config: RunConfig, ctx: RunContext) -> None:
    """Adjust the dict of ``transformers.TrainingArguments`` keyword arguments in place
    (a DeepSpeed config, a tracker's settings, ...). An adjustment: it makes no plugin a strategy."""


# -- objective ---------------------------------------------------------------------------

@hookspec(firstresult=True)
def ftcore_prepare_data(config: RunConfig, tokenizer: Any, ctx: RunContext) -> Any:
    """The objective's own data path: read ``config.data`` (``ftcore.read_datasets`` reads, validates and splits
    records as the supervised path does) and return an ``ftcore.PreparedData`` whose datasets the objective's
    trainer takes; None for the supervised path (format plugins, tokens and labels). Called on every plugin
    until one answers, before the model is loaded."""


@hookspec(firstresult=True)
def ftcore_build_trainer(model: Any, args: dict[str, Any], training_args: Any, train_dataset: Any,
                         eval_dataset: Any, callbacks: list[Any], optimizer: Any, config: RunConfig,
                         ctx: RunContext) -> Any:
    """Build the run's trainer (a ``transformers.Trainer`` or subclass, e.g. TRL's ``DPOTrainer``) for what
    training optimises. ``args`` is the dict of ``TrainingArguments`` keyword arguments, already adjusted by
    every ``ftcore_training_arguments`` (build another arguments class from it, e.g. ``trl.DPOConfig``);
    ``training_args`` the ``transformers.TrainingArguments`` made from it (the optimizer plugin got it);
    ``optimizer`` is the optimizer plugin's (None: the trainer's default); ``callbacks`` must be passed on.
    Kind hook: *objective*. The bundled ``sft`` answers last (``trylast``)."""


# -- exporter ---------------------------------------------------------------------------

@hookspec
def ftcore_export(run_dir: Path, model_dir: Path, config: RunConfig, ctx: RunContext) -> list[Path] | None:
    """Turn a finished run into an artifact and return the paths written. ``model_dir`` is the run's
    adapter or model folder; ``ctx.result`` has the final metrics and data statistics; write to
    ``ctx.export_output`` when it is set (``ftcore export --output``). Kind hook: *exporter*.
    Runs in the main process only, after summary.json is written."""


# -- memory estimate ----------------------------------------------------------------------

@hookspec
def ftcore_memory_profile(config: RunConfig, ctx: RunContext
                          ) -> MemoryProfile | OptimizerProfile | ObjectiveProfile | None:
    """Describe what this plugin keeps in memory, for ``ftcore estimate`` and for strategies that must
    know how the base weights are stored: an adapter method returns a ``ftcore.MemoryProfile``, an
    optimizer a ``ftcore.OptimizerProfile``, an objective a ``ftcore.ObjectiveProfile``."""


# -- lifecycle ----------------------------------------------------------------------------

@hookspec
def ftcore_run_started(config: RunConfig, ctx: RunContext) -> None:
    """The configuration is validated and the output folder exists; nothing is loaded yet. Raise
    ``ftcore.ConfigError`` here to refuse a combination before any work is done."""


@hookspec
def ftcore_data_prepared(train_dataset: Any, eval_dataset: Any, stats: dict[str, Any], ctx: RunContext) -> None:
    """The data is validated, tokenized and split: ``datasets.Dataset`` objects of ``input_ids`` and
    ``labels`` (``eval_dataset`` None without a held-out set), or an objective's own (``ftcore_prepare_data``),
    and a dict of counts."""


@hookspec
def ftcore_model_loaded(model: Any, ctx: RunContext) -> None:
    """The model is ready to train (adapter attached)."""


@hookspec
def ftcore_trainer_callbacks(ctx: RunContext) -> list[Any] | None:
    """Return ``transformers.TrainerCallback`` objects to add to the trainer."""


@hookspec
def ftcore_trainer_created(trainer: Any, ctx: RunContext) -> None:
    """The ``transformers.Trainer`` is built; training starts next."""


@hookspec
def ftcore_run_finished(result: RunResult, ctx: RunContext) -> None:
    """The run succeeded and every file is written: ``result`` is what ``ftcore.run`` returns.
    Runs in the main process only."""
