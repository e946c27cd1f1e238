"""Trainer callbacks the core installs: metrics file, progress, overfitting warning, samples, early stopping."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ftcore import runfolder
from ftcore.data.labels import IGNORE_INDEX
from ftcore.models.generation import generate_ids
from ftcore.types import RunContext


class MetricsCallback(TrainerCallback):
    """Appends every log event (train loss, eval loss, learning rate, tokens) to metrics.jsonl and reports it."""

    def __init__(self, path: Path, counter: Any, log: Callable[[str], None]) -> None:
        self.path = path
        self.counter = counter
        self.log = log
        self.started = time.time()
        self.loss_before: tuple[float, int] | None = None   # (sum of losses, steps) before a resume

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - transformers' signature
        if not state.is_world_process_zero:
            return
        logs = dict(logs or {})
        if "train_loss" in logs and self.loss_before is not None:
            # the trainer's mean covers the steps of this process only; the run's covers every step
            logs["train_loss"] = whole_run_mean(logs["train_loss"], state.global_step, *self.loss_before)
        elapsed = time.time() - self.started
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs,
               "tokens": self.counter.real, "supervised_tokens": self.counter.supervised,
               "computed_positions": self.counter.computed, "elapsed_s": round(elapsed, 3),
               "tokens_per_s": round(self.counter.real / elapsed, 2) if elapsed > 0 else None}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        report = getattr(self.log, "train_log", None)
        if report is not None:
            report(row)
            return
        shown = {k: v for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate", "grad_norm")}
        if shown:
            parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            self.log(f"step {state.global_step} epoch {state.epoch or 0:.2f} {parts}")


def whole_run_mean(session_mean: float, step: int, loss_before: float, step_before: int) -> float:
    """The mean training loss over every step of a resumed run, from the resumed part's mean."""
    return (loss_before + session_mean * (step - step_before)) / max(step, 1)


class ProgressCallback(TrainerCallback):
    """Drives the reporter's training display: total steps, then step, epoch and tokens per second."""

    def __init__(self, reporter: Any, counter: Any) -> None:
        self.reporter = reporter
        self.counter = counter
        self.started = time.time()
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero:
            self.started = time.time()
            self.tokens_at_start = self.counter.real
            self.reporter.train_begin(state.max_steps, args.num_train_epochs if args.max_steps <= 0 else None)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero:
            self.reporter.train_update(state.global_step, state.epoch or 0.0,
                                       self.counter.real - self.tokens_at_start, time.time() - self.started)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero:
            self.reporter.train_end()


class OverfitCallback(TrainerCallback):
    """Warns once when the eval loss rose at ``rises`` evaluations in a row while the train loss fell."""

    def __init__(self, log: Callable[[str], None], rises: int = 3, patience_set: bool = False) -> None:
        self.log = log
        self.rises = rises
        self.patience_set = patience_set
        self.evals: list[tuple[int, float]] = []
        self.warned = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not state.is_world_process_zero:
            return
        self.evals.append((state.global_step, float(loss)))
        if self.warned or self.rises <= 0:
            return
        message = overfitting_message(self.evals, state.log_history, self.rises, self.patience_set)
        if message:
            self.warned = True
            self.log(message)


def overfitting_message(evals: list[tuple[int, float]], history: list[dict[str, Any]], rises: int,
                        patience_set: bool = False) -> str | None:
    """The warning text when the last ``rises`` evaluations each raised the eval loss while train loss fell."""
    if len(evals) < rises + 1:
        return None
    window = evals[-(rises + 1):]
    if not all(b[1] > a[1] for a, b in zip(window, window[1:])):
        return None
    first, last = window[0][0], window[-1][0]
    train = [h["loss"] for h in history if "loss" in h and first <= h.get("step", -1) <= last]
    if len(train) < 2 or not train[-1] < train[0]:
        return None
    evals_text = " -> ".join(f"{v:.4f}" for _, v in window)
    advice = ("early stopping will end the run and keep the best checkpoint" if patience_set else
              "consider fewer epochs, more or more varied data, a lower learning rate, or set "
              "training.early_stopping_patience to stop and keep the best checkpoint")
    return (f"warning: the model looks like it is overfitting: eval loss rose at {rises} evaluations in a row "
            f"({evals_text}, steps {first}-{last}) while train loss fell ({train[0]:.4f} -> {train[-1]:.4f}); "
            f"{advice}.")


class SamplesCallback(TrainerCallback):
    """Generates from a few held-out prompts before training and after it, for the run report."""

    def __init__(self, prompts: list[dict[str, Any]], tokenizer: Any, store: dict[str, Any],
                 max_new_tokens: int = 20, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.store = store
        self.max_new_tokens = max_new_tokens

    def _sample(self, key: str, state: Any, model: Any) -> None:
        if model is None or not self.prompts:
            return
        try:
            outputs = [generate_ids(model, self.tokenizer, p["prompt_ids"], self.max_new_tokens) for p in self.prompts]
        except Exception as exc:  # samples are for the report; a model that cannot generate must not stop training
            if state.is_world_process_zero:
                self.log(f"warning: no {key}-training samples for the report: generation failed "
                         f"({type(exc).__name__}: {exc}); set report.samples: 0 to skip them.")
            return
        if state.is_world_process_zero:
            self.store[key] = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if "before" not in self.store:   # a resumed run has them from its checkpoint: the base model's, not these
            self._sample("before", state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self._sample("after", state, model)


def sample_prompts(dataset: Any, tokenizer: Any, count: int) -> list[dict[str, Any]]:
    """The first ``count`` examples as (prompt, reference): the prompt is what precedes the first supervised token."""
    prompts = []
    for row in dataset.select(range(min(count, len(dataset)))) if dataset is not None else []:
        if "prompt_ids" in row:   # preference data: the prompt, and the preferred answer as the reference
            answer = row.get("chosen_ids") or (row.get("completion_ids") if row.get("label") else None) or []
            ids, labels = list(row["prompt_ids"]) + list(answer), [IGNORE_INDEX] * len(row["prompt_ids"]) + list(answer)
        else:
            ids, labels = list(row["input_ids"]), list(row["labels"])
        first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
        skip = 1 if ids[:1] == [tokenizer.bos_token_id] else 0   # the BOS a tokenizer adds to any text
        if first <= skip:   # all supervised (plain text): the first half is the prompt
            first = max(1, len(ids) // 2)
        prompts.append({"prompt_ids": ids[:first],
                        "prompt": tokenizer.decode(ids[:first], skip_special_tokens=True),
                        "text": tokenizer.decode(ids[skip:first], skip_special_tokens=False),
                        "reference": tokenizer.decode([t for t in labels if t != IGNORE_INDEX],
                                                      skip_special_tokens=True)})
    return prompts


@dataclass
class RunCallbacks:
    """The callbacks every run gets, and what the engine reads back from them at the end."""

    callbacks: list[TrainerCallback]
    samples: dict[str, Any] = field(default_factory=dict)    # prompts, before and after (for the report)
    early_stopping: Any = None


def run_callbacks(ctx: RunContext, prepared: Any, counter: Any) -> RunCallbacks:
    """The callbacks every run gets, in order."""
    from transformers import EarlyStoppingCallback

    t = ctx.config.training
    patience = t.early_stopping_patience if prepared.eval is not None else None
    made = RunCallbacks([
        MetricsCallback(ctx.output_dir / runfolder.METRICS, counter, ctx.log),
        ProgressCallback(ctx.log, counter),
        OverfitCallback(ctx.log, t.overfit_warning_evals, patience_set=patience is not None),
    ])
    if patience is not None:
        made.early_stopping = EarlyStoppingCallback(early_stopping_patience=patience,
                                                    early_stopping_threshold=t.early_stopping_threshold)
        made.callbacks.append(made.early_stopping)
    report = ctx.config.report
    if report.enabled and report.samples > 0:
        source = prepared.eval if prepared.eval is not None else prepared.train
        made.samples = {"held_out": prepared.eval is not None,
                        "prompts": sample_prompts(source, ctx.tokenizer, report.samples)}
        made.callbacks.append(SamplesCallback(made.samples["prompts"], ctx.tokenizer, made.samples,
                                              report.max_new_tokens, ctx.log))
    return made
