"""The hooks a plugin can implement. Each has one docstring; docs/hooks.md mirrors them.

A plugin is any module or object with functions marked ``@ftcore.hookimpl`` whose
names are below. Its *kind* follows from what it implements:

- format     implements ``ftcore_format_record``
- adapter    implements ``ftcore_load_model``
- optimizer  implements ``ftcore_build_optimizer``
- strategy   implements ``ftcore_training_arguments`` or ``ftcore_launch``
- exporter   implements ``ftcore_export``
- extension  anything else (lifecycle hooks only)

Hooks are always called with keyword arguments; an implementation may accept any
subset of them, so adding an argument later breaks no plugin.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("ftcore")
hookimpl = pluggy.HookimplMarker("ftcore")


# -- configuration -----------------------------------------------------------

@hookspec
def ftcore_config_schema():
    """Return a pydantic model class for this plugin's config section (named after the plugin), or None."""


# -- dataset format ----------------------------------------------------------

@hookspec(firstresult=True)
def ftcore_validate_record(record, config):
    """Return a list of problems with one raw record as ``(field, message)`` pairs; empty when it is good."""


@hookspec(firstresult=True)
def ftcore_format_record(record, tokenizer, config):
    """Render one valid raw record as an ``ftcore.Example``: its text and the character spans to supervise."""


@hookspec
def ftcore_prepare_tokenizer(tokenizer, config):
    """Adjust the tokenizer before data is tokenized (add special tokens, a chat template); return the added tokens or None."""


# -- adapter method ----------------------------------------------------------

@hookspec(firstresult=True)
def ftcore_load_model(model_path, tokenizer, config, ctx):
    """Load the base model, wrap it for training (LoRA, QLoRA, nothing) and return it."""


@hookspec(firstresult=True)
def ftcore_merge_adapter(adapter_dir, base_path, dtype, ctx):
    """Return a plain transformers model with the trained adapter in ``adapter_dir`` merged into its base, or None if not an adapter of this plugin."""


# -- optimizer ---------------------------------------------------------------

@hookspec(firstresult=True)
def ftcore_build_optimizer(model, training_args, config):
    """Return a ``torch.optim.Optimizer`` for the model's trainable parameters (None: the trainer's default AdamW)."""


# -- strategy ----------------------------------------------------------------

@hookspec
def ftcore_training_arguments(args, config, ctx):
    """Adjust the dict of ``transformers.TrainingArguments`` keyword arguments in place (DeepSpeed config, ...)."""


@hookspec(firstresult=True)
def ftcore_launch(argv, config, ctx):
    """Start the run's processes (each runs ``python *argv``), wait, and return the exit status; None: run here."""


# -- exporter ----------------------------------------------------------------

@hookspec
def ftcore_export(run_dir, model_dir, config, ctx):
    """Turn the finished run into an artifact; return the list of paths written (in rank 0 only when multi-process)."""


# -- memory estimate ---------------------------------------------------------

@hookspec
def ftcore_memory_profile(config):
    """Describe what this plugin keeps in memory for ``ftcore estimate``: an ``ftcore.MemoryProfile`` (an adapter method), an ``ftcore.OptimizerProfile`` (an optimizer), or None."""


# -- lifecycle ---------------------------------------------------------------

@hookspec
def ftcore_run_started(config, ctx):
    """Called once the configuration is validated and the output directory exists."""


@hookspec
def ftcore_data_prepared(train_dataset, eval_dataset, stats, ctx):
    """Called after the data is validated, tokenized and split; ``stats`` is a dict of counts."""


@hookspec
def ftcore_model_loaded(model, ctx):
    """Called with the model ready to train (adapter attached)."""


@hookspec
def ftcore_trainer_callbacks(ctx):
    """Return a list of ``transformers.TrainerCallback`` objects to add to the trainer."""


@hookspec
def ftcore_trainer_created(trainer, ctx):
    """Called with the trainer just before training starts."""


@hookspec
def ftcore_run_finished(result, ctx):
    """Called at the end of a successful run with the ``ftcore.RunResult`` (in rank 0 only when multi-process)."""
