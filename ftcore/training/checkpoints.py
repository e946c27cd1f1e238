"""Checkpoints that are complete or absent, and resuming from the newest complete one.

The trainer writes ``checkpoint-N`` straight into its output folder, so a run killed
while saving would leave a half-written folder that looks like a checkpoint. Here each
save goes to ``checkpoints/.incomplete/checkpoint-N`` first; when every file is written,
a marker (``ftcore-checkpoint.json``) is added last and the folder is renamed into
place. ``--resume auto`` only takes folders that carry the marker.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftcore import runfolder
from ftcore.errors import ConfigError, OutputError

MARKER = "ftcore-checkpoint.json"
STAGING = ".incomplete"
CHECKPOINTS = runfolder.CHECKPOINTS
_NAME = re.compile(r"^checkpoint-(\d+)$")
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def step_of(folder: Path) -> int:
    match = _NAME.match(folder.name)
    return int(match.group(1)) if match else -1


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every ``checkpoint-N`` folder of a run, oldest first (complete or not)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=step_of)


def newest_complete(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that was saved to the end; cut-off ones are named and skipped."""
    for folder in reversed(checkpoint_folders(run_dir)):
        if is_complete(folder):
            return folder
        log(f"skipping {folder}: it has no {MARKER}, so it was cut off while saving (or not written by ftcore)")
    return None


def resolve_resume(resume: str, out: Path, overwrite: bool, log: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from, or None to start from the beginning (``auto`` with none saved)."""
    if overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --overwrite deletes the checkpoints "
                          "--resume would continue from. Pass one of them.")
    if resume == "auto":
        if (out / runfolder.SUMMARY).exists():
            raise ConfigError(f"output directory {out} holds a finished run: there is nothing to resume. "
                              f"Pass --overwrite to train again, or choose another --output.")
        found = newest_complete(out, log)
        if found is None:
            log(f"--resume auto: no complete checkpoint in {out / CHECKPOINTS}; starting from the beginning")
        return found
    path = Path(resume).expanduser()
    if path.is_dir() and not _NAME.match(path.name) and (path / CHECKPOINTS).is_dir():
        found = newest_complete(path, log)   # a run folder: its newest complete checkpoint
        if found is None:
            raise ConfigError(f"--resume {path}: that run has no complete checkpoint to continue from.")
        return found
    if not path.is_dir():
        raise ConfigError(f"--resume {path}: no such checkpoint folder. Pass a checkpoint-N folder, a run folder, "
                          f"or auto (the newest complete checkpoint in the output directory).")
    if not is_complete(path):
        raise ConfigError(f"--resume {path}: not a complete ftcore checkpoint (no {MARKER}): it was cut off "
                          f"while saving or not written by ftcore. Pass an older checkpoint-N folder, or auto.")
    return path


def config_changes(checkpoint: Path, config: Any) -> list[str]:
    """Keys whose value differs from the config of the run that wrote the checkpoint ("key: old -> new")."""
    import yaml

    try:
        old = runfolder.read_config(checkpoint.parent.parent)
    except (OSError, yaml.YAMLError):
        return []
    before, after = _flat(old), _flat(config.to_dict())
    skip = ("output_dir", "resume", "overwrite")
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
            if k not in skip and before.get(k) != after.get(k)]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def read_marker(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics rows up to the checkpoint's step, so the resumed run continues the file."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue   # a line cut off by the kill
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


def restore_counters(trainer: Any, counter: Any, marker: dict[str, Any]) -> None:
    """What the run had counted continues from the checkpoint: token counts, elapsed time, the sum of the
    training losses, and the samples generated before training (the report's "before" column)."""
    counter.real = int(marker.get("tokens", 0))
    counter.supervised = int(marker.get("supervised_tokens", 0))
    counter.computed = int(marker.get("computed_positions", 0))
    trainer._ftcore_loss_before = float(marker.get("loss_sum", 0.0))
    metrics = callback_named(trainer, "MetricsCallback")
    if metrics is not None:   # the one whose clock metrics.jsonl shows
        metrics.started = time.time() - float(marker.get("elapsed_s", 0.0))
        metrics.loss_before = (trainer._ftcore_loss_before, int(marker.get("step", 0)))
    samples = callback_named(trainer, "SamplesCallback")
    if samples is not None and marker.get("samples_before") is not None:
        samples.store["before"] = list(marker["samples_before"])


def callback_named(trainer: Any, name: str) -> Any:
    """The trainer's callback of this class name (ftcore's own callbacks, looked up without importing them)."""
    return next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == name), None)


def truncate_metrics(path: Path, marker: dict[str, Any]) -> None:
    """Cut metrics.jsonl back to what it held when the checkpoint was saved, so the resumed run continues
    the file exactly as the uninterrupted run wrote it (rows logged after the save, such as those of the
    interrupted step's teardown, go)."""
    size = marker.get("metrics_bytes")
    if size is None:
        trim_metrics(path, int(marker.get("step", 0)))   # a checkpoint from before the size was recorded
        return
    if path.exists() and path.stat().st_size > int(size):
        with open(path, "r+b") as fh:
            fh.truncate(int(size))


def install_atomic_saves(trainer: Any, counter: Any) -> None:
    """Make the trainer write each checkpoint aside and rename it into place when complete."""
    save_checkpoint = trainer._save_checkpoint
    output_dir_of = trainer._get_output_dir

    def atomic_save(model: Any, trial: Any) -> None:
        run_dir = Path(output_dir_of(trial=trial))
        staging_root = run_dir / STAGING
        name = f"checkpoint-{trainer.state.global_step}"
        main = trainer.args.should_save
        if main:
            shutil.rmtree(staging_root / name, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()   # no rank writes before a stale folder is gone
        trainer._get_output_dir = lambda trial=None: str(staging_root)
        try:
            save_checkpoint(model, trial)
            trainer.accelerator.wait_for_everyone()
            if main:
                _finish(staging_root / name, run_dir / name, trainer, counter)
            best = trainer.state.best_model_checkpoint
            if best and Path(best) == staging_root / name:   # the trainer recorded the staging path
                trainer.state.best_model_checkpoint = str(run_dir / name)
        except BaseException as exc:
            error = save_failure(exc, staging_root / name, run_dir.parent) if isinstance(exc, Exception) else None
            if main:
                shutil.rmtree(staging_root / name, ignore_errors=True)
            if error is not None:
                raise error from exc
            raise
        finally:
            del trainer._get_output_dir   # back to the class's method
        trainer.accelerator.wait_for_everyone()

    trainer._save_checkpoint = atomic_save


def loss_sum(trainer: Any) -> float:
    """The sum of the training losses of every step so far, this process's (what the trainer's mean
    ``train_loss`` divides by the number of steps), across resumes."""
    here = float(getattr(trainer, "_total_loss_scalar", 0.0) or 0.0)
    pending = getattr(trainer, "_tr_loss", None)
    if pending is not None:
        here += float(pending.item())
    return float(getattr(trainer, "_ftcore_loss_before", 0.0)) + here


def install_token_counting(trainer: Any, counter: Any) -> None:
    """Count each batch a training step takes (``TokenCounter.add_batch``)."""
    training_step = trainer.training_step

    def counted_step(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        counter.add_batch(inputs, padding_free=getattr(trainer, "ftcore_padding_free", False))
        return training_step(model, inputs, *args, **kwargs)

    trainer.training_step = counted_step


def install_rng_neutral_evaluation(trainer: Any) -> None:
    """Evaluate without drawing from the training's random streams.

    The eval dataloader draws a seed from torch's global generator, so an evaluation between two
    steps would shift the dropout masks of every later step. A checkpoint saved just before an
    evaluation (the last step of an epoch, say) would then resume onto different masks than the
    uninterrupted run used. With the streams restored after each evaluation, a run's training is
    the same whatever its evaluation schedule, and a resume reproduces it exactly.
    """
    evaluate = trainer.evaluate

    def neutral_evaluate(*args: Any, **kwargs: Any) -> Any:
        with preserved_rng():
            return evaluate(*args, **kwargs)

    trainer.evaluate = neutral_evaluate


class preserved_rng:  # noqa: N801  (used as a context manager)
    """Save python's, numpy's and torch's (CPU and accelerator) random states; restore them on exit."""

    def __enter__(self) -> "preserved_rng":
        import random

        import numpy as np
        import torch

        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                       torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        return self

    def __exit__(self, *exc: Any) -> None:
        import random

        import numpy as np
        import torch

        py, npy, cpu, cuda = self.states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _finish(staged: Path, final: Path, trainer: Any, counter: Any) -> None:
    from transformers.trainer_utils import rotate_checkpoints

    metrics = callback_named(trainer, "MetricsCallback")
    samples = callback_named(trainer, "SamplesCallback")
    elapsed = time.time() - metrics.started if metrics is not None else 0.0
    marker = {"step": trainer.state.global_step, "epoch": trainer.state.epoch, "complete": True,
              "tokens": counter.real, "supervised_tokens": counter.supervised,
              "computed_positions": counter.computed, "elapsed_s": round(elapsed, 3), "saved": time.time(),
              "loss_sum": loss_sum(trainer),
              "metrics_bytes": metrics.path.stat().st_size if metrics is not None and metrics.path.exists() else 0,
              "samples_before": samples.store.get("before") if samples is not None else None}
    _sync_tree(staged)
    with open(staged / MARKER, "w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    try:
        staged.parent.rmdir()   # the staging folder, when nothing else is in it
    except OSError:
        pass
    _fsync_dir(final.parent)
    rotate_checkpoints(str(final.parent), save_total_limit=trainer.args.save_total_limit,
                       best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)


def _sync_tree(folder: Path) -> None:
    """Flush the staged files to disk so the rename never publishes data still in the page cache."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unsafe_state_error(checkpoint: Path, exc: BaseException) -> ConfigError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(f"checkpoint {checkpoint}: a state file (optimizer, scheduler or RNG state) holds more than "
                       f"tensors and plain data, so weights-only loading refused to unpickle it ({first}). It was "
                       f"altered or not written by ftcore: resume from another checkpoint, or start afresh.")


def clean_staging(run_dir: Path) -> None:
    """Remove checkpoints cut off by an earlier kill (they are never resumed from)."""
    shutil.rmtree(run_dir / CHECKPOINTS / STAGING, ignore_errors=True)


def disk_full(exc: BaseException) -> OSError | None:
    """The OSError for a full disk (or a file-size limit) anywhere in an exception's chain, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        if "No space left on device" in str(exc) or "File too large" in str(exc):
            return OSError(errno.ENOSPC, str(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def save_failure(exc: BaseException, folder: Path, out: Path) -> OutputError | None:
    """A user-facing error when a save failed for want of disk space; None for any other failure.

    torch.save reports a full disk as a bare RuntimeError, so besides the errno in the
    exception chain the free space is checked (before the partial files are removed).
    """
    full = disk_full(exc)
    if full is None and _free_bytes(folder) < LOW_SPACE:
        full = OSError(errno.ENOSPC, "No space left on device", str(folder))
    return disk_full_error(full, out) if full is not None else None


LOW_SPACE = 1 << 20


def _free_bytes(folder: Path) -> int:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return 1 << 62
    return 1 << 62


def disk_full_error(cause: OSError, out: Path) -> OutputError:
    newest = newest_complete(out, lambda m: None)
    where = f" ({cause.filename})" if getattr(cause, "filename", None) else ""
    keep = (f" The newest complete checkpoint is {newest}: after freeing space, continue with --resume auto."
            if newest else "")
    return OutputError(f"no space left while writing the run's outputs in {out}{where}: "
                       f"{cause.strerror or cause}. Nothing partial was kept. Free space or choose another "
                       f"--output.{keep}")
