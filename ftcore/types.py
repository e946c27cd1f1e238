"""The objects hooks receive and return: ``Example``, ``RunContext``, ``RunResult`` and the memory profiles.

All are part of the public API (``ftcore.Example``, ...). They sit low in the layers: plain
dataclasses that import nothing of ftcore at run time (the names in their annotations are
imported for type checkers only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:   # annotations only: never imported at run time
    from ftcore.config.schema import RunConfig
    from ftcore.registry.pluginset import PluginSet


# -- dataset formats ------------------------------------------------------------------

@dataclass
class Example:
    """One rendered training example: ``text`` and the character spans ``(start, end)`` that are supervised.

    ``add_special_tokens``: let the tokenizer add its own special tokens (BOS) around the text.
    ``split_long``: a text longer than ``data.max_length`` tokens is split into consecutive chunks of at most
    ``max_length`` tokens, each an example of its own, instead of following ``data.too_long`` (the ``text``
    format's documents for continued pretraining).
    """

    text: str
    supervised: list[tuple[int, int]] = field(default_factory=list)
    add_special_tokens: bool = False
    split_long: bool = False

    @classmethod
    def from_segments(cls, segments: list[tuple[str, bool]], add_special_tokens: bool = False) -> Example:
        """Build from ``[(text, supervised), ...]`` pieces, joined in order."""
        text, spans, pos = [], [], 0
        for piece, train in segments:
            if train and piece:
                if spans and spans[-1][1] == pos:
                    spans[-1] = (spans[-1][0], pos + len(piece))
                else:
                    spans.append((pos, pos + len(piece)))
            text.append(piece)
            pos += len(piece)
        return cls("".join(text), spans, add_special_tokens)


# -- memory profiles (ftcore_memory_profile) ---------------------------------------------

@dataclass(frozen=True)
class MemoryProfile:
    """What an adapter method keeps in memory: a plugin's answer to ``ftcore_memory_profile``.

    ``trains``: ``"all"`` weights, or ``"adapters"`` only (low-rank adapters of rank
    ``adapter_rank`` on the linear layers named by ``adapter_targets``: module names, the last
    part of the layer's name, or ``"all-linear"``). ``base_storage``: how the model's own
    weights are held: ``"master"`` fp32 trained weights (plus the 16-bit copy autocast keeps
    with bf16/fp16), ``"compute"`` the training precision's dtype, ``"4bit"`` every linear
    layer but the output head in 4 bits (NF4/FP4: an absmax per 64 weights, itself 8-bit with
    ``double_quant``) and the rest fp32. ``always_checkpointing``: the method turns gradient
    checkpointing on itself. ``assumptions``: one line saying what the profile rests on.
    """

    trains: Literal["all", "adapters"] = "all"
    base_storage: Literal["master", "compute", "4bit"] = "master"
    always_checkpointing: bool = False
    adapter_rank: int = 0
    adapter_targets: tuple[str, ...] | str = ()
    double_quant: bool = True
    assumptions: str = ""

    def __post_init__(self) -> None:
        if self.trains not in ("all", "adapters"):
            raise ValueError(f"MemoryProfile.trains: {self.trains!r}; expected 'all' or 'adapters'")
        if self.base_storage not in ("master", "compute", "4bit"):
            raise ValueError(f"MemoryProfile.base_storage: {self.base_storage!r}; expected master, compute or 4bit")
        if self.trains == "adapters" and self.adapter_rank < 1:
            raise ValueError("MemoryProfile: a method that trains adapters needs adapter_rank >= 1")
        if not isinstance(self.adapter_targets, str):
            object.__setattr__(self, "adapter_targets", tuple(self.adapter_targets))


@dataclass(frozen=True)
class OptimizerProfile:
    """The optimizer state an optimizer plugin keeps: its answer to ``ftcore_memory_profile``.

    ``state_bytes`` per trained parameter (the trainer's AdamW: two fp32 states, 8 bytes).
    Blockwise-quantized state adds ``block_bytes`` per ``block_size`` parameters of a tensor;
    tensors of fewer than ``min_size`` elements keep ``small_state_bytes`` per parameter.
    ``label`` names it in the table's title; ``assumptions`` is one line on what it rests on.
    """

    label: str = "AdamW"
    state_bytes: float = 8
    block_size: int = 0
    block_bytes: int = 0
    min_size: int = 0
    small_state_bytes: float = 8
    assumptions: str = ""

    def bytes_for(self, tensors: list[int]) -> int:
        """Optimizer state for trained tensors of these element counts."""
        total = 0
        for n in tensors:
            if n < self.min_size:
                total += self.small_state_bytes * n
            else:
                total += self.state_bytes * n + (self.block_bytes * math.ceil(n / self.block_size)
                                                 if self.block_size else 0)
        return int(total)


@dataclass(frozen=True)
class ShardingProfile:
    """How a strategy plugin splits the run's memory over its processes: its answer to ``ftcore_memory_profile``.

    Each of ``shards`` (``"weights"``, ``"gradients"``, ``"optimizer"``) is divided among the processes;
    ``gathered_layers`` decoder layers' weights are held whole at a time besides (the one computing and the
    one gathered ahead). ``label`` names it in the table's title; ``assumptions`` is one line on what it
    rests on. The estimate is then per process, for ``launch.num_processes`` processes.
    """

    label: str
    shards: tuple[str, ...] = ("weights", "gradients", "optimizer")
    gathered_layers: int = 2
    assumptions: str = ""


@dataclass(frozen=True)
class ObjectiveProfile:
    """What an objective keeps in memory beyond supervised training: an objective plugin's answer to
    ``ftcore_memory_profile``.

    ``sequences_per_example``: the sequences one example puts through the model (DPO: the chosen and the rejected
    answer, 2). ``reference_copy``: with all weights trained, a frozen copy of the model to score against, held in
    the precision's dtype (with adapters the reference is the base with the adapter disabled: no copy).
    """

    label: str = "sft"
    sequences_per_example: int = 1
    reference_copy: bool = False
    assumptions: str = ""


# -- a run --------------------------------------------------------------------------------

@dataclass
class RunResult:
    """What ``ftcore.run`` returns, and what exporters see as ``ctx.result``: outputs and how training went."""

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
    export_errors: list[str] = field(default_factory=list)
    export_details: dict[str, dict[str, Any]] = field(default_factory=dict)   # by exporter: what it checked
    # prompts of a few held-out examples (training examples when nothing is held out), as text with special
    # tokens: what exporters check their outputs with (gguf-export's parity)
    sample_prompts: list[str] = field(default_factory=list)
    # the report's samples (``report.samples`` of them): prompt, reference, and the greedy answers before and
    # after training, so that a script or test reads what the report shows
    samples: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for k in ("output_dir", "model_dir", "config_path", "metrics_path", "report_path"):
            out[k] = str(out[k]) if out[k] is not None else None
        out["exports"] = [str(p) for p in self.exports]
        return out


@dataclass
class RunContext:
    """What every hook gets as ``ctx``: the run's validated config, its plugins, where it writes, and a logger.

    Fields a plugin reads:

    - ``config``: the validated ``ftcore.RunConfig`` (``ctx.section("name")`` is a plugin's own section);
    - ``plugins``: the run's plugins (``names(kind)``, ``hook``, ``call_one(name, hook, **kwargs)``);
    - ``output_dir``: the run's output folder;
    - ``model_path``: the base model's local folder, once resolved (None before);
    - ``rank``, ``world_size``, ``is_main_process``: this process in a multi-process run (0, 1, True
      otherwise); only the main process writes the run's files;
    - ``tokenizer`` and ``added_tokens``: the run's tokenizer and the tokens format plugins added;
    - ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"``, as chosen for this machine;
    - ``base_model_license``: what the base model's card or config says of its licence (None: nothing);
    - ``result``: the ``ftcore.RunResult`` so far; complete (metrics, data statistics, model folder) when
      exporters and ``ftcore_run_finished`` run; an exporter records what it checked of its output in
      ``ctx.result.export_details[its name]`` (a JSON-able dict: summary.json and report.html show it);
    - ``export_output``: where ``ftcore export --output`` asked an exporter to write (None in a run);
    - ``merged_dir``: the folder of the merged model once an exporter merged the adapter (the bundled
      ``merge``), so later exporters reuse it instead of merging again;
    - ``model_run``: the finished ftcore run ``config.model.path`` names, when it names one (``model_path`` is
      then the folder the run trains on: that run's model, its adapter merged into its base, or its base);
    - ``continue_adapter``: when the model is a finished run whose adapter the run keeps training
      (``model.from_run: continue``), that adapter's folder; an adapter plugin loads it trainable on
      ``model_path`` (the run's base) instead of making a new adapter;
    - ``log(message)``: report a line to the user (prefix ``warning:`` for a warning);
    - ``state``: a dict plugins may use to pass things between their own hooks.
    """

    config: RunConfig
    plugins: PluginSet
    output_dir: Path
    log: Callable[[str], None] = print
    model_path: Path | None = None
    rank: int = 0
    world_size: int = 1
    tokenizer: Any = None
    added_tokens: list[str] = field(default_factory=list)
    precision: str = "fp32"
    base_model_license: dict[str, Any] | None = None
    result: RunResult | None = None
    export_output: Path | None = None
    merged_dir: Path | None = None
    continue_adapter: Path | None = None
    model_run: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main_process(self) -> bool:
        """Rank 0 (or the only process): the one that writes the run's files and runs exporters."""
        return self.rank == 0

    def section(self, name: str) -> Any:
        """A plugin's validated config section (a pydantic object)."""
        return self.config.section(name)
