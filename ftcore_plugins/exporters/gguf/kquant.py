"""K-quants (Q4_K_M, Q5_K_M, Q6_K), made by llama.cpp's own quantizer from an f16 or bf16 file ftcore writes.

llama.cpp's k-quant mixes (which tensors get more bits, importance of each block) live in its C++
quantizer, not in the gguf package; llama-cpp-python ships that quantizer, and it runs in a child
process (``llama_cpp_worker``). The 16-bit source is written beside the output under a temporary name
and removed afterwards; the output appears under its name only once complete.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftcore import OutputError, PluginError

KQUANTS = ("q4_k_m", "q5_k_m", "q6_k")
INSTALL = "pip install llama-cpp-python (or pip install 'ftcore[llama-cpp]'; it builds llama.cpp from source)"


def llama_cpp_installed() -> bool:
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


def require(quant: str) -> None:
    """Refuse a k-quant, before any work, where llama.cpp's quantizer is not installed."""
    if quant in KQUANTS and not llama_cpp_installed():
        raise PluginError(f"gguf-export.quant {quant} is made by llama.cpp's own quantizer, through "
                          f"llama-cpp-python, which is not installed: {INSTALL}. Or choose a quant the gguf "
                          f"package writes alone: f32, f16, bf16, q8_0, q4_0.")


def source_type(hparams: dict[str, Any]) -> str:
    """bf16 for a model saved in bfloat16 (f16 could overflow its range), else f16."""
    dtype = hparams.get("dtype") or hparams.get("torch_dtype")
    return "bf16" if dtype == "bfloat16" else "f16"


def source_path(output: Path, kind: str) -> Path:
    """Where the 16-bit source is written: beside the output, not named *.gguf."""
    return output.with_name(f".{output.name}.{kind}-source.partial")


def quantize(source: Path, output: Path, quant: str, log: Callable[[str], None]) -> Path:
    """Quantize ``source`` into ``output`` with llama.cpp, atomically."""
    from ftcore_plugins.exporters.gguf.llama_cpp_worker import WorkerError, run
    from ftcore_plugins.exporters.gguf.writer import partial_path

    tmp = partial_path(output)
    log(f"gguf-export: quantizing to {quant} with llama.cpp's quantizer")
    try:
        run({"op": "quantize", "source": str(source), "output": str(tmp), "type": quant})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, output)
    except WorkerError as exc:
        raise OutputError(f"gguf-export: llama.cpp could not quantize {source.name} to {quant}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return output
