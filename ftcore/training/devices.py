"""What the run's devices can do: native bf16, how many GPUs a process may use, which GPU is this rank's.

Every question about the accelerator goes through here, so that a test can describe a machine with GPUs
by mocking the few ``torch.cuda`` calls these functions make (the one thing that cannot exist on a CPU
machine) and run the rest for real.
"""

from __future__ import annotations

import os
from typing import Any

AMPERE = (8, 0)   # the first NVIDIA generation with bf16 in its tensor cores


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def native_bf16() -> bool:
    """Whether this process's GPU computes bf16 in hardware (Ampere or newer, or any ROCm GPU).

    torch's ``is_bf16_supported()`` also answers True where bf16 is only emulated (T4, V100: it counts
    a bf16 tensor that can be made), which trains several times slower than fp16 there.
    """
    import torch

    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    return tuple(torch.cuda.get_device_capability()) >= AMPERE


def device_name() -> str:
    import torch

    try:
        return torch.cuda.get_device_name()
    except Exception:   # noqa: BLE001 - only used in messages
        return "this GPU"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def local_device_index() -> int:
    """The CUDA device of this process.

    One device per rank: ``LOCAL_RANK`` where the process sees all the machine's GPUs; device 0 where each
    rank is given its own GPU through ``CUDA_VISIBLE_DEVICES`` (it then sees exactly one, whatever its rank).
    """
    import torch

    count = torch.cuda.device_count()
    rank = local_rank()
    return rank if rank < count else 0


def rank_device_map() -> dict[str, int] | None:
    """Where a launched rank loads its model: straight onto its own GPU, or None (transformers' default).

    A rank of a ZeRO-1/2 (or DDP-style) run otherwise builds the whole model in host memory before DeepSpeed
    moves it to the GPU: eight ranks of a 7B bf16 model hold 8 x 14 GB of host RAM at once. Loaded with this
    map, each tensor goes from the checkpoint to the rank's GPU. None on a CPU machine, in a process no launcher
    started (the Trainer moves its model), and under ZeRO-3, where transformers builds the model inside
    ``deepspeed.zero.Init`` (each rank holds its shard only) and refuses a device map.
    """
    if not cuda_available() or "LOCAL_RANK" not in os.environ:
        return None
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    return {"": local_device_index()}


def check_processes_fit(per_machine: int) -> None:
    """Refuse, before anything starts, more processes on this machine than it has GPUs (one GPU per rank).

    Two NCCL ranks on one GPU fail only after every rank has loaded its model ("Duplicate GPU detected"), and
    fewer processes than GPUs is allowed (the rest stay free). On a machine without a GPU any number of CPU
    ranks (gloo) may run.
    """
    from ftcore.errors import ConfigError

    gpus = visible_gpus()
    if gpus and per_machine > gpus:
        raise ConfigError(f"launch.num_processes asks for {per_machine} process(es) on this machine, but it has "
                          f"{gpus} GPU(s){_visible_note()}; each process trains on a GPU of its own. Set "
                          f"launch.num_processes to at most {gpus} per machine (--num-processes).")


def _visible_note() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" visible (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def one_device_per_process(trainer: Any, log: Any) -> None:
    """Train a one-process run on one GPU, however many the machine has.

    transformers gives a process that is not part of a distributed run every visible GPU (``n_gpu =
    device_count()``) and wraps the model in ``nn.DataParallel``: the packed batch is one row and cannot be
    split, the sparse-logits loss's index tensor would be scattered across the replicas, and the loss is scaled
    by the number of GPUs. More GPUs are used by launching a process for each (a strategy plugin).
    """
    args = trainer.args
    if args.n_gpu <= 1:
        return
    n = args.n_gpu
    args._n_gpu = 1
    trainer._train_batch_size = args.per_device_train_batch_size   # the trainer read train_batch_size (x n_gpu)
    log(f"note: this process sees {n} GPUs and trains on one of them (cuda:0). To train on all {n}, launch a "
        f"process per GPU with a strategy plugin: --plugins ...,deepspeed-zero (or fsdp) --set "
        f"launch.num_processes={n}.")
