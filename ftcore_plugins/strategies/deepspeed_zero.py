"""DeepSpeed ZeRO (stages 1-3, CPU/NVMe offload) over several processes and machines.

What it does, all through hooks:

- ``ftcore_launch``: start the ranks through an existing launcher (PyTorch's elastic
  launcher, i.e. torchrun, or DeepSpeed's own when a hostfile is given), stream their
  output, stop them all when one fails, and return the run's exit status;
- ``ftcore_training_arguments``: give the trainer a DeepSpeed config in which the
  batch size, accumulation, learning rate, precision and clipping are ``"auto"`` (filled
  by transformers from the run's settings, so the two can never disagree);
- under stage 3, have transformers build the model inside ``zero.Init`` (each rank holds
  only its shard from the start), and switch that off again before exporters load models;
- refuse combinations that cannot work, before anything is launched.

The DeepSpeed config is layered: ftcore's defaults < the user's own JSON
(``config_file``) < the keys set explicitly in this plugin's section.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

import ftcore
from ftcore import ConfigError

NAME = "deepspeed-zero"
Offload = Literal["none", "cpu", "nvme"]
SizeOrAuto = int | Literal["auto"]

# The section's keys that are zero_optimization keys of the same name.
ZERO_KEYS = ("stage", "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
             "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
             "stage3_max_reuse_distance")
STAGE3_ONLY = ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
               "stage3_max_live_parameters", "stage3_max_reuse_distance")

# DeepSpeed keys that ftcore fills from the run's own settings; a config_file may only say "auto".
RUN_OWNED = {
    "train_batch_size": "training.batch_size x training.gradient_accumulation x launch.num_processes",
    "train_micro_batch_size_per_gpu": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation",
    "gradient_clipping": "training.max_grad_norm",
    "bf16.enabled": "training.precision",
    "fp16.enabled": "training.precision",
    "optimizer.params.lr": "training.learning_rate",
    "optimizer.params.betas": "training.adam_beta1 / adam_beta2",
    "optimizer.params.eps": "training.adam_epsilon",
    "optimizer.params.weight_decay": "training.weight_decay",
    "scheduler.params.warmup_max_lr": "training.learning_rate",
    "scheduler.params.warmup_num_steps": "training.warmup_ratio",
    "scheduler.params.total_num_steps": "training.epochs / max_steps",
}


class DeepSpeedZeroConfig(ftcore.PluginConfig):
    stage: Literal[1, 2, 3] = Field(2, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, "
                                    "3 also the weights.")
    offload_optimizer: Offload = Field("none", description="Keep optimizer state in CPU memory (stages 1-3) "
                                       "or on NVMe (stage 3, needs nvme_path).")
    offload_param: Offload = Field("none", description="Keep weights in CPU memory or on NVMe (stage 3 only).")
    nvme_path: str | None = Field(None, description="Folder on a fast local NVMe drive for nvme offload.")
    pin_memory: bool = Field(False, description="Page-lock offloaded memory (faster transfers, more RAM).")
    overlap_comm: bool | None = Field(None, description="Overlap gradient reduction with the backward pass "
                                      "(default: DeepSpeed's).")
    contiguous_gradients: bool | None = Field(None, description="Copy gradients into one buffer as produced.")
    reduce_bucket_size: SizeOrAuto | None = Field("auto", description="Elements reduced at once; auto: hidden^2.")
    allgather_bucket_size: int | None = Field(None, description="Elements all-gathered at once (stages 1-2).")
    stage3_prefetch_bucket_size: SizeOrAuto | None = Field("auto", description="Stage 3: elements prefetched "
                                                          "ahead of use; auto: 0.9 x hidden^2.")
    stage3_param_persistence_threshold: SizeOrAuto | None = Field(
        "auto", description="Stage 3: weights smaller than this stay whole on every rank; auto: 10 x hidden.")
    stage3_max_live_parameters: int | None = Field(None, description="Stage 3: most weights gathered at once.")
    stage3_max_reuse_distance: int | None = Field(None, description="Stage 3: keep gathered weights reused "
                                                  "within this distance.")
    config_file: str | None = Field(None, description="Your own DeepSpeed JSON, merged under the keys set here; "
                                    "batch, accumulation, lr, precision and clipping must be absent or \"auto\".")
    launcher: Literal["auto", "torchrun", "deepspeed"] = Field(
        "auto", description="auto: DeepSpeed's launcher with a hostfile, else PyTorch's (torchrun).")
    shutdown_timeout: int = Field(10, ge=1, description="Seconds the other ranks get to stop after one fails.")

    @field_validator("config_file")
    @classmethod
    def _file_is_json(cls, value: str | None) -> str | None:
        if value is not None:
            read_user_config(value)
        return value


@ftcore.hookimpl
def ftcore_config_schema():
    return DeepSpeedZeroConfig


# -- the DeepSpeed config --------------------------------------------------------------

def read_user_config(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"DeepSpeed config file {file} not found")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: the top level must be a JSON object")
    return data


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _zero_layer(settings: DeepSpeedZeroConfig, fields: set[str], stage: int) -> dict[str, Any]:
    zero: dict[str, Any] = {}
    for key in ZERO_KEYS:
        value = getattr(settings, key)
        if key in fields and value is not None and (stage == 3 or key not in STAGE3_ONLY):
            zero[key] = value
    for key in ("offload_optimizer", "offload_param"):
        device = getattr(settings, key)
        if key in fields and device != "none":
            zero[key] = {"device": device, "pin_memory": settings.pin_memory}
            if device == "nvme":
                zero[key]["nvme_path"] = settings.nvme_path
    return zero


def deepspeed_config(settings: DeepSpeedZeroConfig) -> dict[str, Any]:
    """The DeepSpeed config for this section: defaults < config_file < keys set explicitly; checked."""
    user = read_user_config(settings.config_file) if settings.config_file else {}
    origin = f"deepspeed-zero.config_file ({settings.config_file})" if settings.config_file else ""
    _check_run_owned(user, origin)
    explicit = set(settings.model_fields_set)
    user_stage = _get(user, "zero_optimization.stage")
    stage = settings.stage if "stage" in explicit or user_stage is None else user_stage
    if stage not in (1, 2, 3):
        raise ConfigError(f"{origin}: zero_optimization.stage must be 1, 2 or 3 with ftcore (got {stage!r}).")
    defaults = {
        # train_batch_size is left out: DeepSpeed derives it (micro batch x accumulation x ranks).
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
        "zero_optimization": _zero_layer(settings, set(DeepSpeedZeroConfig.model_fields) - explicit, stage),
    }
    ds = ftcore.deep_merge(ftcore.deep_merge(defaults, user), {"zero_optimization": _zero_layer(settings, explicit, stage)})
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]   # transformers would fill it before it knows the number of ranks
    zero = ds["zero_optimization"]
    zero["stage"] = stage
    offloaded = (_get(zero, "offload_optimizer.device") or "none") != "none"
    if offloaded and "optimizer" not in ds and ds.get("zero_force_ds_cpu_optimizer", True):
        # Offloaded optimizer state needs DeepSpeed's own CPU optimizer (DeepSpeedCPUAdam, compiled on first
        # use), unless the user's file allows the trainer's torch AdamW with zero_force_ds_cpu_optimizer: false.
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto"}}
    if stage == 3:
        # Gather the shards when saving, so the saved model is a normal (safetensors) model.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    else:
        for key in STAGE3_ONLY:
            zero.pop(key, None)
    _check_zero(zero, origin)
    return ds


def _check_run_owned(user: dict[str, Any], origin: str) -> None:
    for key, owner in RUN_OWNED.items():
        value = _get(user, key)
        if value is not None and value != "auto":
            raise ConfigError(f'{origin} sets {key} = {value!r}, which ftcore fills from {owner} so the two can '
                              f'never disagree. Remove it from the file (or write "auto") and set {owner} instead.')


def _check_zero(zero: dict[str, Any], origin: str) -> None:
    where = origin or "deepspeed-zero"
    stage = zero["stage"]
    for key in ("offload_optimizer", "offload_param"):
        device = _get(zero, f"{key}.device") or "none"
        if device == "none":
            continue
        if key == "offload_param" and stage != 3:
            raise ConfigError(f"{where}: offload_param={device} needs stage 3 (only stage 3 shards the weights); "
                              f"set deepspeed-zero.stage=3 or offload_param=none.")
        if device == "nvme":
            if stage != 3:
                raise ConfigError(f"{where}: {key}=nvme needs stage 3 (ZeRO-Infinity); use cpu, or stage 3.")
            if not _get(zero, f"{key}.nvme_path"):
                raise ConfigError(f"{where}: {key}=nvme needs a folder on a fast local drive: "
                                  f"set deepspeed-zero.nvme_path.")
        elif device != "cpu":
            raise ConfigError(f"{where}: {key}.device must be none, cpu or nvme (got {device!r}).")


# -- combinations ----------------------------------------------------------------------


def check_combination(config: Any, ctx: Any, ds: dict[str, Any]) -> None:
    """Refuse, with the reason, the combinations that cannot work with ZeRO."""
    zero = ds["zero_optimization"]
    stage = zero["stage"]
    for name in ctx.plugins.names("optimizer"):
        raise ConfigError(
            f'plugin "{name}" builds its own optimizer, which ftcore does not hand to DeepSpeed ZeRO: ZeRO owns the '
            f"optimizer so it can shard its state across ranks (and offload it), replacing its parameter groups "
            f"with flat fp32 shards; an optimizer built for the model's own parameters (8-bit and paged ones keep "
            f"per-parameter state and settings) is not made for that, and DeepSpeed itself only accepts it as "
            f'"untested". Leave "{name}" out of --plugins, or choose a DeepSpeed optimizer in the "optimizer" '
            f'section of deepspeed-zero.config_file (its params set to "auto").')
    for name in ftcore.quantized_adapters(config, ctx):
        if stage == 3:
            raise ConfigError(
                f'plugin "{name}" loads 4-bit quantized base weights, which ZeRO stage 3 cannot shard here: '
                f"stage 3 partitions every weight tensor, and bitsandbytes' packed 4-bit tensors only shard when "
                f"they are stored in the model's own dtype (bnb_4bit_quant_storage), a setup ftcore does not "
                f"verify. Use deepspeed-zero.stage=2 (the frozen 4-bit weights stay whole on each rank, the LoRA "
                f"gradients and optimizer state are sharded), or lora without quantization.")
        if (_get(zero, "offload_param.device") or "none") != "none":
            raise ConfigError(f'plugin "{name}" loads quantized weights, which DeepSpeed cannot offload: '
                              f"set deepspeed-zero.offload_param=none.")


def check_precision(precision: str) -> None:
    """In a rank (the launching host may have no GPU while the ranks' machines do): DeepSpeed's CPU accelerator
    trains in fp32 only, as transformers hands bf16/fp16 DeepSpeed runs to GPUs."""
    if precision == "fp32":
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        raise ConfigError(f'training.precision "{precision}" with deepspeed-zero needs GPUs: DeepSpeed on CPU '
                          f'ranks trains in fp32. Set training.precision to "fp32" or "auto".')


def is_quantized(model: Any) -> bool:
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


# -- hooks in each rank ----------------------------------------------------------------

@ftcore.hookimpl
def ftcore_run_started(config: Any, ctx: Any) -> None:
    ds = deepspeed_config(config.section(NAME))
    check_combination(config, ctx, ds)
    check_precision(ctx.precision)
    ctx.state["deepspeed_config"] = ds
    if ds["zero_optimization"]["stage"] == 3:
        ctx.state["zero3_model_construction"] = zero3_model_construction(ds, config, ctx)
    if ctx.is_main_process:
        ftcore.write_json_atomic(ctx.output_dir / "deepspeed.json", ds)


def zero3_model_construction(ds: dict[str, Any], config: Any, ctx: Any) -> Any:
    """Under stage 3, let transformers build the model inside DeepSpeed's zero.Init, so that each rank
    holds only its shard of the weights from the start instead of a whole copy.

    transformers looks for a live ``HfDeepSpeedConfig`` (it keeps only a weak reference, so the
    caller keeps this object). It needs concrete values where the trainer's config says "auto";
    the trainer's own, complete config replaces it when training starts.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    t = config.training
    early = {k: v for k, v in copy.deepcopy(ds).items() if k not in ("optimizer", "scheduler")}
    early.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation,
                 gradient_clipping=t.max_grad_norm, bf16={"enabled": ctx.precision == "bf16"},
                 fp16={"enabled": ctx.precision == "fp16"})
    early["zero_optimization"] = {k: v for k, v in early["zero_optimization"].items() if v != "auto"}
    return HfDeepSpeedConfig(early)


@ftcore.hookimpl
def ftcore_model_loaded(model: Any, ctx: Any) -> None:
    if ctx.state["deepspeed_config"]["zero_optimization"]["stage"] == 3 and is_quantized(model):
        raise ConfigError("the model was loaded with quantized (4/8-bit) weights, which ZeRO stage 3 cannot shard "
                          "here: use deepspeed-zero.stage=2, or an adapter without quantization.")


@ftcore.hookimpl
def ftcore_training_arguments(args: dict[str, Any], config: Any, ctx: Any) -> None:
    args["deepspeed"] = copy.deepcopy(ctx.state["deepspeed_config"])
    if _prepare_cpu_state():
        args["accelerator_config"] = {**(args.get("accelerator_config") or {}), "use_configured_state": True}


def _prepare_cpu_state() -> bool:
    """On DeepSpeed's CPU accelerator, set up accelerate's process state ourselves.

    accelerate only picks a communication backend for DeepSpeed on a GPU-like device; on a
    CPU it leaves none and then counts one process with rank 0 in every rank. Creating the
    state first with DeepSpeed's own CPU backend (gloo or ccl), and telling the trainer to
    use it, gives every rank its true rank and world size.

    A configured state is kept by the trainer as it is, so the accelerator state of an earlier
    run in this process (an application calling ``ftcore.run`` more than once in its ranks) is
    cleared first, as the trainer does itself when it sets up the state; the process group
    (``PartialState``) stays.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return False
    if "LOCAL_RANK" not in os.environ and not dist.is_initialized():
        return False       # not started by a launcher: one process, rank 0 of 1 is already right
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=False)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend=accelerator.communication_backend_name())
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    return True


@ftcore.hookimpl(wrapper=True)
def ftcore_export(run_dir: Any, model_dir: Any, config: Any, ctx: Any) -> Any:
    """Exporters run in rank 0 after training: without this, every model they load under ZeRO-3 would be
    built inside DeepSpeed's zero.Init and wait for ranks that have already finished."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return (yield)


# -- launching (through ftcore.launch_with_torchrun / launch_with_hostfile) ----------

@ftcore.hookimpl
def ftcore_launch(argv: list[str], config: Any, ctx: Any) -> int:
    settings: DeepSpeedZeroConfig = config.section(NAME)
    ds = deepspeed_config(settings)
    check_combination(config, ctx, ds)
    launch = config.launch
    launcher = settings.launcher
    if launcher == "auto":
        launcher = "deepspeed" if launch.hostfile else "torchrun"
    if launcher == "torchrun" and launch.hostfile:
        raise ConfigError("launch.hostfile needs DeepSpeed's launcher (it starts every machine over ssh/pdsh): "
                          "set deepspeed-zero.launcher=deepspeed or auto, or give --num-machines / "
                          "--machine-rank / --main-process-ip and start ftcore on each machine.")
    if launcher == "deepspeed":
        return ftcore.launch_with_hostfile(argv, launch, ctx.log)
    stage = ds["zero_optimization"]["stage"]
    return ftcore.launch_with_torchrun(argv, launch, ctx.log, what=f"DeepSpeed ZeRO stage {stage}",
                                       shutdown_timeout=settings.shutdown_timeout)




# Kept for callers of the names this module had before the launchers moved to ftcore's public API.
free_port = ftcore.free_port
read_hostfile = ftcore.read_hostfile
deepspeed_launcher_command = ftcore.hostfile_launcher_command
