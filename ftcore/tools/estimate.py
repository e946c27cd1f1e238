"""How much memory a fine-tune needs, from the model's config alone (no weights are loaded).

The core knows generic rules only: how much memory weights, gradients, optimizer state and
activations take given a *profile* of what a method keeps in memory. Each plugin states its
own profile through the ``ftcore_memory_profile`` hook: an adapter method answers with a
``MemoryProfile`` (all weights trained or adapters only, how the base weights are stored,
the adapters' rank and targets read from its own config section), an optimizer with an
``OptimizerProfile`` (bytes of state per trained parameter). Every installed plugin that
answers with a ``MemoryProfile`` gets a row, side by side; the ones the run names with
``--plugins`` are marked. ``ASSUMPTIONS`` lists what every figure rests on, each profile
adds its own line, and docs/estimate.md derives them.

The model is built on PyTorch's meta device to count its parameters and find its linear
layers exactly; the activation terms assume a Llama-style decoder (Llama, Mistral, Qwen).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftcore.config.layering import deep_merge
from ftcore.config.validation import validate
from ftcore.errors import ConfigError, PluginError
from ftcore.models.builtin import BUILTIN_PREFIX
from ftcore.models.hub import fetch_config, parse_hub_id
from ftcore.models.paths import resolve_model_path
from ftcore.registry.discovery import identify, installed_entry_points
from ftcore.registry.resolution import plugin_schemas
from ftcore.registry.selection import check_installed, load_all
from ftcore.types import MemoryProfile, ObjectiveProfile, OptimizerProfile, RunContext, ShardingProfile

GB = 10**9
CUDA_CONTEXT = GB // 2       # per process: driver context, cuBLAS/cuDNN handles and the kernels they load
ALLOCATOR_SHARE = 0.05       # PyTorch's caching allocator: reserved blocks beyond the tensors they hold
# On a CPU the tensors share the process's heap with the training loop's own memory (the data loader and
# Trainer state, malloc's per-thread arenas and what it keeps after frees): measured 22-32 MB over the tensors
# on two-step runs of every method (tests/test_estimate.py), whatever their size.
CPU_RUNTIME = 32 * 10**6
DEVICES = ("cuda", "cpu")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BLOCK_4BIT = 64              # 4-bit quantization block (one absmax per block)
DOUBLE_QUANT_BLOCK = 256     # absmax quantized to 8 bits in blocks of 256 (one fp32 constant each)


# Without an optimizer plugin that says otherwise, the trainer builds torch's AdamW.
DEFAULT_OPTIMIZER = OptimizerProfile(label="AdamW", state_bytes=8)

LOSS_ASSUMPTION = "the loss ({loss})."

ASSUMPTIONS = [
    "GB = 10^9 bytes; every sequence is seq_len tokens long (the worst case), batch sequences per step.",
    "trained parameters (all weights, or the adapters) and their gradients are fp32; without an optimizer "
    "plugin that says otherwise, AdamW keeps 2 fp32 states per trained param (8 bytes).",
    "activations: per decoder layer and token, a method training all weights keeps ~9H+2K+4I values, one "
    "training adapters only ~8H+2K+3I plus the dropout input and rank-r output of each adapted layer (H hidden, "
    "K key/value width, I MLP width), in the precision's dtype; memory-efficient attention (no seq x seq matrix).",
    "gradient checkpointing keeps each layer's input (H per token) and recomputes one layer at a time.",
    "with 4-bit base weights the residual stream (one layer input, H per token and layer) is fp32 whatever the "
    "precision: the embeddings and norms are fp32 and bitsandbytes' 4-bit layers return their input's dtype.",
    LOSS_ASSUMPTION,
    "total = the sum of the parts (conservative: gradients and activations peak at different moments), plus, "
    "the framework's overhead: on a CUDA device the CUDA context (~0.5 GB per process: the driver, cuBLAS and "
    "the kernels loaded) and the caching allocator's fragmentation (~5% of the tensors); on a CPU (--device "
    "cpu) the training loop's own heap memory (~32 MB, measured).",
]


@dataclass
class ModelShape:
    """What the estimate needs to know about a model, read from its config on the meta device."""

    name: str
    params: int
    hidden: int
    kv_width: int
    intermediate: int
    layers: int
    vocab: int
    linear: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (in, out), all but lm_head
    head_params: int = 0                                                 # lm_head (untied) parameters

    def linear_params(self) -> int:
        return sum(i * o for i, o in self.linear.values())


@dataclass
class Estimate:
    method: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    trainable_params: int
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)
    selected: bool = True        # named with --plugins (every method is, when none is named)
    adapter_rank: int | None = None                  # for a method that trains adapters only
    adapter_targets: list[str] | str | None = None
    overhead: int = 0            # the framework's own memory (CUDA context and allocator, or the CPU loop's heap)

    @property
    def tensors(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> int:
        return self.tensors + self.overhead

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tensors": self.tensors, "total": self.total}


# -- reading the model's config ------------------------------------------------------

def load_config(model: str | Path | dict[str, Any], log: Callable[[str], None] = print) -> Any:
    """A transformers config from a model folder, a config.json path, a Hub id, a builtin name or a dict."""
    from transformers import AutoConfig

    if isinstance(model, dict):
        data = dict(model)
    else:
        text = str(model)
        ref = parse_hub_id(text)
        if ref is not None:
            path = fetch_config(ref, log)   # config.json alone: no weights are downloaded
        elif text.startswith(BUILTIN_PREFIX):
            path = resolve_model_path(text, log=log)
        else:
            path = Path(text).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--model {text}: no such model folder or config.json. Pass a model folder, the "
                              f"path of its config.json, a Hub id (org/name), or ftcore:tiny-llama.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable JSON model config ({exc}).") from None
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"--model {model if not isinstance(model, dict) else 'config'}: the config has no "
                          f"model_type (e.g. \"llama\"), so its architecture is unknown.")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"model_type {model_type!r}: not an architecture this transformers knows ({exc}).") from None


def model_shape(config: Any, name: str = "model") -> ModelShape:
    """Count parameters and linear layers on the meta device: exact, and no memory is used."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not head}
    seen, params = set(), 0
    for p in model.parameters():          # tied weights count once
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(name=name, params=params, hidden=hidden, kv_width=kv * head_dim,
                      intermediate=getattr(config, "intermediate_size", 4 * hidden),
                      layers=config.num_hidden_layers, vocab=config.vocab_size, linear=linear,
                      head_params=0 if tied or head is None else head.weight.numel())


# -- the estimate --------------------------------------------------------------------

@dataclass
class LossTerm:
    """The loss's memory: which path, over how many positions (rows), in chunks of how many."""

    path: str                   # "chunked" or "plain"
    rows: int                   # positions whose logits are computed
    chunk_size: int | None      # positions per chunk (chunked)
    bytes: int
    buffers: int = 3            # rows x vocab fp32 tensors held per chunk (chunked)

    def describe(self) -> str:
        if self.path == "plain":
            return (f"plain: logits for all {self.rows:,d} positions at once; fp32 log-probabilities and, in backward, "
                    f"two more such tensors: 3 x {self.rows:,d} x vocab x 4 bytes")
        return (f"chunked: the output layer and cross-entropy over {self.rows:,d} positions in chunks of "
                f"{self.chunk_size:,d}; one chunk at a time, "
                + ("computed directly in one fp32 buffer (1 x chunk x vocab x 4 bytes)" if self.buffers == 1 else
                   "its logits, log-probabilities and gradient (3 x chunk x vocab x 4 bytes)")
                + " plus the rows' hidden states and their gradient (2 x rows x hidden x 4 bytes); a fused "
                "kernel (liger-kernel, cut-cross-entropy) keeps as much or less")


def loss_term(shape: ModelShape, tokens: int, loss: str = "auto", chunk_size: int | None = None,
              sparse_logits: bool = True, supervised_share: float = 1.0, precision: str = "bf16") -> LossTerm:
    """The loss's memory as ftcore computes it (ftcore.training.loss): ``loss`` as training.loss (auto, chunked
    and fused are counted as chunked), ``chunk_size`` as training.loss_chunk_size, and with ``sparse_logits``
    only the supervised share of the positions. In fp32 a chunk of a plain output layer is computed directly in
    one fp32 buffer (logits, then softmax, then their gradient); under 16-bit autocast through autograd, which
    holds three (logits, log-probabilities, gradient)."""
    from ftcore.training.loss import auto_chunk_size

    rows = max(1, math.ceil(tokens * supervised_share)) if sparse_logits else tokens
    if loss == "plain":
        return LossTerm("plain", rows, None, 3 * rows * shape.vocab * 4)
    chunk = chunk_size or auto_chunk_size(shape.vocab)
    buffers = 1 if precision == "fp32" else 3
    return LossTerm("chunked", rows, chunk, buffers * min(rows, chunk) * shape.vocab * 4
                    + 2 * rows * shape.hidden * 4, buffers)


def adapted_layers(shape: ModelShape, targets: tuple[str, ...] | list[str] | str) -> dict[str, tuple[int, int]]:
    """The linear layers (name -> (in, out)) whose last name part is a target, or all of them for all-linear."""
    if targets == "all-linear":
        return dict(shape.linear)
    names = [targets] if isinstance(targets, str) else list(targets)
    return {n: io for n, io in shape.linear.items() if n.rsplit(".", 1)[-1] in names}


def quantized_4bit_bytes(n: int, double_quant: bool = True) -> int:
    """A 4-bit weight tensor of n elements with its blockwise absmax constants."""
    blocks = math.ceil(n / BLOCK_4BIT)
    constants = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) if double_quant else 4 * blocks
    return math.ceil(n / 2) + constants


def base_weight_bytes(shape: ModelShape, profile: MemoryProfile, precision: str) -> int:
    """The model's own weights, as the profile stores them."""
    if profile.base_storage == "master":        # fp32, plus the 16-bit copy autocast keeps for the step
        return 4 * shape.params + (BYTES[precision] * shape.params if precision != "fp32" else 0)
    if profile.base_storage == "4bit":          # every linear layer but the head in 4 bits, the rest fp32
        other = shape.params - shape.linear_params()
        return sum(quantized_4bit_bytes(i * o, profile.double_quant) for i, o in shape.linear.values()) + 4 * other
    return BYTES[precision] * shape.params


def estimate_method(shape: ModelShape, profile: MemoryProfile, name: str = "method", seq_len: int = 2048,
                    batch: int = 4, gradient_checkpointing: bool = False, precision: str = "bf16",
                    optimizer: OptimizerProfile = DEFAULT_OPTIMIZER, device: str = "cuda",
                    loss: LossTerm | None = None, objective: ObjectiveProfile | None = None) -> Estimate:
    """Memory for one method, from its profile alone; see ASSUMPTIONS. ``loss`` defaults to the chunked loss
    with every position supervised. ``objective``: what a preference objective adds (its sequences per example;
    a frozen reference copy of a fully trained model)."""
    if precision not in BYTES:
        raise ConfigError(f"precision {precision!r}: choose one of {', '.join(BYTES)}.")
    if device not in DEVICES:
        raise ConfigError(f"device {device!r}: choose one of {', '.join(DEVICES)}.")
    b = BYTES[precision]
    tokens = seq_len * batch * (objective.sequences_per_example if objective else 1)
    H, K, I, L = shape.hidden, shape.kv_width, shape.intermediate, shape.layers
    checkpointing = gradient_checkpointing or profile.always_checkpointing
    notes = []
    weights = base_weight_bytes(shape, profile, precision)

    if profile.trains == "all":
        trained = [shape.params]
        per_layer = 9 * H + 2 * K + 4 * I
    else:
        r = profile.adapter_rank
        adapted = adapted_layers(shape, profile.adapter_targets)
        if not adapted:
            known = sorted({n.rsplit(".", 1)[-1] for n in shape.linear})
            raise ConfigError(f'plugin "{name}": no linear layer of the model matches its adapter targets '
                              f"{_targets(profile.adapter_targets)!r}. The model's linear layers: "
                              f"{', '.join(known)} (or all-linear).")
        trained = [t for i, o in adapted.values() for t in (r * i, r * o)]
        per_layer = 8 * H + 2 * K + 3 * I + sum(i + r for i, _ in adapted.values()) // L
        weights += 4 * sum(trained)               # the adapters themselves, fp32
    n_trained = sum(trained)
    gradients = 4 * n_trained
    layers = (L * H + per_layer) if checkpointing else L * per_layer
    # 4-bit bases: the residual stream between the fp32 norms and bitsandbytes' layers stays fp32
    stream_extra = (4 - b) * L * H if profile.base_storage == "4bit" else 0
    loss = loss or loss_term(shape, tokens, precision=precision)
    activations = tokens * (b * layers + stream_extra) + loss.bytes
    if checkpointing and not gradient_checkpointing:
        notes.append("gradient checkpointing is always on for this method")
    if objective is not None and objective.reference_copy and profile.trains == "all":
        weights += b * shape.params
        notes.append(f"{objective.label}: a frozen reference copy of the model ({b * shape.params / GB:.2f} GB "
                     f"in {precision}) is counted in the weights")
    if objective is not None and objective.sequences_per_example > 1:
        notes.append(f"{objective.label}: {objective.sequences_per_example} sequences per example "
                     f"({seq_len * batch * objective.sequences_per_example} tokens a step)")
    adapters = profile.trains == "adapters"
    row = Estimate(method=name, weights=weights, gradients=gradients, optimizer=optimizer.bytes_for(trained),
                   activations=activations, trainable_params=n_trained, gradient_checkpointing=checkpointing,
                   notes=notes, adapter_rank=profile.adapter_rank if adapters else None,
                   adapter_targets=_targets(profile.adapter_targets) if adapters else None)
    row.overhead = CUDA_CONTEXT + int(ALLOCATOR_SHARE * row.tensors) if device == "cuda" else CPU_RUNTIME
    return row


def shard_row(row: Estimate, shape: ModelShape, sharding: ShardingProfile, processes: int) -> Estimate:
    """One process's share of ``row`` under a sharding strategy: what ``sharding.shards`` names split among the
    processes, plus ``sharding.gathered_layers`` decoder layers' weights held whole at once (the other processes'
    part of them gathered in)."""
    if processes <= 1:
        return row
    n = processes
    if "weights" in sharding.shards:
        per_layer_share = (shape.params - shape.vocab * shape.hidden - shape.head_params) / max(shape.params, 1)
        layer_bytes = row.weights * per_layer_share / max(shape.layers, 1)
        gathered = int(min(sharding.gathered_layers, shape.layers) * layer_bytes * (n - 1) / n)
        row.weights = math.ceil(row.weights / n) + gathered
    if "gradients" in sharding.shards:
        row.gradients = math.ceil(row.gradients / n)
    if "optimizer" in sharding.shards:
        row.optimizer = math.ceil(row.optimizer / n)
    row.notes.append(f"{sharding.label}: per process of {n}: {', '.join(sharding.shards)} split {n} ways"
                     + (f", plus {sharding.gathered_layers} decoder layers' weights gathered whole"
                        if "weights" in sharding.shards else ""))
    return row


def _targets(targets: tuple[str, ...] | str) -> list[str] | str:
    return targets if isinstance(targets, str) else list(targets)


def estimate_profiles(shape: ModelShape, profiles: dict[str, MemoryProfile], seq_len: int = 2048, batch: int = 4,
                      gradient_checkpointing: bool = False, precision: str = "bf16",
                      optimizer: OptimizerProfile = DEFAULT_OPTIMIZER, device: str = "cuda",
                      loss: LossTerm | None = None, objective: ObjectiveProfile | None = None) -> list[Estimate]:
    """One row per method, in the order given, from the profiles alone (no plugin is called)."""
    return [estimate_method(shape, profile, name, seq_len, batch, gradient_checkpointing, precision, optimizer,
                            device, loss, objective) for name, profile in profiles.items()]


@dataclass
class Profiles:
    """What the plugins said about their memory, for one estimate."""

    methods: dict[str, MemoryProfile]                   # plugin name -> profile, in table order
    optimizer: OptimizerProfile = DEFAULT_OPTIMIZER
    optimizer_plugin: str | None = None
    objective: ObjectiveProfile | None = None           # the named objective's, when it describes one
    sharding: ShardingProfile | None = None             # the named strategy's, when it shards memory
    sharding_plugin: str | None = None
    config: Any = None                                  # the validated RunConfig the plugins were asked with
    run_plugins: list[str] = field(default_factory=list)   # named, and objects passed: the run's plugins
    notes: list[str] = field(default_factory=list)


def gather_profiles(model_name: str, plugins: list[str] | tuple = (), settings: dict[str, Any] | None = None,
                    training: dict[str, Any] | None = None, plugin_objects: list[Any] | tuple = ()) -> Profiles:
    """Ask every installed plugin (and each object passed) for its memory profile.

    Plugins are found by the core's discovery; one that fails to import is left out with a
    note, unless the run names it. The config the plugins read is built and validated as for
    ``ftcore run``: ``training`` and then ``settings`` (e.g. ``{"lora": {"r": 8}}``, what
    ``--set`` gives) over the defaults, each plugin's section checked by its own schema.
    """
    names = list(dict.fromkeys(plugins))
    installed = installed_entry_points()
    check_installed(names, installed)
    chosen, broken = load_all(plugin_objects, installed)
    settings = settings or {}
    for name in [*names, *settings]:
        if name in broken:
            raise PluginError(broken[name])
    raw = deep_merge({"plugins": names, "model": {"path": model_name}, "training": training or {}}, settings)
    config = validate(raw, plugin_schemas(chosen), [n for n in installed if n not in broken])
    objects = [identify(o, installed).name for o in plugin_objects]
    run_plugins = [*names, *(n for n in objects if n not in names)]
    order = [n for n in installed if n in chosen.names() and n not in objects] + objects
    ctx = RunContext(config=config, plugins=chosen, output_dir=Path(config.output_dir))

    found = Profiles(methods={}, config=config, run_plugins=run_plugins)
    for name in order:
        for answer in chosen.call_one(name, "ftcore_memory_profile", config=config, ctx=ctx):
            if isinstance(answer, MemoryProfile):
                found.methods.setdefault(name, answer)
            elif isinstance(answer, OptimizerProfile):
                if name in run_plugins and found.optimizer_plugin is None:
                    found.optimizer, found.optimizer_plugin = answer, name
            elif isinstance(answer, ObjectiveProfile):
                if name in run_plugins and found.objective is None:
                    found.objective = answer
            elif isinstance(answer, ShardingProfile):
                if name in run_plugins and found.sharding is None:
                    found.sharding, found.sharding_plugin = answer, name
            elif answer is not None:
                raise PluginError(f'plugin "{name}" ({chosen.origin(name)}) returned {type(answer).__name__} '
                                  f"from ftcore_memory_profile; expected an ftcore.MemoryProfile, an "
                                  f"ftcore.OptimizerProfile, an ftcore.ObjectiveProfile, an "
                                  f"ftcore.ShardingProfile or None.")
    for name in run_plugins:
        kind = chosen.kind(name) if name in chosen.names() else None
        if kind == "adapter" and name not in found.methods:
            found.notes.append(f'adapter plugin "{name}" does not describe its memory (ftcore_memory_profile), '
                               f"so it has no row.")
        if kind == "optimizer" and name != found.optimizer_plugin:
            found.notes.append(f'optimizer plugin "{name}" does not describe its memory (ftcore_memory_profile): '
                               f"{found.optimizer.label} assumed.")
    for name, error in broken.items():
        found.notes.append(f"left out: {error.split(' Fix or uninstall')[0]}")
    if not found.methods:
        raise PluginError("no installed plugin describes an adapter method's memory (ftcore_memory_profile), "
                          "so there is nothing to estimate. `ftcore plugins` lists what is installed.")
    return found


def estimate(model: str | Path | dict[str, Any], plugins: list[str] | tuple = (), seq_len: int = 2048,
             batch: int = 4, gradient_checkpointing: bool = False, precision: str = "bf16",
             settings: dict[str, Any] | None = None, plugin_objects: list[Any] | tuple = (),
             log: Callable[[str], None] = print, device: str = "cuda",
             supervised_share: float = 1.0, processes: int | None = None) -> dict[str, Any]:
    """Estimate every installed adapter method: the library behind `ftcore estimate`.

    Every method whose plugin describes its memory is estimated, side by side; the ones named
    in ``plugins`` (all, when none is) are marked ``selected``. ``settings`` overrides config
    keys as ``--set`` does (a plugin's own section, e.g. its rank; ``training.batch_size``,
    ``training.gradient_checkpointing`` and ``training.precision`` override the arguments).
    ``plugin_objects`` are plugin objects used in addition to the installed ones, as in
    ``ftcore.run(plugins=...)``. ``device`` is the target, for the framework's overhead: on ``cuda`` the CUDA
    context and the allocator's fragmentation, on ``cpu`` the training loop's own heap memory. The loss is counted as the run would compute it
    (``training.loss``, ``training.loss_chunk_size``, ``training.sparse_logits`` from ``settings``);
    ``supervised_share`` is the share of positions whose next token is supervised (with sparse logits only
    they get logits; 1.0, the default, is the worst case: every token, as for pretraining-style data).
    ``processes`` (default: ``launch.num_processes`` from ``settings``): with a strategy in ``plugins`` that
    shards memory (``ftcore.ShardingProfile``, the bundled fsdp), each row is one process's share.
    """
    if seq_len < 1 or batch < 1:
        raise ConfigError("--seq-len and --batch must be positive.")
    if not 0 < supervised_share <= 1:
        raise ConfigError(f"--supervised-share {supervised_share}: the share of supervised tokens is above 0 and at "
                          f"most 1 (0.3 for answers that are 30% of each example's tokens).")
    name = str(model) if not isinstance(model, dict) else "config"
    training = {"batch_size": batch, "gradient_checkpointing": gradient_checkpointing, "precision": precision}
    found = gather_profiles(name, plugins, settings, training, plugin_objects)
    train = found.config.training
    batch, gradient_checkpointing, precision = train.batch_size, train.gradient_checkpointing, train.precision
    if precision not in BYTES:
        raise ConfigError(f"precision {precision!r}: the estimate needs the target machine's training precision, "
                          f"one of {', '.join(BYTES)}.")
    config = load_config(model, log)
    shape = model_shape(config, name=name)
    path, sparse, tokens = train.loss, train.sparse_logits, seq_len * batch
    if found.objective is not None and found.objective.label != "sft":
        # a preference objective's loss is TRL's: the logits of every position of every sequence, at once
        path, sparse, tokens = "plain", False, tokens * found.objective.sequences_per_example
    loss = loss_term(shape, tokens, path, train.loss_chunk_size, sparse, supervised_share, precision)
    rows = estimate_profiles(shape, found.methods, seq_len, batch, gradient_checkpointing, precision,
                             found.optimizer, device, loss, found.objective)
    processes = processes or found.config.launch.num_processes
    if processes < 1:
        raise ConfigError(f"--num-processes {processes}: at least 1.")
    if found.sharding is not None:
        rows = [shard_row(row, shape, found.sharding, processes) for row in rows]
    selected = [r.method for r in rows if r.method in found.run_plugins] or [r.method for r in rows]
    for row in rows:
        row.selected = row.method in selected
    optimizer_line = found.optimizer.assumptions and f"{found.optimizer_plugin}: {found.optimizer.assumptions}"
    return {
        "model": shape.name, "params": shape.params, "layers": shape.layers, "hidden": shape.hidden,
        "vocab": shape.vocab, "seq_len": seq_len, "batch": batch, "precision": precision,
        "gradient_checkpointing": gradient_checkpointing, "optimizer": found.optimizer.label, "device": device,
        "loss": {"path": loss.path, "rows": loss.rows, "chunk_size": loss.chunk_size, "bytes": loss.bytes,
                 "supervised_share": supervised_share if sparse else 1.0},
        "objective": found.objective.label if found.objective else "sft",
        "processes": processes, "sharding": found.sharding.label if found.sharding else None,
        "selected": selected, "methods": [r.as_dict() for r in rows],
        "assumptions": [*ASSUMPTIONS[:2], *(f"{n}: {p.assumptions}" for n, p in found.methods.items() if p.assumptions),
                        *([optimizer_line] if optimizer_line else []),
                        *([f"{found.sharding_plugin}: {found.sharding.assumptions}"]
                          if found.sharding and found.sharding.assumptions else []),
                        *(a.format(loss=loss.describe()) for a in ASSUMPTIONS[2:])],
        "notes": found.notes,
    }
