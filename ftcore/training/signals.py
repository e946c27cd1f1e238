"""SIGTERM and SIGINT: during training, finish the current step, save a checkpoint, stop; outside it, stop cleanly.

A cluster preempting a job sends SIGTERM and waits a grace period before SIGKILL; Ctrl-C
sends SIGINT. During training either one makes the run save a resumable checkpoint after the
optimizer step in progress and exit with status 3 (``ftcore.errors.EXIT_INTERRUPTED``). A second
signal stops at once, without a checkpoint, unless the checkpoint is already saved.

Outside training (``stop_outside_training``), SIGTERM raises ``ftcore.errors.Stopped`` and SIGINT
``KeyboardInterrupt``, so the run's cleanup runs on the way out (a previous run set aside by
--overwrite is put back, nothing half-written is left) instead of the process vanishing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from transformers import TrainerCallback

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(TrainerCallback):
    """Turns a received signal into "save now and stop" at the end of the current optimizer step."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.saved_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' signature
        if self._anywhere(args):
            control.should_save = True
            control.should_training_stop = True
        return control

    def _anywhere(self, args: Any) -> bool:
        """Whether any rank got a signal: all ranks must stop at the same step, or the others hang."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return bool(self.received)
        import torch

        flag = torch.tensor([1 if self.received else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.received:
            self.received = "a signal to another rank"
        return bool(flag.item())

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.received:
            # The checkpoint just written covers this step: no need for another one.
            self.saved_step = state.global_step
            control.should_training_stop = True
        return control


@contextmanager
def stop_on_signals(trainer: Any, log: Callable[[str], None]) -> Iterator[StopOnSignal]:
    """Install the handlers for the duration of training (main thread only), then restore the old ones."""
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    if threading.current_thread() is not threading.main_thread():
        yield stopper   # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stopper.received and stopper.saved_step is not None:
            log(f"{name} received again: already stopping, and the checkpoint is saved")
            return
        if stopper.received:
            log(f"{name} received again: stopping now, without a checkpoint")
            raise KeyboardInterrupt
        stopper.received = name
        log(f"{name} received: finishing the current step, saving a checkpoint, then stopping "
            f"(send it again to stop at once, without one)")

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield stopper
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        trainer.remove_callback(stopper)


@contextmanager
def stop_outside_training(log: Callable[[str], None]) -> Iterator[None]:
    """For the whole run: SIGTERM raises ``Stopped`` (status 143) instead of ending the process at once.

    Main thread only; the previous handler is restored afterwards. ``stop_on_signals`` replaces it
    for the duration of training.
    """
    from ftcore.errors import Stopped

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Stopped("SIGTERM received", 128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

