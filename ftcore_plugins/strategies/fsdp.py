"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) over several processes and machines.

Every rank holds a shard of every weight, gradient and optimizer state; a layer's weights are
gathered just before it runs and dropped again after (``reshard_after_forward``). Unlike DeepSpeed
ZeRO-3 it shards bitsandbytes' 4-bit weights too, when they are stored in a floating dtype
(``bnb_4bit_quant_storage``): QLoRA of a model larger than one GPU, on several.

What it does, all through hooks:

- ``ftcore_launch``: start the ranks with ftcore's launchers (``ftcore.launch_with_torchrun``, or
  ``ftcore.launch_with_hostfile`` for a ``launch.hostfile``), as deepspeed-zero does;
- ``ftcore_training_arguments``: hand the trainer transformers' FSDP settings (``fsdp=True`` and
  ``fsdp_config`` with version 2): transformers and accelerate wrap the model with ``fully_shard``
  (the decoder layers, then embeddings, the output layer and the root), gather the full state dict on
  rank 0 for the final save, and save and load sharded checkpoints;
- ``ftcore_trainer_created``: on CPU ranks, switch accelerate's state to FSDP. accelerate enables
  FSDP only for GPU-like devices (its process state on a CPU is multi-CPU, i.e. DDP, which refuses
  sharded DTensor weights), although FSDP2 itself runs on CPUs with the gloo backend; the trainer's
  own FSDP plugin is installed in its state (and in the process state, which accelerate copies into it
  again), and ``use_cpu`` makes the ranks join a gloo process group. So the library's FSDP2 support is
  used on CPUs and GPUs alike, and ``fully_shard`` is not called directly;
- with qlora, the 4-bit weights are stored in the compute dtype (qlora's ``quant_storage: auto``),
  so they shard like any other weight;
- on CPU ranks, keep glibc's mmap threshold fixed (``fixed_mmap_threshold``), so that the buffers FSDP
  gathers and frees at every step go back to the system instead of growing the heap;
- refuse combinations that cannot work, before anything is launched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

import ftcore
from ftcore import ConfigError

NAME = "fsdp"
PRECISIONS = {"bf16": "bfloat16", "fp16": "float16"}


class FsdpConfig(ftcore.PluginConfig):
    wrap: list[str] | None = Field(None, description="Module classes sharded as one unit each (gathered together "
                                   "before they run); default: the model's decoder layer class "
                                   "(transformers' _no_split_modules).")
    reshard_after_forward: bool = Field(True, description="Free a unit's gathered weights after its forward and "
                                        "gather them again for backward (less memory, more communication).")
    cpu_offload: bool = Field(False, description="Keep the sharded weights, gradients and optimizer state in CPU "
                              "memory (the optimizer step runs on the CPU); GPUs only.")
    activation_checkpointing: bool | None = Field(None, description="Recompute each wrapped layer's activations in "
                                                  "backward (FSDP's own checkpointing, in place of the trainer's); "
                                                  "default: training.gradient_checkpointing.")
    mixed_precision: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto", description="Dtype the gathered weights compute in (FSDP's mixed precision policy, set by "
                            "accelerate from training.precision, so the two must agree); auto: training.precision's; "
                            "bf16/fp16 need GPUs (CPU ranks: none).")
    state_dict: Literal["full"] = Field("full", description="How the final model is saved: full: gathered on "
                                        "rank 0 and written as a normal adapter or model folder.")
    shutdown_timeout: int = Field(10, ge=1, description="Seconds the other ranks get to stop after one fails.")


@ftcore.hookimpl
def ftcore_config_schema():
    return FsdpConfig


# -- combinations ----------------------------------------------------------------------

def check_combination(config: Any, ctx: Any) -> None:
    """Refuse, with the reason, the combinations that cannot work with FSDP."""
    settings: FsdpConfig = config.section(NAME)
    # fsdp with another strategy (deepspeed-zero) is refused when the plugins are selected: one strategy a run.
    for name in ctx.plugins.names("optimizer"):
        raise ConfigError(
            f'plugin "{name}" builds its own optimizer, which cannot be used with fsdp: FSDP shards every trained '
            f"weight into a DTensor, and an 8-bit or paged optimizer (bitsandbytes) keeps its state per whole "
            f"local tensor and does not accept DTensor shards. Leave \"{name}\" out of --plugins: the trainer's "
            f"AdamW then keeps its state sharded like the weights.")
    for name in ftcore.quantized_adapters(config, ctx):
        if settings.cpu_offload:
            raise ConfigError(f'plugin "{name}" loads 4-bit quantized weights, which FSDP cannot offload to the '
                              f"CPU (bitsandbytes computes with them where they are): set fsdp.cpu_offload=false.")
    if settings.cpu_offload and not _cuda():
        raise ConfigError("fsdp.cpu_offload=true needs GPUs (it moves the shards between GPU and CPU memory); on CPU "
                          "ranks everything is in CPU memory already: set fsdp.cpu_offload=false.")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def mixed_precision(settings: FsdpConfig, precision: str) -> str:
    """The precision FSDP computes in: "no", "bf16" or "fp16"; refused where the device cannot."""
    wanted = settings.mixed_precision
    if wanted == "auto":
        wanted = precision if precision in PRECISIONS else "none"
    if wanted != "none" and not _cuda():
        raise ConfigError(f'fsdp mixed precision "{wanted}" needs GPUs: on CPU ranks FSDP computes in fp32. '
                          f'Set fsdp.mixed_precision=none (or auto) and training.precision to "fp32" or "auto".')
    if wanted == "none" and precision != "fp32":
        raise ConfigError(f'fsdp.mixed_precision=none with training.precision "{precision}": the trainer would '
                          f'compute in {precision} anyway. Set training.precision to "fp32", or '
                          f"fsdp.mixed_precision=auto.")
    if wanted != "none" and precision != wanted:
        raise ConfigError(f'fsdp.mixed_precision={wanted} with training.precision "{precision}": set them alike '
                          f"(or leave fsdp.mixed_precision=auto).")
    return "no" if wanted == "none" else wanted


# -- hooks in each rank ----------------------------------------------------------------

def check_processes(count: int, where: str) -> None:
    if count < 2:
        raise ConfigError(f"fsdp shards the model across processes, and {where} is {count}: set --num-processes 2 "
                          f"or more (launch.num_processes), or leave fsdp out of --plugins to train in one process.")


@ftcore.hookimpl
def ftcore_run_started(config: Any, ctx: Any) -> None:
    check_combination(config, ctx)
    check_processes(ctx.world_size, "the number of ranks (WORLD_SIZE)")
    mixed_precision(config.section(NAME), ctx.precision)   # refused here when the device or precision disagree
    if _cuda():
        return
    own = os.environ.get(MMAP_ENV)   # set by ftcore's launch (then glibc applied it from the start), or the user's
    if (own == str(MMAP_THRESHOLD) or (own is None and fixed_mmap_threshold())) and ctx.rank == 0:
        ctx.log("fsdp: CPU ranks return FSDP's freed communication buffers to the system (malloc's mmap threshold "
                f"fixed at 128 KiB): measured about 3x less memory per rank and 1.5x slower steps than glibc's "
                f"growing threshold; set {MMAP_ENV} yourself (e.g. 33554432) to trade the other way")


MMAP_THRESHOLD = 128 * 1024     # glibc's own default, kept fixed
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def fixed_mmap_threshold() -> bool:
    """On CPU ranks, keep glibc's mmap threshold at its default instead of letting it grow
    (``ftcore.fix_mmap_threshold``, which leaves a threshold the user set alone).

    glibc raises the threshold to the size of the largest block freed so far, so after the first step every
    layer-sized buffer FSDP gathers and frees (each unit's all-gathered weights, the gradients it
    reduce-scatters) is served from the heap, which keeps what is freed: measured here, each of two CPU ranks
    grew to 3-4x the model's weights beyond its sharded tensors (lora on a 50 MB model: 348-401 MB per rank
    against 113 MB with the threshold fixed). With it fixed, each freed buffer goes back to the system at once,
    at a cost in speed (every large allocation is a fresh mapping): 12 steps of that run took 20-21 s instead of
    13.5 s. Returns whether it is fixed."""
    return ftcore.fix_mmap_threshold(MMAP_THRESHOLD)


@ftcore.hookimpl
def ftcore_model_loaded(model: Any, ctx: Any) -> None:
    """Find the classes to wrap, and check that 4-bit weights are stored so that they can be sharded."""
    settings: FsdpConfig = ctx.config.section(NAME)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    wrap = settings.wrap or list(getattr(base, "_no_split_modules", None) or [])
    if not wrap:
        raise ConfigError(f"fsdp does not know which layers of {type(base).__name__} to shard as units (the model "
                          f"names no _no_split_modules): set fsdp.wrap to its decoder layer class name.")
    present = {type(m).__name__ for m in base.modules()}
    missing = [name for name in wrap if name not in present]
    if missing:
        raise ConfigError(f"fsdp.wrap names {', '.join(missing)}, which {type(base).__name__} does not contain; "
                          f"its layer classes include {', '.join(sorted(n for n in present if 'Layer' in n)[:8])}.")
    ctx.state["fsdp_wrap"] = wrap
    flag = "is_activation_checkpointing" if hasattr(base, "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    ctx.state["fsdp_model_checkpoints"] = bool(getattr(base, flag, False))
    for name, param in model.named_parameters():
        if type(param).__name__ == "Params4bit" and not param.is_floating_point():
            raise ConfigError(f"{name} is a 4-bit weight stored as {param.dtype}, which FSDP cannot shard: load it "
                              f"with bnb_4bit_quant_storage set to a floating dtype (the bundled qlora plugin does "
                              f"that under fsdp: qlora.quant_storage=auto).")


@ftcore.hookimpl
def ftcore_training_arguments(args: dict[str, Any], config: Any, ctx: Any) -> None:
    settings: FsdpConfig = config.section(NAME)
    checkpointing = settings.activation_checkpointing
    if checkpointing is None:
        checkpointing = bool(args.get("activation_checkpointing"))
    if ctx.state.get("fsdp_model_checkpoints"):
        checkpointing = False    # the adapter turned the model's own checkpointing on (qlora): not twice
    args["fsdp"] = True
    args["fsdp_config"] = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": list(ctx.state.get("fsdp_wrap") or settings.wrap or []),
        "reshard_after_forward": settings.reshard_after_forward,
        "cpu_offload": settings.cpu_offload,
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
        # FSDP's own activation checkpointing of each wrapped layer (the trainer's would gather the layer's
        # weights once more in backward), instead of the trainer's
        "activation_checkpointing": checkpointing,
    }
    args["activation_checkpointing"] = False
    args["activation_checkpointing_kwargs"] = None
    if not _cuda():
        args["use_cpu"] = True    # CPU ranks: accelerate then joins them in a gloo process group (multi-CPU)


@ftcore.hookimpl
def ftcore_trainer_created(trainer: Any, ctx: Any) -> None:
    """On CPU ranks, put the trainer's FSDP plugin in accelerate's state (accelerate enables FSDP for GPU-like
    devices only; FSDP2 itself runs on CPUs with gloo)."""
    from accelerate.state import DistributedType, PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    resharded_before_saving(trainer)
    if getattr(trainer, "is_fsdp_enabled", False) and trainer.accelerator.state.distributed_type == \
            DistributedType.FSDP:
        return
    state = trainer.accelerator.state
    if state.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.NO):
        raise ConfigError(f"fsdp: accelerate set up a {state.distributed_type} run instead of FSDP; start the run "
                          f"with ftcore's launcher (--plugins ...,fsdp --num-processes N).")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # AcceleratorState copies the process state's fields each time it is constructed again (the trainer and
    # accelerate do so while training), which would turn it back into multi-CPU: the process state says FSDP too.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


@ftcore.hookimpl
def ftcore_trainer_callbacks(ctx: Any) -> list[Any]:
    """Say, as training starts, how much of the model each rank holds (its shards)."""
    from transformers import TrainerCallback

    class ShareOfWeights(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if model is None:
                return
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():   # units a forward left gathered (the samples before training)
                if isinstance(module, FSDPModule):
                    module.reshard()
            local = full = 0
            for param in model.parameters():
                full += param.numel()
                local += param.to_local().numel() if type(param).__name__ == "DTensor" else param.numel()
            ctx.log(f"fsdp: this rank holds {100 * local / max(full, 1):.1f}% of the model's weights "
                    f"({local:,d} of {full:,d} values, 4-bit ones counted as stored)")

    return [ShareOfWeights()]


def resharded_before_saving(trainer: Any) -> None:
    """Reshard every FSDP unit before the trainer saves the model or a checkpoint.

    After an evaluation (no backward) the units that keep their weights gathered after forward (the root, and
    the output layer's unit) still hold the gathered copies; resharding first makes the full state dict be
    gathered from the shards alone, and frees those copies before it is. A precaution: no failure without it
    was seen here.
    """
    import functools

    from torch.distributed.fsdp import FSDPModule

    def reshard() -> None:
        for module in trainer.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def resharding(method: Any) -> Any:
        @functools.wraps(method)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            reshard()
            return method(*args, **kwargs)
        return wrapped

    trainer.save_model = resharding(trainer.save_model)
    trainer._save_checkpoint = resharding(trainer._save_checkpoint)


# -- launching -------------------------------------------------------------------------

@ftcore.hookimpl
def ftcore_launch(argv: list[str], config: Any, ctx: Any) -> int:
    settings: FsdpConfig = config.section(NAME)
    check_combination(config, ctx)
    launch = config.launch
    if not launch.hostfile:
        check_processes(launch.num_processes, "launch.num_processes")
    with fixed_mmap_threshold_in_ranks():
        if launch.hostfile:
            return ftcore.launch_with_hostfile(argv, launch, ctx.log)
        return ftcore.launch_with_torchrun(argv, launch, ctx.log, what="FSDP2 (fully_shard)",
                                           shutdown_timeout=settings.shutdown_timeout)


@contextlib.contextmanager
def fixed_mmap_threshold_in_ranks() -> Iterator[None]:
    """CPU ranks started from here get glibc's mmap threshold fixed from their first allocation
    (``MALLOC_MMAP_THRESHOLD_``, unless the user fixed it). Fixing it only inside the rank, once the run has started
    (``fixed_mmap_threshold``, which stays for ranks started otherwise), lets whatever the rank allocated and
    freed before grow the heap. The launching process's own environment is put back after."""
    if _cuda() or ftcore.mmap_threshold_set_by_user():
        yield
        return
    os.environ[MMAP_ENV] = str(MMAP_THRESHOLD)
    try:
        yield
    finally:
        os.environ.pop(MMAP_ENV, None)


# -- memory estimate -------------------------------------------------------------------

@ftcore.hookimpl
def ftcore_memory_profile(config: Any) -> ftcore.ShardingProfile:
    settings: FsdpConfig = config.section(NAME)
    shards = ("weights", "gradients", "optimizer")
    return ftcore.ShardingProfile(
        label="fsdp", shards=shards, gathered_layers=2 if settings.reshard_after_forward else 10**9,
        assumptions="FSDP2 shards every weight (4-bit ones too, stored in a floating dtype), gradient and optimizer "
                    "state evenly over the processes; each process holds two decoder layers' weights whole at a "
                    "time (the one computing, the next one gathered ahead; without reshard_after_forward every "
                    "layer stays gathered from its forward to its backward), and its own batch's activations.")
