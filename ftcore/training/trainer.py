"""The transformers Trainer a run builds: its arguments, callbacks, optimizer and loss, training with
checkpoints and signals, the final evaluation, the atomic save and the run's metrics."""

from __future__ import annotations

import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcore import runfolder
from ftcore.data.audit import audit_brief
from ftcore.data.prepared import DataStats, PreparedData
from ftcore.errors import ConfigError, Interrupted
from ftcore.reporting.memory import peak_memory
from ftcore.training import checkpoints
from ftcore.types import RunContext


@dataclass
class BuiltTrainer:
    """The trainer and what the engine reads back from around it when training ends."""

    trainer: Any
    counter: Any               # the real, supervised and computed positions trained on (data.batching.TokenCounter)
    samples: dict[str, Any] = field(default_factory=dict)
    early_stopping: Any = None
    tracker_dirs: dict[str, Path] = field(default_factory=dict)
    loss_plan: Any = None        # ftcore.training.loss.LossPlan: how the loss was computed


def pick_precision(precision: str) -> str:
    """The run's precision: auto picks bf16 on a GPU that computes it in hardware (Ampere or newer), fp16 on an
    older GPU, fp32 on a CPU; an explicit choice this machine cannot run is a ConfigError (bf16 on a CPU runs,
    through the CPU's bf16 autocast)."""
    from ftcore.training import devices

    cuda = devices.cuda_available()
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if devices.native_bf16() else "fp16"
    if precision == "fp16" and not cuda:
        raise ConfigError('training.precision "fp16" needs a CUDA GPU and this machine has none: set "bf16" '
                          '(the CPU\'s bf16 autocast; slow on CPUs without bf16 instructions), "fp32", or "auto".')
    if precision == "bf16" and cuda and not devices.native_bf16():
        raise ConfigError(f'training.precision "bf16": this GPU ({devices.device_name()}) has no bf16 in hardware '
                          f'(it came with Ampere), and torch would emulate it several times slower: set "fp16" '
                          f'(or "auto", which picks it here), or "fp32".')
    return precision


def trainable_in_fp32(model: Any, precision: str, log: Callable[[str], None]) -> int:
    """Under fp16 mixed precision, make every trained parameter fp32; return how many were 16-bit.

    The fp16 gradient scaler refuses 16-bit gradients ("Attempting to unscale FP16 gradients"). PEFT keeps
    its adapter weights fp32, but not its trainable copies of whole modules (``modules_to_save``) or a model
    loaded in fp16 (``model.dtype: float16``); the frozen weights stay as loaded.
    """
    import torch

    if precision != "fp16":
        return 0
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
            cast += param.numel()
    if cast:
        log(f"fp16: {cast:,d} trained parameters kept in fp32 for the gradient scaler (autocast computes in fp16)")
    return cast


def log_data_stats(stats: DataStats, log: Callable[[str], None]) -> None:
    src = " (from cache)" if stats.cached else ""
    log(f"data{src}: {stats.records} records, {stats.bad_records} invalid, {stats.train_examples} train / "
        f"{stats.eval_examples} eval examples, {stats.tokens} tokens ({stats.supervised_tokens} supervised), "
        f"{stats.truncated} truncated, {stats.dropped_too_long} dropped as too long, "
        f"{stats.dropped_unsupervised} dropped with nothing supervised, "
        f"packing efficiency {stats.packing_efficiency:.1%}")
    if stats.audit:
        log(f"data audit: {audit_brief(stats.audit)}")
    if stats.preference:
        log("preference data: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.preference.items()))


def log_parameter_counts(model: Any, log: Callable[[str], None]) -> None:
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()   # a weight sharded at construction reports its full size
        if hasattr(p, "quant_state") or p.__class__.__name__ == "Params4bit":
            n *= 2   # 4-bit weights pack two values per byte element
        total += n
        trainable += n if p.requires_grad else 0
    share = 100 * trainable / total if total else 0.0
    log(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


def training_arguments(ctx: RunContext, has_eval: bool) -> dict[str, Any]:
    """The keyword arguments of ``transformers.TrainingArguments`` for the run's settings."""
    t = ctx.config.training
    eval_strategy = t.eval_strategy if has_eval else "no"
    args: dict[str, Any] = dict(
        output_dir=str(ctx.output_dir / runfolder.CHECKPOINTS),
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio if t.warmup_ratio > 0 else 0,   # transformers 5: a float < 1 is a ratio
        weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, logging_first_step=True,
        save_strategy=t.save_strategy, save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy=eval_strategy, eval_steps=t.eval_steps, eval_on_start=has_eval,
        bf16=ctx.precision == "bf16", fp16=ctx.precision == "fp16",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=t.seed, data_seed=t.seed, report_to=t.report_to or "none",
        remove_unused_columns=False, dataloader_pin_memory=False, disable_tqdm=True,
        save_only_model=False,
        prediction_loss_only=True,   # evaluation needs the loss only: never gather the eval set's logits
        run_name=ctx.output_dir.name,
    )
    if t.early_stopping_patience is not None and has_eval:
        args.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return args


def build_trainer(model: Any, prepared: PreparedData, ctx: RunContext) -> BuiltTrainer:
    """The run's trainer: arguments (adjusted by plugins), optimizer (optimizer plugin), callbacks, and the
    trainer itself from the objective plugin (``ftcore_build_trainer``: the bundled ``sft`` by default)."""
    from transformers import PrinterCallback, ProgressCallback, TrainingArguments

    from ftcore.data.batching import TokenCounter
    from ftcore.errors import PluginError
    from ftcore.training import devices
    from ftcore.training.callbacks import run_callbacks
    from ftcore.training.trackers import configure_trainer as configure_trackers

    hook = ctx.plugins.hook
    args = training_arguments(ctx, prepared.eval is not None)
    hook.ftcore_training_arguments(args=args, config=ctx.config, ctx=ctx)
    if args.get("bf16") and not args.get("deepspeed"):
        from transformers.utils import is_torch_bf16_gpu_available

        if not is_torch_bf16_gpu_available():
            args["use_cpu"] = True     # bf16 on a CPU: transformers asks for it to be said
    training_args = TrainingArguments(**args)
    optimizer = hook.ftcore_build_optimizer(model=model, training_args=training_args, config=ctx.config, ctx=ctx)
    counter = TokenCounter()
    made = run_callbacks(ctx, prepared, counter)
    callbacks = list(made.callbacks)
    for extra in hook.ftcore_trainer_callbacks(ctx=ctx):
        callbacks += list(extra or [])
    if not hook.ftcore_build_trainer.get_hookimpls():   # no objective selected: the bundled sft (defaults.yaml)
        from ftcore.registry.selection import fallback

        hook = fallback("objective").hook
    trainer = hook.ftcore_build_trainer(model=model, args=args, training_args=training_args,
                                        train_dataset=prepared.train, eval_dataset=prepared.eval,
                                        callbacks=callbacks, optimizer=optimizer, config=ctx.config, ctx=ctx)
    if trainer is None:
        raise PluginError("no objective plugin built a trainer: select one (sft, dpo, kto) in --plugins.")
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    devices.one_device_per_process(trainer, ctx.log)   # transformers gives a lone process every GPU
    return BuiltTrainer(trainer, counter, made.samples, made.early_stopping,
                        configure_trackers(trainer, ctx.output_dir), getattr(trainer, "ftcore_loss_plan", None))


def supervised_trainer(model: Any, args: Any, train_dataset: Any, eval_dataset: Any,
                       callbacks: list[Any], optimizer: Any, ctx: RunContext) -> Any:
    """The supervised fine-tuning trainer (what the ``sft`` objective returns): a ``transformers.Trainer`` over
    token ids and labels, with ftcore's collator (padding-free packing, flash-attention's boundaries) and, where
    the model allows, the loss computed at supervised positions only (``training.sparse_logits``). ``args``: a
    ``TrainingArguments``, or the dict of its keyword arguments."""
    from transformers import Trainer, TrainingArguments

    from ftcore.data.batching import make_collator
    from ftcore.training import loss, speedups

    collator = make_collator(ctx.config.data.packing, ctx.tokenizer, model, ctx.log)
    plan = loss.choose(model, ctx.config.training)   # plain, sparse, chunked or fused (ftcore.training.loss)
    ctx.log(f"loss: {plan.describe()}")
    trainer_class = Trainer
    if plan.path != "plain":
        trainer_class = speedups.fast_loss_trainer_class()
        trainer_class.loss_plan, trainer_class.sparse_logits = plan, plan.sparse
    if isinstance(args, dict):
        args = TrainingArguments(**args)
    trainer = trainer_class(model=model, args=args, train_dataset=train_dataset,
                            eval_dataset=eval_dataset, data_collator=collator, processing_class=ctx.tokenizer,
                            callbacks=callbacks, optimizers=(optimizer, None))
    trainer.ftcore_loss_plan = plan   # the run's summary records how the loss was computed
    return trainer


def train(built: BuiltTrainer, resume_from: Path | None, ctx: RunContext) -> Any:
    """Train, resuming from a checkpoint if given; a signal saves a checkpoint and raises Interrupted.

    A resumed run continues what the interrupted one wrote: metrics.jsonl is cut back to what it
    held at the checkpoint, counters and the loss sum continue, and the evaluation at the start
    (done by the first attempt) is not repeated. Resuming from a checkpoint of the last step trains
    nothing: the checkpoint's weights and state are loaded and the run goes on to its final steps.
    """
    from ftcore.training.signals import stop_on_signals

    trainer, counter = built.trainer, built.counter
    out = ctx.output_dir
    checkpoints.clean_staging(out)
    checkpoints.install_atomic_saves(trainer, counter)
    checkpoints.install_rng_neutral_evaluation(trainer)
    checkpoints.install_token_counting(trainer, counter)
    if resume_from is not None:
        marker = checkpoints.read_marker(resume_from)
        checkpoints.truncate_metrics(out / runfolder.METRICS, marker)
        checkpoints.restore_counters(trainer, counter, marker)
        # The first attempt evaluated at step 0 already; but a checkpoint saved at the end of an epoch, before
        # that epoch's evaluation (the trainer saves by steps, then evaluates by epoch), owes that evaluation.
        owed = evaluation_owed(trainer, resume_from)
        trainer.args.eval_on_start = owed
        ctx.log(f"resuming from {resume_from} (step {marker.get('step')})")
        if int(marker.get("step", 0)) >= total_steps(trainer):
            return finish_from_checkpoint(trainer, resume_from, owed)
    elif ctx.config.resume:
        (out / runfolder.METRICS).unlink(missing_ok=True)   # a fresh start: no rows from the attempt before
    with stop_on_signals(trainer, ctx.log) as stopper:
        try:
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except pickle.UnpicklingError as exc:   # transformers loads checkpoint state with weights_only=True
            if resume_from is None:
                raise
            raise checkpoints.unsafe_state_error(resume_from, exc) from None
    if stopper.received and stopper.saved_step is not None:
        where = out / runfolder.CHECKPOINTS / f"checkpoint-{stopper.saved_step}"
        raise Interrupted(f"interrupted by {stopper.received} at step {stopper.saved_step} of "
                          f"{trainer.state.max_steps}: a resumable checkpoint is in {where}. Continue with the "
                          f"same command and --resume auto.", checkpoint=str(where), step=stopper.saved_step,
                          signal=stopper.received)
    return output


def total_steps(trainer: Any) -> int:
    """The optimizer steps the run trains in all (what the trainer computes as its max_steps)."""
    import math

    if trainer.args.max_steps > 0:
        return trainer.args.max_steps
    return math.ceil(trainer.args.num_train_epochs * steps_per_epoch(trainer))


def evaluation_owed(trainer: Any, checkpoint: Path) -> bool:
    """Whether the checkpoint was saved at the end of an epoch (or of training, which ends an epoch early)
    before that epoch's evaluation."""
    import json

    strategy = getattr(trainer.args.eval_strategy, "value", trainer.args.eval_strategy)
    if strategy != "epoch" or trainer.eval_dataset is None:
        return False
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    step = int(state.get("global_step", 0))
    per_epoch = steps_per_epoch(trainer)
    if step == 0 or (step % per_epoch and step < total_steps(trainer)):
        return False
    return not any("eval_loss" in row and row.get("step") == step for row in state.get("log_history", []))


def steps_per_epoch(trainer: Any) -> int:
    return max(len(trainer.get_train_dataloader()) // trainer.args.gradient_accumulation_steps, 1)


def finish_from_checkpoint(trainer: Any, checkpoint: Path, owed: bool = False) -> Any:
    """The end of a run whose last step is checkpointed: its weights and state, no training.

    (The trainer itself, resumed at the last step in the middle of an epoch, would train one step
    past the end.) Evaluates when the checkpoint owes the last epoch's evaluation, logs the
    end-of-training row the trainer logs, and calls the callbacks' train begin and end, so
    metrics.jsonl and the report end as they would have.
    """
    import time

    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput, speed_metrics

    started = time.time()
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    events = trainer.callback_handler
    trainer.control = events.on_train_begin(trainer.args, trainer.state, trainer.control)
    if owed:
        trainer.evaluate()   # the epoch's evaluation the checkpoint was saved before
    steps = trainer.state.global_step
    mean = checkpoints.loss_sum(trainer) / max(steps, 1)
    metrics = speed_metrics("train", started, num_samples=0, num_steps=0)
    metrics.update(total_flos=trainer.state.total_flos, train_loss=mean)
    callback = checkpoints.callback_named(trainer, "MetricsCallback")
    if callback is not None:
        callback.loss_before = None   # ``mean`` is the whole run's already
    trainer.log(metrics)
    trainer.control = events.on_train_end(trainer.args, trainer.state, trainer.control)   # e.g. the report's samples
    trainer._ftcore_loss_before = 0.0
    return TrainOutput(steps, mean, metrics)


def final_evaluation(trainer: Any) -> dict[str, Any]:
    """The final eval metrics; reused when training just evaluated the final weights (no second pass)."""
    history = trainer.state.log_history
    step = trainer.state.global_step
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and not best.endswith(f"checkpoint-{step}"):
        return trainer.evaluate()   # the weights now are the best checkpoint's, not the last step's
    for entry in reversed(history):
        if entry.get("step") != step:
            break
        if "eval_loss" in entry:
            return dict(entry)
    return trainer.evaluate()


def save_final(trainer: Any, ctx: RunContext) -> Path:
    """Save the adapter (or full model) with its tokenizer, atomically: written aside, then renamed."""
    model = trainer.model
    name = runfolder.ADAPTER if hasattr(model, "peft_config") else runfolder.MODEL
    final = ctx.output_dir / name
    tmp = ctx.output_dir / f".{name}.tmp"
    if not ctx.is_main_process:
        trainer.save_model(str(tmp))   # every rank takes part (sharded weights are gathered); rank 0 writes
        return final
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        trainer.save_model(str(tmp))
        ctx.tokenizer.save_pretrained(str(tmp))
        # The trainer pickles its arguments next to the weights; a published adapter or model should hold no
        # pickle (config.yaml records the run's settings), so the final outputs leave it out.
        (tmp / "training_args.bin").unlink(missing_ok=True)
    except BaseException as exc:
        error = checkpoints.save_failure(exc, tmp, ctx.output_dir) if isinstance(exc, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)   # never leave a partial model behind
        if error is not None:
            raise error from exc
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def whole_run_loss(trainer: Any, train_output: Any) -> float:
    """The mean training loss over every step of the run, a resumed one included (the trainer's own
    mean covers the steps trained in this process only)."""
    from ftcore.training.callbacks import whole_run_mean

    before = float(getattr(trainer, "_ftcore_loss_before", 0.0))
    if not before:
        return train_output.training_loss
    return whole_run_mean(train_output.training_loss, trainer.state.global_step, before,
                          int(getattr(trainer, "_initial_global_step", 0)))


def summarize(built: BuiltTrainer, train_output: Any, final_eval: dict[str, Any], started: float) -> dict[str, Any]:
    """The run's final metrics: steps, losses, tokens, packing, time, peak memory, early stopping, trackers."""
    trainer, counter = built.trainer, built.counter
    history = trainer.state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    metrics: dict[str, Any] = {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": losses[-1] if losses else None,
        "train_loss_mean": whole_run_loss(trainer, train_output),
        "best_train_loss": min(losses) if losses else None,
        "eval_loss": final_eval.get("eval_loss"),
        "eval_loss_start": evals[0] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "tokens": counter.real,
        "supervised_tokens": counter.supervised,
        "computed_positions": counter.computed,
        "packing_efficiency": (counter.real / counter.computed) if counter.computed else None,
        "runtime_s": round(time.time() - started, 2),
    }
    metrics.update(preference_metrics(history, final_eval))
    metrics.update(peak_memory())
    if built.loss_plan is not None:
        metrics["loss"] = built.loss_plan.as_dict()
    stopper = built.early_stopping
    metrics["stopped_early"] = bool(stopper is not None and stopper.early_stopping_patience_counter
                                    >= stopper.early_stopping_patience)
    if trainer.state.best_model_checkpoint:
        metrics["best_checkpoint"] = trainer.state.best_model_checkpoint
        metrics["best_checkpoint_eval_loss"] = trainer.state.best_metric
    if built.tracker_dirs:
        metrics["tracker_dirs"] = {k: str(v) for k, v in built.tracker_dirs.items()}
    return metrics


PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def preference_metrics(history: list[dict[str, Any]], final_eval: dict[str, Any]) -> dict[str, Any]:
    """A preference objective's reward metrics (TRL logs them): the last training values, and the held-out ones at
    the end and at the start (``eval_rewards/margins_start``), so a summary shows what training changed."""
    out: dict[str, Any] = {}
    for key in PREFERENCE_METRICS:
        logged = [h[key] for h in history if key in h]
        if logged:
            out[key] = logged[-1]
        evals = [h[f"eval_{key}"] for h in history if f"eval_{key}" in h]
        if f"eval_{key}" in final_eval:
            out[f"eval_{key}"] = final_eval[f"eval_{key}"]
        if evals:
            out[f"eval_{key}_start"] = evals[0]
    return out
