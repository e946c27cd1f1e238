"""gguf-export of a 1B-class model: wall time and peak memory of each output type, and the memory target.

    python benchmarks/gguf_export.py             # Llama 3.2 1B shape (1.24B parameters), random bf16 weights
    python benchmarks/gguf_export.py --quick     # a 4-layer model of the same width, to try the script

The model is written once (bf16 safetensors, random weights: speed and memory do not depend on
their values) under benchmarks/.work/. Each export then runs in its own process, so that its peak
resident memory (``ru_maxrss`` of that process) is its own: f16 (written by the gguf package,
tensor by tensor), q8_0 (quantized in numpy), q4_k_m (an f16 file quantized by llama.cpp). The
parity check is left out here: it loads the model into transformers, which is not the export.

Target: the f16 export streams tensors, so its peak memory stays under half the model's f16 size
plus what the Python process with torch and transformers takes before it reads a weight; holding
the model once would already reach the whole size, twice (the old way: all tensors loaded, then
converted) twice. Results go to benchmarks/results-gguf.json and RESULTS-gguf.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "gguf"
# Llama 3.2 1B: the shape people fine-tune at this size (tied embeddings, 128k vocabulary).
SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
         "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}
QUANTS = ("f16", "q8_0", "q4_k_m")


def build_model(folder: Path, layers: int) -> int:
    """Random bf16 weights of the shape, saved as a transformers folder; return the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from ftcore.testing import build_tokenizer

    config = LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    h = SHAPE["hidden_size"]
    kv = SHAPE["num_key_value_heads"] * h // SHAPE["num_attention_heads"]
    ff, vocab = SHAPE["intermediate_size"], SHAPE["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                       p + "mlp.down_proj.weight": (h, ff), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02)
               .to(torch.bfloat16) for name, shape in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    params = sum(t.numel() for t in tensors.values())
    (folder / "parameters.json").write_text(json.dumps(params))
    return params


def measure(model: Path, quant: str) -> dict[str, float]:
    """Export in a child process; its wall time and peak resident memory."""
    out = WORK / f"model-{quant}.gguf"
    out.unlink(missing_ok=True)
    code = ("import time; t = time.perf_counter(); "
            "from ftcore_plugins.exporters.gguf import export_gguf; "
            f"export_gguf({str(model)!r}, {str(out)!r}, quant={quant!r}, modelfile=False, log=lambda m: None); "
            f"print(time.perf_counter() - t, {PEAK})")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"export to {quant} failed:\n{proc.stderr[-3000:]}")
    seconds, peak_kib = proc.stdout.split()[-2:]
    size = out.stat().st_size
    out.unlink()
    return {"wall_s": round(wall, 1), "export_s": round(float(seconds), 1),
            "peak_rss_mib": round(int(peak_kib) / 1024), "file_mib": round(size / 2**20)}


# The process's own peak resident memory in KiB (the quantizer's child process is counted too).
PEAK = ("max(__import__('resource').getrusage(__import__('resource').RUSAGE_SELF).ru_maxrss, "
        "__import__('resource').getrusage(__import__('resource').RUSAGE_CHILDREN).ru_maxrss)")


def baseline_rss() -> int:
    """Peak memory of a process that imports what the export imports and reads no weight (MiB)."""
    code = f"import torch, transformers, gguf, ftcore_plugins.exporters.gguf; print({PEAK})"
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return round(int(proc.stdout.split()[-1]) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 16, to try the script")
    parser.add_argument("--build", nargs=2, metavar=("FOLDER", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:   # in its own process: Linux hands a parent's peak memory down to the children it starts
        build_model(Path(args.build[0]), int(args.build[1]))
        return
    layers = 4 if args.quick else SHAPE["num_hidden_layers"]
    model = WORK / f"llama-1b-shape-{layers}l"
    if (model / "parameters.json").is_file():
        params = json.loads((model / "parameters.json").read_text())
    else:
        print(f"writing the model to {model} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--build", str(model), str(layers)], check=True)
        params = json.loads((model / "parameters.json").read_text())
    base = baseline_rss()
    rows = {}
    for quant in QUANTS:
        print(f"exporting to {quant} ...", flush=True)
        rows[quant] = measure(model, quant)
        print(f"  {rows[quant]}", flush=True)
    f16_mib = params * 2 / 2**20
    limit = base + f16_mib / 2
    met = rows["f16"]["peak_rss_mib"] <= limit
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {platform.system()}, "
              f"{__import__('os').cpu_count()} CPU cores", "layers": layers, "parameters": params,
              "f16_size_mib": round(f16_mib), "baseline_rss_mib": base, "exports": rows,
              "target": {"f16_peak_rss_mib_at_most": round(limit), "met": met}}
    name = "results-gguf-quick.json" if args.quick else "results-gguf.json"
    (HERE / name).write_text(json.dumps(result, indent=2) + "\n")
    if not args.quick:
        (HERE / "RESULTS-gguf.md").write_text(markdown(result))
    print(markdown(result))
    if not met and not args.quick:   # --quick's embedding is half its model: the target is for the 1B shape
        raise SystemExit(f"target missed: the f16 export peaked at {rows['f16']['peak_rss_mib']} MiB, "
                         f"over {round(limit)} MiB")


def markdown(r: dict) -> str:
    lines = ["# gguf-export of a 1B-class model", "",
             f"`python benchmarks/gguf_export.py` on {r['machine']} ({r['date']}): a Llama 3.2 1B shape "
             f"({r['parameters'] / 1e9:.2f}B parameters, {r['layers']} layers, hidden 2048, 128,256-token vocabulary, "
             f"tied embeddings) with random bf16 weights; each export in its own process, parity check off.", "",
             "| quant | wall s | export s | peak RSS MiB | file MiB |", "|---|---:|---:|---:|---:|"]
    for quant, row in r["exports"].items():
        lines.append(f"| {quant} | {row['wall_s']} | {row['export_s']} | {row['peak_rss_mib']} | {row['file_mib']} |")
    t = r["target"]
    lines += ["", f"The model's f16 size is {r['f16_size_mib']} MiB; a process with torch, transformers and gguf "
              f"imported peaks at {r['baseline_rss_mib']} MiB before reading a weight. Target: the f16 export "
              f"peaks at most at that plus half the f16 size ({t['f16_peak_rss_mib_at_most']} MiB), which only "
              f"a tensor-by-tensor export can: **{'met' if t['met'] else 'not met'}**.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
