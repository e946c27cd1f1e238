"""The run pipeline. It calls hooks; it never names a plugin.

    resolve config + plugins -> output folder -> tokenizer -> data (the objective's, else format hooks)
    -> model (adapter hook) -> trainer (objective, strategy and optimizer hooks, callbacks)
    -> train + evaluate -> save -> summary -> exporters -> report -> run_finished

A strategy plugin may start the run's processes instead (``ftcore_launch``); each of them
runs this same pipeline as one rank, and only rank 0 writes the run's files.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ftcore import runfolder
from ftcore.config.layering import deep_merge
from ftcore.config.schema import RunConfig
from ftcore.errors import ConfigError, FtcoreError, Interrupted, PluginError, Stopped
from ftcore.files import write_json_atomic
from ftcore.models.licence import base_model_licence
from ftcore.models.licence import describe as describe_licence
from ftcore.models.paths import resolve_run_model
from ftcore.models.tokenizer import load_tokenizer
from ftcore.registry.discovery import installed_entry_points
from ftcore.registry.pluginset import PluginSet
from ftcore.registry.resolution import resolve
from ftcore.reporting.card import ensure_model_card
from ftcore.reporting.progress import as_reporter
from ftcore.reporting.report import sample_rows, write_report
from ftcore.training import chain, checkpoints, devices, processes
from ftcore.training.outputs import (
    LOCK_ENV,
    OutputGuard,
    OutputLock,
    check_output_dir,
    prepare_output_dir,
    recover_stranded,
    write_run_files,
)
from ftcore.types import RunContext, RunResult


def run(source: Any = None, *, flags: dict[str, Any] | None = None, plugins: list[Any] | tuple = (),
        dry_run: bool = False, log: Callable[[str], None] | None = None, **overrides: Any) -> RunResult:
    """Run a fine-tune. ``source`` is a config dict, a YAML path or a RunConfig.

    ``plugins`` are plugin objects (modules or instances with hook implementations)
    used in addition to those named in the config. Keyword ``overrides`` are merged on
    top as a flags layer, e.g. ``run("cfg.yaml", output_dir="out")``.
    """
    with as_reporter(log) as log:   # a callable, a Reporter, or None: automatic progress display
        flags = deep_merge(flags or {}, overrides)
        config, plugin_set = resolve(source, flags, plugins, log)
        if dry_run:
            return RunResult(output_dir=Path(config.output_dir), plugins=plugin_set.versions(), dry_run=True)
        return execute(config, plugin_set, log)


def execute(config: RunConfig, plugins: PluginSet, log: Callable[[str], None] = print) -> RunResult:
    """Run a resolved config with its plugins (what ``run`` does after ``resolve``).

    The run holds its output folder's lock throughout; a signal outside training stops it cleanly.
    """
    from ftcore.training.signals import stop_outside_training

    with stop_outside_training(log), output_lock(config, log):
        guard = OutputGuard(Path(config.output_dir))
        try:
            return _execute(config, plugins, log, guard)
        except BaseException:
            guard.undo()   # a run that stops before training leaves the output directory as it found it
            raise


@contextmanager
def output_lock(config: RunConfig, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the output folder's lock for the run (see ``outputs.OutputLock``).

    The process that writes the outputs holds it: a one-process run, the launching process of machine 0
    (its ranks inherit it), or rank 0 of ranks an application launched itself.
    """
    launched_by_ftcore = os.environ.get(LOCK_ENV) == "1"
    if (processes.in_launched_rank() and (launched_by_ftcore or not processes.is_main_process())) \
            or config.launch.machine_rank != 0:
        yield
        return
    out = Path(config.output_dir)
    with OutputLock(out) as lock:
        if lock.unlocked:
            log(f"warning: {out.parent} cannot be locked ({lock.unlocked}; some network filesystems have no "
                f"locks), so nothing stops a second run from writing {out.name} at the same time: give each job "
                f"its own --output (docs/safety.md).")
        if lock.taken_over:
            log(f"note: took over the lock of {out} from a run that ended without releasing it "
                f"(process {lock.taken_over.get('pid')} on {lock.taken_over.get('host')})")
        recover_stranded(out, log)
        yield


def _execute(config: RunConfig, plugins: PluginSet, log: Callable[[str], None], guard: OutputGuard) -> RunResult:
    from ftcore.quiet import quiet_libraries

    if chain.is_run_model(config.model.path) and plugins.hook.ftcore_launch.get_hookimpls() \
            and not processes.in_launched_rank():   # merge the run's adapter once, before the ranks start
        chain.resolve_from_run(RunContext(config=config, plugins=plugins, output_dir=Path(config.output_dir),
                                          log=log))
    status = launch(config, plugins, log)
    if status is not None:
        return launched_result(config, plugins, status)
    quiet_libraries()
    log = as_reporter(log)
    started = time.time()
    ctx = RunContext(config=config, plugins=plugins, output_dir=Path(config.output_dir), log=log,
                     rank=processes.rank(), world_size=processes.world_size())
    if not ctx.is_main_process:
        ctx.log = as_reporter(processes.rank_prefixed(log))
    if chain.is_run_model(config.model.path):   # a finished run: its model, its adapter merged, or continued
        ctx.model_path = chain.resolve_from_run(ctx)
    else:
        ctx.model_path = resolve_run_model(config.model, ctx.log)   # a Hub model's commit is pinned in config.model
    ctx.base_model_license = base_model_licence(ctx.model_path)
    ctx.log(describe_licence(ctx.base_model_license, ctx.model_path))
    out = ctx.output_dir
    resume_from = checkpoints.resolve_resume(config.resume, out, config.overwrite, ctx.log) if config.resume else None
    for change in checkpoints.config_changes(resume_from, config) if resume_from else []:
        ctx.log(f"warning: resuming with a changed configuration: {change}")
    from ftcore.training.trainer import pick_precision

    ctx.precision = pick_precision(config.training.precision)
    if ctx.is_main_process:
        prepare_output_dir(out, config.overwrite, resuming=config.resume is not None, guard=guard)
    result = RunResult(output_dir=out, plugins=plugins.versions(), base_model_license=ctx.base_model_license)
    ctx.result = result
    result.config_path = write_run_files(ctx) if ctx.is_main_process else out / runfolder.CONFIG
    hook = plugins.hook
    hook.ftcore_run_started(config=config, ctx=ctx)
    return _train(ctx, result, guard, resume_from, started)


def _train(ctx: RunContext, result: RunResult, guard: OutputGuard, resume_from: Path | None,
           started: float) -> RunResult:
    from transformers import set_seed

    from ftcore.data.pipeline import prepare
    from ftcore.training import speedups, trainer
    from ftcore.training.callbacks import sample_prompts
    from ftcore.training.trainer import build_trainer, final_evaluation, save_final, summarize

    config, hook, log, out = ctx.config, ctx.plugins.hook, ctx.log, ctx.output_dir
    ctx.tokenizer = load_tokenizer(ctx.model_path, config.model.trust_remote_code)
    for added in hook.ftcore_prepare_tokenizer(tokenizer=ctx.tokenizer, config=config, ctx=ctx):
        ctx.added_tokens += list(added or [])
    with log.phase("preparing data"):
        prepared = hook.ftcore_prepare_data(config=config, tokenizer=ctx.tokenizer, ctx=ctx)   # the objective's
        if prepared is None:
            prepared = prepare(config, ctx.plugins, ctx.tokenizer, log, ctx)   # the supervised path
    result.data_stats = prepared.stats.as_dict()
    source = prepared.eval if prepared.eval is not None else prepared.train
    result.sample_prompts = list(dict.fromkeys(p["text"] for p in sample_prompts(source, ctx.tokenizer, 6)))[:3]
    trainer.log_data_stats(prepared.stats, log)
    hook.ftcore_data_prepared(train_dataset=prepared.train, eval_dataset=prepared.eval,
                              stats=result.data_stats, ctx=ctx)

    set_seed(config.training.seed)   # adapter initialisation is part of the run's reproducibility
    model = hook.ftcore_load_model(model_path=str(ctx.model_path), tokenizer=ctx.tokenizer, config=config, ctx=ctx)
    if model is None:
        raise PluginError("no adapter plugin loaded a model: select one (lora, qlora, full) in --plugins.")
    trainer.trainable_in_fp32(model, ctx.precision, log)
    trainer.log_parameter_counts(model, log)
    hook.ftcore_model_loaded(model=model, ctx=ctx)

    attention = speedups.apply(model, config, log, ctx.precision)
    built = build_trainer(model, prepared, ctx)
    hook.ftcore_trainer_created(trainer=built.trainer, ctx=ctx)
    guard.commit()
    try:
        train_output = trainer.train(built, resume_from, ctx)
        with stopped_while_finishing(ctx, "evaluating and saving the final model"):
            final_eval = final_evaluation(built.trainer) if prepared.eval is not None else {}
            speedups.restore(model, attention)
            result.model_dir = save_final(built.trainer, ctx)
    except (OSError, RuntimeError) as exc:
        full = checkpoints.disk_full(exc)
        if full is None:
            raise
        raise checkpoints.disk_full_error(full, out) from exc
    result.metrics_path = out / runfolder.METRICS
    result.metrics = summarize(built, train_output, final_eval, started)
    if not ctx.is_main_process:   # in a multi-process run only rank 0 writes outputs and exports
        return result
    result.samples = sample_rows(built.samples)
    with stopped_while_finishing(ctx, "writing the summary, exports and report"):
        write_json_atomic(out / runfolder.SUMMARY, result.as_dict())   # exporters find the finished run's summary
        failure = run_exporters(ctx, result)
        ensure_model_card(ctx)   # README.md in adapter/ or model/, unless an exporter (hub-push) wrote it
        if config.report.enabled:
            result.report_path = write_report(result, config.to_dict(), built.samples,
                                              list(getattr(log, "warnings", [])))
        write_json_atomic(out / runfolder.SUMMARY, result.as_dict())
    if failure is not None:
        raise failure
    hook.ftcore_run_finished(result=result, ctx=ctx)
    log.summary(result)
    return result


@contextmanager
def stopped_while_finishing(ctx: RunContext, doing: str) -> Iterator[None]:
    """A signal after training: say what was kept and how to go on, with the right exit status.

    While the final model is evaluated and saved: nothing partial is kept; the newest complete
    checkpoint (when there is one) lets ``--resume auto`` finish the run with the same result (status 3).
    After the final model is saved: the trained model stays, and ``ftcore export`` redoes the exports.
    """
    try:
        yield
    except (Stopped, KeyboardInterrupt) as exc:
        name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
        code = getattr(exc, "exit_code", 130)
        if ctx.result is not None and ctx.result.model_dir is not None and ctx.result.model_dir.is_dir():
            raise Stopped(f"{name} received while {doing}: training is finished and its {ctx.result.model_dir.name} "
                          f"is saved in {ctx.result.model_dir}; redo the exports with `ftcore export --model "
                          f"{ctx.output_dir} --plugins ...`.", code) from None
        newest = checkpoints.newest_complete(ctx.output_dir, lambda m: None)
        if newest is None:
            raise Stopped(f"{name} received while {doing}; nothing partial was kept, and there is no checkpoint to "
                          f"resume from (training.save_strategy): run the same command again.", code) from None
        raise Interrupted(f"interrupted by {name} while {doing}; nothing partial was kept. A resumable checkpoint "
                          f"is in {newest}: continue with the same command and --resume auto, which finishes the "
                          f"run as it would have finished.", checkpoint=str(newest),
                          step=checkpoints.step_of(newest), signal=name) from None


def run_exporters(ctx: RunContext, result: RunResult) -> BaseException | None:
    """Call every exporter; the first one that fails is recorded in the result and returned (not raised),
    so that the summary and report still get written."""
    with ctx.log.phase("exporting"):
        try:
            # exporter by exporter, so that later ones find the earlier ones' outputs in ctx.result.exports
            for _, answers in ctx.plugins.call_each("ftcore_export", run_dir=ctx.output_dir,
                                                    model_dir=result.model_dir, config=ctx.config, ctx=ctx):
                result.exports += [Path(p) for paths in answers for p in paths or []]
        except Exception as exc:   # noqa: BLE001 - recorded, then raised again once the summary is written
            result.export_errors.append(f"{type(exc).__name__}: {exc}" if not isinstance(exc, FtcoreError)
                                        else str(exc))
            ctx.log(f"error: export failed; the trained {result.model_dir.name} is saved in {result.model_dir}. "
                    f"Retry with `ftcore export --model {ctx.output_dir} --plugins ...`.")
            result.exit_code = getattr(exc, "exit_code", 1)
            return exc
    return None


# -- processes ---------------------------------------------------------------------

def launch(config: RunConfig, plugins: PluginSet, log: Callable[[str], None]) -> int | None:
    """Let a strategy plugin start the run's ranks; return their exit status, or None to run here.

    Each rank runs ``python -m ftcore.cli run <resolved config>`` with the launcher's
    environment, so ranks never launch again (see ``processes.in_launched_rank``).
    """
    if processes.in_launched_rank():
        return None
    if not plugins.hook.ftcore_launch.get_hookimpls():
        if config.launch.num_processes > 1 or config.launch.num_machines > 1:
            raise ConfigError(f"launch.num_processes={config.launch.num_processes} / launch.num_machines="
                              f"{config.launch.num_machines} needs a strategy plugin that launches processes, "
                              f"and none of the selected plugins does. Add one to --plugins (`ftcore plugins` "
                              f"lists the strategy plugins), or run with one process.")
        return None
    if not config.launch.hostfile:   # a hostfile names each host's slots; only this machine's GPUs are known
        devices.check_processes_fit(config.launch.num_processes // config.launch.num_machines)
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
        ctx = RunContext(config=config, plugins=plugins, output_dir=out, log=log,
                         world_size=config.launch.num_processes)
        argv = ["-m", "ftcore.cli", "run", str(launch_file)]
        os.environ[LOCK_ENV] = "1"   # the ranks' output folder lock is this process's
        return plugins.hook.ftcore_launch(argv=argv, config=config, ctx=ctx)
    finally:
        os.environ.pop(LOCK_ENV, None)
        launch_file.unlink(missing_ok=True)


def launched_result(config: RunConfig, plugins: PluginSet, status: int) -> RunResult:
    """The RunResult of a launched run, read back from the summary rank 0 wrote."""
    out = Path(config.output_dir)
    result = RunResult(output_dir=out, plugins=plugins.versions(), exit_code=status)
    summary = runfolder.read_summary(out)
    if status == 0 and summary:
        for key in ("model_dir", "config_path", "metrics_path", "report_path"):
            setattr(result, key, Path(summary[key]) if summary.get(key) else None)
        result.exports = [Path(p) for p in summary.get("exports", [])]
        result.metrics = summary.get("metrics", {})
        result.data_stats = summary.get("data_stats", {})
    return result
