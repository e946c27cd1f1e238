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
