"""The run pipeline. It calls hooks; it never names a plugin.

    resolve config + plugins -> validate -> output dir -> tokenizer -> data (format hooks)
    -> model (adapter hook) -> optimizer (optimizer hook) -> trainer (strategy hooks,
    callbacks) -> train + evaluate -> save -> exporters -> run_finished
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftcore import checkpoints
from ftcore import config as cfg
from ftcore import data as data_mod
from ftcore.errors import ConfigError, FtcoreError, Interrupted, PluginError
from ftcore.licence import base_model_licence
from ftcore.licence import describe as describe_licence
from ftcore.outputs import OutputGuard
from ftcore import report
from ftcore.checks import check_config
from ftcore.plugins import PluginSet, installed_entry_points, select
from ftcore.progress import as_reporter
from ftcore.trackers import configure_trainer as configure_trackers

RUN_MARKER = "ftcore-run.json"
LR_WARN = 5e-4


@dataclass
class RunContext:
    """What hooks get as ``ctx``: the validated config, the plugins, paths and a logger."""

    config: cfg.RunConfig
    plugins: PluginSet
    output_dir: Path
    log: Callable[[str], None] = print
    tokenizer: Any = None
    added_tokens: list[str] = field(default_factory=list)
    precision: str = "fp32"
    state: dict[str, Any] = field(default_factory=dict)   # free space for plugins

    def section(self, name: str) -> Any:
        return self.config.section(name)


@dataclass
class RunResult:
    """What ``ftcore.run`` returns: where things were written and how training went."""

    output_dir: Path
    model_dir: Path | None = None
    config_path: Path | None = None
    metrics_path: Path | None = None
    report_path: Path | None = None
    exports: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    data_stats: dict[str, Any] = field(default_factory=dict)
    plugins: list[dict[str, Any]] = field(default_factory=list)
    base_model_license: dict[str, Any] | None = None
    dry_run: bool = False
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for k in ("output_dir", "model_dir", "config_path", "metrics_path", "report_path"):
            out[k] = str(out[k]) if out[k] is not None else None
        out["exports"] = [str(p) for p in self.exports]
        return out


# -- resolution --------------------------------------------------------------------

def resolve(source: Any = None, flags: dict[str, Any] | None = None,
            plugin_objects: list[Any] | tuple = (), log: Callable[[str], None] = print
            ) -> tuple[cfg.RunConfig, PluginSet]:
    """Layer, select plugins and validate: everything short of loading a model or data."""
    if isinstance(source, cfg.RunConfig):
        source = source.to_dict()
    raw = cfg.layer(source, flags)
    names = raw.get("plugins") or []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f'config key "plugins": expected a list of plugin names, got {names!r}.')
    raw["plugins"] = names
    plugins = select(names, plugin_objects, _dataset_formats(raw))
    schemas = plugin_schemas(plugins)
    config = cfg.validate(raw, schemas, list(installed_entry_points()))
    config.plugins = plugins.names()
    check_config(config)   # early stopping and trackers
    if config.training.learning_rate > LR_WARN:
        log(f"warning: training.learning_rate={config.training.learning_rate:g} is above {LR_WARN:g}, "
            f"a known way to ruin a fine-tune; 1e-4 to 2e-4 is the usual range for LoRA.")
    return config, plugins


def _dataset_formats(raw: dict[str, Any]) -> list[str]:
    data = raw.get("data") or {}
    found = []
    if isinstance(data, dict):
        for key in ("datasets", "eval_datasets"):
            specs = data.get(key) or []
            specs = specs if isinstance(specs, list) else [specs]
            found += [s["format"] for s in specs if isinstance(s, dict) and isinstance(s.get("format"), str)]
    return found


def plugin_schemas(plugins: PluginSet) -> dict[str, type]:
    """Each config section the plugins own, with the pydantic schema that validates it."""
    schemas: dict[str, type] = {}
    for name in plugins.names():
        found = plugins.call_one(name, "ftcore_config_schema")
        for got in found or []:
            if got is None:
                continue
            sections = got if isinstance(got, dict) else {name: got}
            for section, schema in sections.items():
                schemas.setdefault(section, schema)
    return schemas


# -- the run -------------------------------------------------------------------------

def run(source: Any = None, *, flags: dict[str, Any] | None = None, plugins: list[Any] | tuple = (),
        dry_run: bool = False, log: Callable[[str], None] | None = None, **overrides: Any) -> RunResult:
    """Run a fine-tune. ``source`` is a config dict, a YAML path or a RunConfig.

    ``plugins`` are plugin objects (modules or instances with hook implementations)
    used in addition to those named in the config. Keyword ``overrides`` are merged on
    top as a flags layer, e.g. ``run("cfg.yaml", output_dir="out")``.
    """
    with as_reporter(log) as log:   # a callable, a Reporter, or None: automatic progress display
        flags = cfg.merge(flags or {}, overrides)
        config, plugin_set = resolve(source, flags, plugins, log)
        if dry_run:
            return RunResult(output_dir=Path(config.output_dir), plugins=plugin_set.versions(), dry_run=True)
        return execute(config, plugin_set, log)


def execute(config: cfg.RunConfig, plugins: PluginSet, log: Callable[[str], None] = print) -> RunResult:
    guard = OutputGuard(Path(config.output_dir))
    try:
        return _execute(config, plugins, log, guard)
    except BaseException:
        guard.undo()   # a run that fails before training leaves the output directory as it found it
        raise


def _execute(config: cfg.RunConfig, plugins: PluginSet, log: Callable[[str], None], guard: OutputGuard
             ) -> RunResult:
    from ftcore._quiet import quiet_libraries
    from ftcore.models import resolve_model_path

    status = launch(config, plugins, log)
    if status is not None:
        return launched_result(config, plugins, status)
    quiet_libraries()
    log = as_reporter(log)
    started = time.time()
    main = is_main_process()
    log = log if main or world_size() == 1 else as_reporter(_rank_prefixed(log))
    model_path = resolve_model_path(config.model.path, log)
    licence = base_model_licence(model_path)
    log(describe_licence(licence, model_path))
    out = Path(config.output_dir)
    resume_from = checkpoints.resolve_resume(config.resume, out, config.overwrite, log) if config.resume else None
    for change in checkpoints.config_changes(resume_from, config) if resume_from else []:
        log(f"warning: resuming with a changed configuration: {change}")
    precision = pick_precision(config.training.precision)
    if main:
        out = prepare_output_dir(out, config.overwrite, resuming=config.resume is not None, guard=guard)
    ctx = RunContext(config=config, plugins=plugins, output_dir=out, log=log)
    ctx.precision = precision
    ctx.state["base_model_license"] = licence
    result = RunResult(output_dir=out, plugins=plugins.versions(), base_model_license=licence)
    result.config_path = write_run_files(ctx) if main else out / "config.yaml"
    hook = plugins.hook
    hook.ftcore_run_started(config=config, ctx=ctx)

    ctx.tokenizer = load_tokenizer(model_path, config)
    for added in hook.ftcore_prepare_tokenizer(tokenizer=ctx.tokenizer, config=config):
        ctx.added_tokens += list(added or [])
    with log.phase("preparing data"):
        prepared = data_mod.prepare(config, plugins, ctx.tokenizer, log)
    result.data_stats = prepared.stats.as_dict()
    log_data_stats(prepared.stats, log)
    hook.ftcore_data_prepared(train_dataset=prepared.train, eval_dataset=prepared.eval,
                              stats=result.data_stats, ctx=ctx)

    from transformers import set_seed

    set_seed(config.training.seed)   # adapter initialisation is part of the run's reproducibility
    model = hook.ftcore_load_model(model_path=str(model_path), tokenizer=ctx.tokenizer, config=config, ctx=ctx)
    if model is None:
        raise PluginError("no adapter plugin loaded a model: select one (lora, qlora, full) in --plugins.")
    log_parameter_counts(model, log)
    hook.ftcore_model_loaded(model=model, ctx=ctx)

    from ftcore import speedups

    attention = speedups.apply(model, config, log)
    trainer, collator = build_trainer(model, prepared, ctx)
    hook.ftcore_trainer_created(trainer=trainer, ctx=ctx)
    guard.commit()
    try:
        train_output = train(trainer, collator, resume_from, ctx)
        final_eval = final_evaluation(trainer) if prepared.eval is not None else {}
        speedups.restore(model, attention)
        model_dir = save_final(trainer, ctx)
    except (OSError, RuntimeError) as exc:
        full = checkpoints.disk_full(exc)
        if full is None:
            raise
        raise checkpoints.disk_full_error(full, out) from exc
    result.model_dir = model_dir
    result.metrics_path = out / "metrics.jsonl"
    result.metrics = summarize(trainer, train_output, final_eval, collator, started)
    result.metrics.update(report.run_metrics(trainer, ctx))
    if not main:   # in a multi-process run only rank 0 writes outputs and exports
        return result
    with log.phase("exporting"):
        for paths in hook.ftcore_export(run_dir=out, model_dir=model_dir, config=config, ctx=ctx):
            result.exports += [Path(p) for p in paths or []]
    result.report_path = report.write_report(result, ctx) if config.report.enabled else None
    write_json_atomic(out / "summary.json", result.as_dict())
    hook.ftcore_run_finished(result=result, ctx=ctx)
    log.summary(result)
    return result


# -- processes ---------------------------------------------------------------------

def in_launched_rank() -> bool:
    """True inside a process a per-process launcher started (torchrun, deepspeed, accelerate set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a multi-process run (or the only process): the one that writes the run's outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def leave_process_group() -> None:
    """End this process's membership of its process group, just before the process exits.

    Left to the interpreter's teardown, the group's communication threads are torn down with
    the C++ libraries' static objects, the likeliest cause of a finished rank that once aborted
    there ("terminate called without an active exception"; its launcher then reports a failed
    run). Called by ``ftcore run`` (the command each launched rank runs), not by the library: an
    application that calls ``ftcore.run`` in its own ranks keeps its process group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_worker_rank(status: int) -> None:
    """Exit a launched rank other than rank 0 as soon as its part of the run is done.

    Such a rank writes nothing and reports nothing, so nothing of the run waits on the
    interpreter's teardown, where C++ libraries' static destructors once aborted a rank that
    had finished (SIGABRT, reported by the launcher as a failed run). Its output is flushed
    first. Rank 0 and single-process runs exit normally (trackers finish in atexit handlers).
    """
    if not in_launched_rank() or is_main_process():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _rank_prefixed(log: Callable[[str], None]) -> Callable[[str], None]:
    prefix = f"[rank {os.environ.get('RANK', '?')}] "
    return lambda message: log(prefix + message)


def launch(config: cfg.RunConfig, plugins: PluginSet, log: Callable[[str], None]) -> int | None:
    """Let a strategy plugin start the run's ranks; return their exit status, or None to run here.

    Each rank runs ``python -m ftcore.cli run <resolved config>`` with the launcher's
    environment, so ranks never launch again (see ``in_launched_rank``).
    """
    if in_launched_rank():
        return None
    if not plugins.hook.ftcore_launch.get_hookimpls():
        if config.launch.num_processes > 1 or config.launch.num_machines > 1:
            raise ConfigError(f"launch.num_processes={config.launch.num_processes} / launch.num_machines="
                              f"{config.launch.num_machines} needs a strategy plugin that launches processes, "
                              f"and none of the selected plugins does. Add one to --plugins (`ftcore plugins` "
                              f"lists the strategy plugins), or run with one process.")
        return None
    installed = installed_entry_points()
    passed = [n for n in plugins.names() if n not in installed]
    if passed:
        raise PluginError(f"plugin(s) {', '.join(passed)} were passed as objects, but a launched run starts new "
                          f"processes that load plugins by entry point only. Install them as packages with an "
                          f"entry point in the 'ftcore.plugins' group, or run without a launching strategy.")
    out = Path(config.output_dir)
    if config.launch.machine_rank == 0:
        check_output_dir(out, config.overwrite, config.resume is not None)    # refuse before any process starts
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.launch-", suffix=".yaml", dir=out.parent.absolute())
    launch_file = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("# Written by ftcore for the processes of one launched run; removed when it ends.\n")
            yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
        ctx = RunContext(config=config, plugins=plugins, output_dir=out, log=log)
        argv = ["-m", "ftcore.cli", "run", str(launch_file)]
        return plugins.hook.ftcore_launch(argv=argv, config=config, ctx=ctx)
    finally:
        launch_file.unlink(missing_ok=True)


def launched_result(config: cfg.RunConfig, plugins: PluginSet, status: int) -> RunResult:
    """The RunResult of a launched run, read back from the summary rank 0 wrote."""
    out = Path(config.output_dir)
    result = RunResult(output_dir=out, plugins=plugins.versions(), exit_code=status)
    summary = out / "summary.json"
    if status == 0 and summary.is_file():
        data = json.loads(summary.read_text(encoding="utf-8"))
        for key in ("model_dir", "config_path", "metrics_path"):
            setattr(result, key, Path(data[key]) if data.get(key) else None)
        result.exports = [Path(p) for p in data.get("exports", [])]
        result.metrics = data.get("metrics", {})
        result.data_stats = data.get("data_stats", {})
    return result


def train(trainer: Any, collator: Any, resume_from: Path | None, ctx: RunContext) -> Any:
    """Train, resuming from a checkpoint if given; a signal saves a checkpoint and raises Interrupted."""
    from ftcore.signals import stop_on_signals

    out = ctx.output_dir
    checkpoints.clean_staging(out)
    checkpoints.install_atomic_saves(trainer, collator.counter)
    checkpoints.install_rng_neutral_evaluation(trainer)
    if resume_from is not None:
        marker = checkpoints.read_marker(resume_from)
        checkpoints.trim_metrics(out / "metrics.jsonl", int(marker.get("step", 0)))
        checkpoints.restore_counters(trainer, collator.counter, marker)
        ctx.log(f"resuming from {resume_from} (step {marker.get('step')})")
    elif ctx.config.resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)   # a fresh start: no rows from the attempt before
    with stop_on_signals(trainer, ctx.log) as stopper:
        try:
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except pickle.UnpicklingError as exc:   # transformers loads checkpoint state with weights_only=True
            if resume_from is None:
                raise
            raise checkpoints.unsafe_state_error(resume_from, exc) from None
    if stopper.received and stopper.saved_step is not None:
        where = out / checkpoints.CHECKPOINTS / f"checkpoint-{stopper.saved_step}"
        raise Interrupted(f"interrupted by {stopper.received} at step {stopper.saved_step} of "
                          f"{trainer.state.max_steps}: a resumable checkpoint is in {where}. Continue with the "
                          f"same command and --resume auto.", checkpoint=str(where), step=stopper.saved_step,
                          signal=stopper.received)
    return output


def _default_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pick_precision(precision: str) -> str:
    """The run's precision: auto picks bf16 on a GPU that has it, else fp32; an explicit choice this machine
    cannot run is a ConfigError (bf16 on a CPU runs, through the CPU's bf16 autocast)."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError('training.precision "fp16" needs a CUDA GPU and this machine has none: set "bf16" '
                          '(the CPU\'s bf16 autocast; slow on CPUs without bf16 instructions), "fp32", or "auto".')
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f'training.precision "bf16" needs an Ampere or newer GPU and this one '
                          f'({torch.cuda.get_device_name()}) has no bf16: set "fp16", "fp32", or "auto".')
    return precision


def prepare_output_dir(out: Path, overwrite: bool, resuming: bool = False, guard: OutputGuard | None = None
                       ) -> Path:
    """Refuse to write over another run's results unless asked; never touch other files."""
    check_output_dir(out, overwrite, resuming)
    if out.exists() and any(out.iterdir()) and not resuming:
        if guard is not None:
            guard.set_aside()   # deleted once training starts; put back if this run fails first
        else:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_output_dir(out: Path, overwrite: bool, resuming: bool = False) -> None:
    """Raise ConfigError when the run may not write to ``out``; change nothing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory: choose another --output.")
    if resuming and out.exists() and any(out.iterdir()) and not (out / RUN_MARKER).exists():
        raise ConfigError(f"output directory {out} holds files that are not an ftcore run: nothing to resume "
                          f"there. Choose another --output.")
    if out.exists() and any(out.iterdir()) and not resuming:
        if not overwrite:
            what = "another run's results" if (out / RUN_MARKER).exists() else "files"
            raise ConfigError(f"output directory {out} already holds {what}. Pass --overwrite to replace it, "
                              f"or choose another --output.")
        if not (out / RUN_MARKER).exists():
            raise ConfigError(f"output directory {out} holds files that are not an ftcore run; "
                              f"--overwrite only replaces ftcore runs. Choose another --output.")


def write_run_files(ctx: RunContext) -> Path:
    """The resolved config and plugin list, so the run can be repeated from its output."""
    out = ctx.output_dir
    data = ctx.config.to_dict()
    data["overwrite"] = False
    data["resume"] = None
    path = out / "config.yaml"
    write_text_atomic(path, "# Resolved ftcore configuration; rerun with: ftcore run config.yaml\n"
                      + yaml.safe_dump(data, sort_keys=False))
    write_json_atomic(out / "plugins.json", ctx.plugins.versions())
    from ftcore import __version__
    write_json_atomic(out / RUN_MARKER, {"ftcore_version": __version__, "started": time.time(),
                                         "argv": sys.argv, "precision": ctx.precision,
                                         "base_model_license": ctx.state.get("base_model_license")})
    return path


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def load_tokenizer(model_path: Path, config: cfg.RunConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model folder {model_path}: no usable tokenizer ({exc}).") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"model folder {model_path}: ftcore needs a fast (tokenizers) tokenizer for exact "
                          f"label masking; this one is {type(tok).__name__}.")
    if tok.pad_token is None:
        # A common case (Llama, Mistral): pad with EOS; labels mask padding, so it is never learned.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def log_data_stats(stats: data_mod.DataStats, log: Callable[[str], None]) -> None:
    src = " (from cache)" if stats.cached else ""
    log(f"data{src}: {stats.records} records, {stats.bad_records} invalid, {stats.train_examples} train / "
        f"{stats.eval_examples} eval examples, {stats.tokens} tokens ({stats.supervised_tokens} supervised), "
        f"{stats.truncated} truncated, {stats.dropped_too_long} dropped as too long, "
        f"{stats.dropped_unsupervised} dropped with nothing supervised, "
        f"packing efficiency {stats.packing_efficiency:.1%}")


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
    t = ctx.config.training
    eval_strategy = t.eval_strategy if has_eval else "no"
    args: dict[str, Any] = dict(
        output_dir=str(ctx.output_dir / checkpoints.CHECKPOINTS),
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
    )
    return args


def build_trainer(model: Any, prepared: data_mod.PreparedData, ctx: RunContext) -> tuple[Any, Any]:
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    from ftcore import speedups
    from ftcore.callbacks import adjust_arguments, run_callbacks

    hook = ctx.plugins.hook
    args = training_arguments(ctx, prepared.eval is not None)
    adjust_arguments(args, ctx, prepared.eval is not None)
    hook.ftcore_training_arguments(args=args, config=ctx.config, ctx=ctx)
    if args.get("bf16") and not args.get("deepspeed"):
        from transformers.utils import is_torch_bf16_gpu_available

        if not is_torch_bf16_gpu_available():
            args["use_cpu"] = True     # bf16 on a CPU: transformers asks for it to be said
    training_args = TrainingArguments(**args)
    optimizer = hook.ftcore_build_optimizer(model=model, training_args=training_args, config=ctx.config)
    collator = data_mod.make_collator(ctx.config.data.packing, ctx.tokenizer, model, ctx.log)
    callbacks = run_callbacks(ctx, prepared, collator.counter)
    for extra in hook.ftcore_trainer_callbacks(ctx=ctx):
        callbacks += list(extra or [])
    trainer_class = Trainer
    if ctx.config.training.sparse_logits and speedups.supports_sparse_logits(model):
        trainer_class = speedups.fast_loss_trainer_class()
    trainer = trainer_class(model=model, args=training_args, train_dataset=prepared.train,
                      eval_dataset=prepared.eval, data_collator=collator, processing_class=ctx.tokenizer,
                      callbacks=callbacks, optimizers=(optimizer, None))
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    ctx.state["tracker_dirs"] = configure_trackers(trainer, ctx.output_dir)
    ctx.state["trainer"] = trainer
    return trainer, collator


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
    name = "adapter" if hasattr(model, "peft_config") else "model"
    final = ctx.output_dir / name
    tmp = ctx.output_dir / f".{name}.tmp"
    if not is_main_process():
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


def summarize(trainer: Any, train_output: Any, final_eval: dict[str, Any], collator: Any,
              started: float) -> dict[str, Any]:
    history = trainer.state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": losses[-1] if losses else None,
        "train_loss_mean": train_output.training_loss,
        "best_train_loss": min(losses) if losses else None,
        "eval_loss": final_eval.get("eval_loss"),
        "eval_loss_start": evals[0] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "tokens": collator.counter.real,
        "supervised_tokens": collator.counter.supervised,
        "computed_positions": collator.counter.computed,
        "packing_efficiency": (collator.counter.real / collator.counter.computed) if collator.counter.computed else None,
        "runtime_s": round(time.time() - started, 2),
    }


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, FtcoreError)
