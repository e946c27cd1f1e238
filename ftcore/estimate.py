"""How much memory a fine-tune needs, from the model's config alone (no weights are loaded).

For each method (full fine-tuning, LoRA, QLoRA) the estimate is split into weights,
gradients, optimizer state and activations. The methods are a table of assumptions
(``METHODS``) about what each keeps in memory, not code of the plugins that implement
them; ``ASSUMPTIONS`` lists what every figure rests on, and docs/estimate.md derives them.

The model is built on PyTorch's meta device to count its parameters and find its linear
layers exactly; the activation terms assume a Llama-style decoder (Llama, Mistral, Qwen).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from ftcore.errors import ConfigError

GB = 10**9
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Method:
    """What one adapter method keeps in memory (bytes per parameter, or rules)."""

    name: str
    trains: str                 # "all" weights, or "lora" adapters only
    base_bits: str              # "master": fp32 trained weights; "compute": precision dtype; "nf4": 4-bit
    always_checkpointing: bool = False


# Keyed by the adapter plugin that implements each method (a table, not plugin code).
METHODS = {
    "full": Method("full", trains="all", base_bits="master"),
    "lora": Method("lora", trains="lora", base_bits="compute"),
    "qlora": Method("qlora", trains="lora", base_bits="nf4", always_checkpointing=True),
}
# Optimizer plugins whose state is 8-bit (blockwise, as bitsandbytes keeps it).
EIGHT_BIT_OPTIMIZERS = ("paged-adamw-8bit",)
BNB_MIN_8BIT_SIZE = 4096     # bitsandbytes keeps 32-bit state for smaller tensors
NF4_BLOCK = 64               # 4-bit quantization block (one absmax per block)
DOUBLE_QUANT_BLOCK = 256     # absmax quantized to 8 bits in blocks of 256 (one fp32 constant each)

ASSUMPTIONS = [
    "GB = 10^9 bytes; every sequence is seq_len tokens long (the worst case), batch sequences per step.",
    "full: trained weights fp32 (master weights); with bf16/fp16 precision autocast keeps a 16-bit copy of them "
    "for the step (counted under weights); gradients fp32.",
    "lora: frozen base in the precision's dtype; adapters, their gradients and optimizer state fp32 "
    "(PEFT keeps adapters in fp32).",
    "qlora: every linear layer but lm_head in 4-bit NF4 (0.5 byte/param + absmax per 64 weights; 8-bit absmax "
    "with double quantization); embeddings, lm_head and norms fp32 (prepare_model_for_kbit_training); "
    "gradient checkpointing always on.",
    "optimizer: AdamW keeps 2 fp32 states per trained param (8 bytes); an 8-bit optimizer 2 bytes "
    "(+ blockwise constants), fp32 for tensors under 4096 elements.",
    "activations: per decoder layer and token, full keeps ~9H+2K+4I values, LoRA/QLoRA ~8H+2K+3I plus the "
    "dropout input and rank-r output of each adapted layer (H hidden, K key/value width, I MLP width), in the "
    "precision's dtype; memory-efficient attention (no seq x seq matrix).",
    "gradient checkpointing keeps each layer's input (H per token) and recomputes one layer at a time.",
    "the loss keeps fp32 log-probabilities over the vocabulary and, in backward, two more such tensors "
    "(3 x tokens x vocab x 4 bytes).",
    "total = the sum of the parts (conservative: gradients and activations peak at different moments); "
    "framework overhead (CUDA context, allocator caching, the data pipeline) is not included.",
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

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


# -- reading the model's config ------------------------------------------------------

def load_config(model: str | Path | dict[str, Any]) -> Any:
    """A transformers config from a model folder, a config.json path, a builtin name or a dict."""
    from transformers import AutoConfig

    from ftcore.models import BUILTIN_PREFIX, resolve_model_path

    if isinstance(model, dict):
        data = dict(model)
    else:
        text = str(model)
        path = resolve_model_path(text) if text.startswith(BUILTIN_PREFIX) else Path(text).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--model {text}: no such model folder or config.json. Pass a model folder, the "
                              f"path of its config.json, or ftcore:tiny-llama.")
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

def lora_layers(shape: ModelShape, targets: list[str] | str) -> dict[str, tuple[int, int]]:
    if targets == "all-linear":
        return dict(shape.linear)
    names = [targets] if isinstance(targets, str) else list(targets)
    return {n: io for n, io in shape.linear.items() if n.rsplit(".", 1)[-1] in names}


def optimizer_bytes(tensors: list[int], eight_bit: bool) -> int:
    if not eight_bit:
        return 8 * sum(tensors)
    total = 0
    for n in tensors:
        total += 2 * n + 2 * 4 * math.ceil(n / 256) if n >= BNB_MIN_8BIT_SIZE else 8 * n
    return total


def nf4_bytes(n: int, double_quant: bool = True) -> int:
    blocks = math.ceil(n / NF4_BLOCK)
    constants = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) if double_quant else 4 * blocks
    return math.ceil(n / 2) + constants


def estimate_method(shape: ModelShape, method: str, seq_len: int = 2048, batch: int = 4,
                    gradient_checkpointing: bool = False, precision: str = "bf16", eight_bit_optimizer: bool = False,
                    lora_r: int = 16, lora_targets: list[str] | str = ATTENTION) -> Estimate:
    """Memory for one method; see ASSUMPTIONS."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; the estimate knows {', '.join(METHODS)}.")
    if precision not in BYTES:
        raise ConfigError(f"precision {precision!r}: choose one of {', '.join(BYTES)}.")
    m = METHODS[method]
    b = BYTES[precision]
    tokens = seq_len * batch
    H, K, I, L = shape.hidden, shape.kv_width, shape.intermediate, shape.layers
    checkpointing = gradient_checkpointing or m.always_checkpointing
    notes = []

    if m.trains == "all":
        trained = [shape.params]
        weights = 4 * shape.params + (2 * shape.params if precision != "fp32" else 0)
        per_layer = 9 * H + 2 * K + 4 * I
    else:
        adapted = lora_layers(shape, lora_targets)
        if not adapted:
            raise ConfigError(f"no linear layer of the model matches the LoRA targets {lora_targets!r}.")
        trained = [t for i, o in adapted.values() for t in (lora_r * i, lora_r * o)]
        per_layer = 8 * H + 2 * K + 3 * I + sum(i + lora_r for i, _ in adapted.values()) // L
        if m.base_bits == "nf4":
            other = shape.params - shape.linear_params()
            weights = sum(nf4_bytes(i * o) for i, o in shape.linear.values()) + 4 * other
        else:
            weights = b * shape.params
        weights += 4 * sum(trained)
    n_trained = sum(trained)
    gradients = 4 * n_trained
    optimizer = optimizer_bytes(trained, eight_bit_optimizer)
    layers = (L * H + per_layer) if checkpointing else L * per_layer
    activations = tokens * b * layers + 3 * tokens * shape.vocab * 4
    if checkpointing and not gradient_checkpointing:
        notes.append("gradient checkpointing is always on for this method")
    return Estimate(method=method, weights=weights, gradients=gradients, optimizer=optimizer,
                    activations=activations, trainable_params=n_trained, gradient_checkpointing=checkpointing,
                    notes=notes)


def estimate(model: str | Path | dict[str, Any], plugins: list[str] = (), seq_len: int = 2048, batch: int = 4,
             gradient_checkpointing: bool = False, precision: str = "bf16", lora_r: int = 16,
             lora_targets: list[str] | str = ATTENTION) -> dict[str, Any]:
    """Estimate every method (full, LoRA, QLoRA): the library behind `ftcore estimate`.

    All three are always estimated, side by side as in the reference recipe's table; the
    ones named in ``plugins`` (all, when none is) are marked ``selected``.
    """
    if seq_len < 1 or batch < 1 or lora_r < 1:
        raise ConfigError("--seq-len, --batch and --lora-r must be positive.")
    config = load_config(model)
    shape = model_shape(config, name=str(model) if not isinstance(model, dict) else "config")
    selected = [p for p in plugins if p in METHODS] or list(METHODS)
    eight_bit = any(p in EIGHT_BIT_OPTIMIZERS for p in plugins)
    rows = [estimate_method(shape, m, seq_len, batch, gradient_checkpointing, precision, eight_bit, lora_r,
                            lora_targets) for m in METHODS]
    for row in rows:
        row.selected = row.method in selected
    return {
        "model": shape.name, "params": shape.params, "layers": shape.layers, "hidden": shape.hidden,
        "vocab": shape.vocab, "seq_len": seq_len, "batch": batch, "precision": precision,
        "gradient_checkpointing": gradient_checkpointing,
        "optimizer": "8-bit AdamW" if eight_bit else "AdamW", "lora_r": lora_r,
        "lora_targets": lora_targets if isinstance(lora_targets, str) else list(lora_targets),
        "selected": [m for m in METHODS if m in selected],
        "methods": [r.as_dict() for r in rows], "assumptions": ASSUMPTIONS,
    }


# -- the command ---------------------------------------------------------------------

def _cli_errors(fn: Any) -> Any:
    """The CLI's user-error handling, looked up at call time (no import cycle with ftcore.cli)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ftcore.cli import user_errors

        return user_errors(fn)(*args, **kwargs)

    return wrapper


def _gb(n: int) -> str:
    return f"{n / GB:,.2f}"


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{result['model']}: {result['params'] / 1e9:.2f}B params, batch {result['batch']} x seq "
             f"{result['seq_len']}, {result['precision']}, {result['optimizer']}, gradient checkpointing "
             f"{'on' if result['gradient_checkpointing'] else 'off'}")
    marked = len(result["selected"]) < len(result["methods"])
    table = Table(title=title, caption="* the method named with --plugins" if marked else None)
    for col in ("method", "weights GB", "gradients GB", "optimizer GB", "activations GB", "total GB", "trainable"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in result["methods"]:
        name = r["method"] + (" (ckpt)" if r["gradient_checkpointing"] and not result["gradient_checkpointing"] else "")
        if marked and r["selected"]:
            name = f"[bold]* {name}[/bold]"
        table.add_row(name, _gb(r["weights"]), _gb(r["gradients"]), _gb(r["optimizer"]), _gb(r["activations"]),
                      f"[bold]{_gb(r['total'])}[/bold]", f"{r['trainable_params']:,d}")
    console = Console(width=max(110, Console().width))
    console.print(table)
    console.print("Assumptions:")
    for line in result["assumptions"]:
        console.print(f"  - {line}", highlight=False)


@click.command("estimate")
@click.option("--model", "-m", required=True, help="Model folder, its config.json, or ftcore:tiny-llama (no weights are read).")
@click.option("--plugins", "-p", default="", help="The run's plugins: the adapter method among them (full, lora, "
              "qlora) is marked in the table of all three; paged-adamw-8bit switches to 8-bit optimizer state; "
              "other plugins do not change the estimate.")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per sequence.")
@click.option("--batch", default=4, show_default=True, help="Sequences per device per step.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True,
              help="As training.gradient_checkpointing (qlora always checkpoints).")
@click.option("--precision", type=click.Choice(sorted(BYTES)), default="bf16", show_default=True,
              help="Training precision of the target machine (fp32 on a CPU).")
@click.option("--lora-r", default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-targets", default=",".join(ATTENTION), show_default=True,
              help="LoRA target modules, comma-separated, or all-linear.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (bytes) instead of a table.")
@_cli_errors
def estimate_command(model: str, plugins: str, seq_len: int, batch: int, gradient_checkpointing: bool,
                     precision: str, lora_r: int, lora_targets: str, as_json: bool) -> None:
    """Estimate the memory a fine-tune needs (full, LoRA, QLoRA) from the model's config alone."""
    from ftcore._quiet import quiet_libraries
    from ftcore.errors import PluginError, suggest
    from ftcore.plugins import installed_entry_points

    quiet_libraries()
    names = [p.strip() for p in plugins.split(",") if p.strip()]
    installed = installed_entry_points()
    for name in names:
        if name not in installed:
            raise PluginError(f'unknown plugin "{name}".{suggest(name, installed)} Installed plugins: '
                              f"{', '.join(installed)}.")
    targets: list[str] | str = "all-linear" if lora_targets.strip() == "all-linear" else \
        [t.strip() for t in lora_targets.split(",") if t.strip()]
    result = estimate(model, names, seq_len, batch, gradient_checkpointing, precision, lora_r, targets)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_table(result)
