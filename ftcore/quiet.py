"""Keep library chatter (progress bars, deprecation notes) out of ftcore's own output."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_loggers() -> None:
    """The cheap part, safe before any library is imported (bitsandbytes warns at import time)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    # Expected when a format adds tokens: the resized embeddings are saved with the adapter on purpose.
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
    # huggingface_hub's notes (a cached commit used offline, an unchanged file not uploaded) are said by ftcore itself.
    for name in ("bitsandbytes", "DeepSpeed", "deepspeed", "accelerate", "torch.distributed", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed sets its logger back to INFO when it is imported (transformers imports it for every run where it
    # is installed) and then says it found no GPU; a filter survives that reset.
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _NoCpuAcceleratorNotice) for f in ds.filters):
        ds.addFilter(_NoCpuAcceleratorNotice())


class _NoCpuAcceleratorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def quiet_libraries() -> None:
    quiet_loggers()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
