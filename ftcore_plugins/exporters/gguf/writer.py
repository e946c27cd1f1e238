"""Write a GGUF file tensor by tensor, under a temporary name renamed only when complete."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftcore import ConfigError
from ftcore_plugins.exporters.gguf import arch as arch_mod
from ftcore_plugins.exporters.gguf.vocab import Vocab

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")


def qtype_of(quant: str) -> Any:
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]


def file_type_of(quant: str) -> Any:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]


# -- where tensors come from ----------------------------------------------------------

Loader = Callable[[], np.ndarray]
RowLoader = Callable[[int, int], np.ndarray]
CHUNK = 1 << 22   # values converted at a time: a 16 MiB float32 slice, however large the tensor


@dataclass
class SourceTensor:
    name: str                   # the transformers name
    shape: tuple[int, ...]
    load: Loader                # float32 numpy array, loaded only when written
    load_rows: RowLoader | None = None   # rows [start, stop) as float32, for converting a large tensor in slices


def tensors_in_folder(folder: Path) -> list[SourceTensor]:
    """The tensors of a saved model, read lazily from its safetensors files."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"gguf-export: {folder} has no *.safetensors weights to export.")
    found = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                found.append(SourceTensor(name, shape, _lazy(file, name), _lazy_rows(file, name)))
    return found


def _lazy(file: Path, name: str) -> Loader:
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(name).float().numpy()
    return load


def _lazy_rows(file: Path, name: str) -> RowLoader:
    def load(start: int, stop: int) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return handle.get_slice(name)[start:stop].float().numpy()
    return load


def tensors_of_model(model: Any) -> list[SourceTensor]:
    """The tensors of a model in memory (e.g. an adapter just merged into its base)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    found = []
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        found.append(SourceTensor(name, tuple(tensor.shape),
                                  lambda t=tensor: t.detach().float().cpu().numpy()))
    return found


# -- the plan ------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    gguf_name: str
    source: SourceTensor | None
    qtype: Any
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    data: np.ndarray | None = None      # for tensors computed here (rope factors)

    def array(self) -> np.ndarray:
        """The tensor as written. A large one read from a file is converted a slice of rows at a time, so
        that its float32 copy is never whole in memory (a 128k-token embedding is 1 GiB as float32)."""
        import gguf

        rows_at_once = max(1, CHUNK // int(np.prod(self.shape[1:]) or 1))
        if (self.data is None and self.transform is None and self.source.load_rows is not None
                and len(self.shape) >= 2 and self.shape[0] > rows_at_once):
            shape, dtype, _ = self.info()
            out = np.empty(shape, dtype=dtype)
            for start in range(0, self.shape[0], rows_at_once):
                stop = min(start + rows_at_once, self.shape[0])
                out[start:stop] = gguf.quants.quantize(self.source.load_rows(start, stop), self.qtype)
            return out
        values = self.data if self.data is not None else self.source.load()
        if self.transform is not None:
            values = self.transform(values)
        return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), self.qtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape) if self.data is not None else self.source.shape

    def info(self) -> tuple[tuple[int, ...], Any, int]:
        """Shape, numpy dtype and byte size as the written array will have them."""
        import gguf

        n = int(np.prod(self.shape))
        if self.qtype == gguf.GGMLQuantizationType.F32:
            return self.shape, np.float32, 4 * n
        if self.qtype == gguf.GGMLQuantizationType.F16:
            return self.shape, np.float16, 2 * n
        byte_shape = gguf.quant_shape_to_byte_shape(self.shape, self.qtype)
        return byte_shape, np.uint8, int(np.prod(byte_shape))


def plan(tensors: list[SourceTensor], hparams: dict[str, Any], arch: arch_mod.Arch, quant: str) -> list[PlannedTensor]:
    """Name every tensor as llama.cpp does and choose its type; fail before writing on any unknown one."""
    import gguf

    n_blocks = hparams["num_hidden_layers"]
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.gguf_arch)
    names = gguf.get_tensor_name_map(arch_enum, n_blocks)
    planned, unknown = [], []
    for t in tensors:
        if t.name.endswith(".rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unknown.append(t.name)
            continue
        planned.append(PlannedTensor(gguf_name, t, _choose_type(gguf_name, t.shape, quant),
                                     arch_mod.tensor_transform(t.name, arch, hparams)))
    if unknown:
        raise ConfigError(f"gguf-export: tensors with no llama.cpp name for {arch.gguf_arch}: "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}.")
    factors = arch_mod.llama3_rope_factors(hparams)
    if factors is not None:
        planned.append(PlannedTensor("rope_freqs.weight", None, gguf.GGMLQuantizationType.F32, data=factors))
    return planned


def _choose_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> Any:
    """1-D tensors (norms, biases) stay f32, as llama.cpp expects; matrices take the chosen type.

    A matrix whose rows do not split into 32-value blocks falls back to f16. With q4_0 the
    embedding and output matrices are kept at q8_0, as llama.cpp's own quantizer keeps them
    at a higher precision: they are what 4-bit files lose most quality in.
    """
    import gguf

    if len(shape) < 2 or quant == "f32":
        return gguf.GGMLQuantizationType.F32
    if quant == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        quant = "q8_0"
    qtype = qtype_of(quant)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


# -- writing -----------------------------------------------------------------------

def partial_path(output: Path) -> Path:
    """Where the file is written until complete: a name that is not *.gguf."""
    return output.with_name(f".{output.name}.partial")


def write(output: Path, arch: arch_mod.Arch, hparams: dict[str, Any], vocab: Vocab,
          tensors: list[PlannedTensor], quant: str, name: str, log: Callable[[str], None] = print) -> Path:
    """Write the file aside and rename it to ``output`` only once every byte is on disk."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    arch_mod.write_metadata(writer, arch, hparams, len(vocab.tokens))
    writer.add_file_type(file_type_of(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)
    for t in tensors:
        shape, dtype, nbytes = t.info()
        writer.add_tensor_info(t.gguf_name, shape, np.dtype(dtype), nbytes, raw_dtype=t.qtype)

    return write_atomically(writer, output, (t.array() for t in _progress(tensors, log)))


def write_atomically(writer: Any, output: Path, arrays: Iterable[np.ndarray]) -> Path:
    """Write a prepared GGUFWriter's header and ``arrays`` (one per tensor info, in order) to ``output``:
    aside first, renamed only once every byte is on disk; nothing is left behind on failure."""
    tmp = partial_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for array in arrays:
            writer.write_tensor_data(array)
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return output


def _progress(tensors: list[PlannedTensor], log: Callable[[str], None]) -> Iterator[PlannedTensor]:
    """Report each quarter of a large model's tensors (quantizing 7B parameters in numpy takes minutes)."""
    step = max(1, len(tensors) // 4)
    for i, t in enumerate(tensors):
        if len(tensors) >= 100 and i and i % step == 0:
            log(f"gguf-export: {i}/{len(tensors)} tensors written")
        yield t
