"""The GPU check: ftcore and TRL side by side on one GPU, bf16, LoRA and QLoRA, a 1B Llama shape at 2048 tokens.

    python benchmarks/gpu_check.py                  # on a CUDA machine: about 5 minutes on one H100-class GPU
    python benchmarks/gpu_check.py --smoke          # the same path on a CPU, tiny model (what the tests run)

For each method (lora, qlora) both trainers run in a process of their own on the same model (random
weights of the Llama-3.2-1B shape: speed and memory do not depend on the values), the same data (the
benchmark's long-tailed alpaca records, the loss on the responses), the same LoRA (r=16, alpha=32,
dropout 0.05, q/k/v/o), learning rate, schedule and epochs, bf16 autocast, gradient checkpointing off,
the Trainer's AdamW, and the best attention each has (flash-attention 2 where installed):

- ``ftcore``: ``ftcore.run`` with its defaults (padding-free packing, sparse logits, packed attention);
- ``trl``: TRL's SFTTrainer with padding-free BFD packing of prompt-completion records.

Reported per run: real tokens per second of training time, MFU against the GPU's peak dense bf16
FLOP/s (by its name, see ``run.PEAK_BF16_TFLOPS``; the output layer counted only where logits are
computed), the peak CUDA memory (torch's peak allocation, plus a paged optimizer's managed memory)
against ``ftcore estimate`` for the same shape, method, batch and sequence length, and the attention
implementation that trained. A micro-benchmark times attention over packed rows: ftcore's per-example
SDPA, SDPA with the block-diagonal mask transformers builds, torch's varlen attention
(``torch.nn.attention.varlen``, no flash-attn package needed) and flash-attn's varlen kernel where
installed, each forward and backward, checked against the per-example result.

The JSON (``--out``, default benchmarks/gpu_check.json) holds everything; the markdown printed at the
end is what goes into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_data  # noqa: E402  (benchmarks/ is not a package)
import run as bench  # noqa: E402

METHODS = ("lora", "qlora")
TRAINERS = ("ftcore", "trl")


def settings(smoke: bool, examples: int | None) -> dict[str, Any]:
    return {
        "smoke": smoke, "device": "cpu" if smoke else "cuda", "bf16": not smoke,
        "model_size": "tiny" if smoke else "1b", "vocab": 2048 if smoke else 16384,
        "max_length": 256 if smoke else 2048, "max_words": 60 if smoke else 800,
        "examples": examples or (24 if smoke else 800), "batch_size": 4,
        "epochs": 1, "learning_rate": 2e-4, "warmup_ratio": 0.03, "seed": 0,
    }


# -- workers ---------------------------------------------------------------------------------

def attention_of(model: Any) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(base.config._attn_implementation)


def measure(name: str, method: str, spec: dict[str, Any], trainer: Any, counter: Any, attention: str,
            head_positions: str) -> dict[str, Any]:
    history = trainer.state.log_history
    train_s = next(h["train_runtime"] for h in reversed(history) if "train_runtime" in h)
    losses = [h["loss"] for h in history if "loss" in h]
    lengths = counter.example_lengths
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / max(1, sum(lengths))
    share = counter.supervised / counter.real if head_positions == "supervised" and counter.real else 1.0
    flops = bench.flops_per_token(trainer.model, mean_context, share)
    out: dict[str, Any] = {
        "trainer": name, "method": method, "steps": trainer.state.global_step, "train_s": round(train_s, 2),
        "examples_seen": len(lengths), "real_tokens": counter.real, "computed_positions": counter.computed,
        "real_tokens_per_s": round(counter.real / train_s, 1), "last_train_loss": losses[-1] if losses else None,
        "attention": attention, "flash_attention": attention == "flash_attention_2",
        "flops_per_token": flops["flops_per_token"], "head_positions_share": flops["head_positions_share"],
    }
    if spec["device"] == "cuda":
        import torch

        from ftcore.reporting.memory import paged_state_bytes

        device = torch.cuda.get_device_name()
        peak = bench.peak_tflops(device)
        out.update(device=device, peak_tflops=peak,
                   mfu=round(flops["flops_per_token"] * counter.real / train_s / (peak * 1e12), 4) if peak else None,
                   peak_cuda_mb=round((torch.cuda.max_memory_allocated() + paged_state_bytes()) / 2**20, 1))
    else:
        out.update(device="cpu", peak_tflops=None, mfu=None, peak_cuda_mb=None,
                   peak_rss_mb=bench.proc_status_mb()["VmHWM"])
    return out


def worker_ftcore(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    import ftcore

    seen: dict[str, Any] = {}

    class Probe:
        @ftcore.hookimpl
        def ftcore_trainer_created(self, trainer, ctx):  # noqa: ANN001
            seen["trainer"] = trainer
            seen["counter"] = trainer.data_collator = bench.Counter(trainer.data_collator)

        @ftcore.hookimpl
        def ftcore_trainer_callbacks(self, ctx):  # noqa: ANN001
            from transformers import TrainerCallback

            class Attention(TrainerCallback):
                def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
                    seen["attention"] = attention_of(model)

            return [Attention()]

    config = {
        "plugins": [method, "alpaca"], "model": spec["model"],
        "data": {"datasets": [spec["train"]], "max_length": spec["max_length"], "val_size": 0, "cache": False},
        "training": {"epochs": spec["epochs"], "learning_rate": spec["learning_rate"], "batch_size": spec["batch_size"],
                     "warmup_ratio": spec["warmup_ratio"], "seed": spec["seed"], "gradient_checkpointing": False,
                     "save_strategy": "no", "logging_steps": 5, "precision": "bf16" if spec["bf16"] else "fp32"},
        "report": {"samples": 0},   # sample generation would be timed as training
        "output_dir": spec["out"], "overwrite": True,
    }
    if method == "qlora":
        config["qlora"] = {"gradient_checkpointing": False}
    ftcore.run(config, plugins=[Probe()], log=lambda m: None)
    trainer = seen["trainer"]
    sparse = getattr(type(trainer), "sparse_logits", False)
    return measure("ftcore", method, spec, trainer, seen["counter"], seen.get("attention", "?"),
                   "supervised" if sparse else "all")


def worker_trl(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    ds = load_dataset("json", data_files=spec["train"], split="train")
    ds = ds.map(lambda r: {"prompt": bench.PROMPT.format(**r), "completion": r["output"]},
                remove_columns=ds.column_names)
    args = SFTConfig(output_dir=spec["out"], num_train_epochs=spec["epochs"], learning_rate=spec["learning_rate"],
                     warmup_steps=spec["warmup_ratio"], lr_scheduler_type="cosine", logging_steps=5,
                     save_strategy="no", bf16=spec["bf16"], max_length=spec["max_length"], report_to="none",
                     seed=spec["seed"], disable_tqdm=True, gradient_checkpointing=False, completion_only_loss=True,
                     per_device_train_batch_size=1, packing=True, packing_strategy="bfd", padding_free=True)
    attention = bench.best_attention(spec)
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    device_map = {"": 0} if spec["device"] == "cuda" else {"": "cpu"}
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=quant, dtype=dtype,
                                                     device_map=device_map, attn_implementation=attention)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, device_map=device_map,
                                                     attn_implementation=attention)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         peft_config=LoraConfig(**bench.LORA))
    counter = bench.Counter(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    return measure("trl", method, spec, trainer, counter, attention_of(trainer.model), "all")


def worker_attention(spec: dict[str, Any]) -> dict[str, Any]:
    """Attention over packed rows, forward + backward, each way there is on this machine."""
    import torch
    import torch.nn.functional as F

    if spec["device"] != "cuda":
        return {"skipped": "varlen and flash attention run on CUDA only"}
    torch.manual_seed(0)
    lengths = spec["attention_lengths"]
    heads, kv_heads, head_dim = 32, 8, 64
    total = sum(lengths)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    cu = torch.tensor(starts, dtype=torch.int32, device="cuda")
    q = torch.randn(1, heads, total, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, total, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv_heads, total, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def per_example():
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                         enable_gqa=True) for a, b in zip(starts, starts[1:])], dim=2)

    def block_mask():
        seg = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                      torch.tensor(lengths, device="cuda"))
        mask = (seg[:, None] == seg[None, :]) & torch.ones(total, total, dtype=torch.bool, device="cuda").tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], enable_gqa=True)

    def torch_varlen():
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, max(lengths),
                          max(lengths), window_size=(-1, 0), enable_gqa=True)
        return out.transpose(0, 1)[None]

    def flash_varlen():
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                     max(lengths), max(lengths), causal=True)
        return out.transpose(0, 1)[None]

    def timed(fn: Any) -> tuple[float, Any]:
        for _ in range(3):
            fn().sum().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn().float().sum().backward()
        torch.cuda.synchronize()
        with torch.no_grad():
            return round((time.perf_counter() - t0) / 10 * 1000, 3), fn()

    out: dict[str, Any] = {"lengths": lengths, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    reference = None
    for label, fn in (("per_example_sdpa", per_example), ("block_mask_sdpa", block_mask),
                      ("torch_varlen", torch_varlen), ("flash_attn_varlen", flash_varlen)):
        try:
            ms, result = timed(fn)
        except Exception as exc:   # noqa: BLE001 - recorded: this way is not available here
            out[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        reference = result if reference is None else reference
        out[label] = {"ms_forward_backward": ms,
                      "max_abs_diff_vs_per_example": round(float((result.float() - reference.float()).abs().max()), 5)}
    return out


def worker_main(name: str, spec_path: str, result_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    spec = json.loads(Path(spec_path).read_text())
    from transformers import set_seed

    set_seed(spec["seed"])
    if name == "attention":
        result = worker_attention(spec)
    else:
        trainer, method = name.split("-")
        result = (worker_ftcore if trainer == "ftcore" else worker_trl)(method, spec)
        if spec["device"] == "cuda" or spec["smoke"]:
            result["estimate"] = estimate_for(method, spec)
    Path(result_path).write_text(json.dumps(result, indent=2))


def estimate_for(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``ftcore estimate`` for the shape, method, batch and sequence length of the run."""
    from ftcore.tools.estimate import estimate

    found = estimate(spec["model"], [method], seq_len=spec["max_length"], batch=spec["batch_size"],
                     gradient_checkpointing=False, precision="bf16",
                     settings={"qlora": {"gradient_checkpointing": False}} if method == "qlora" else None,
                     log=lambda m: None)
    row = next(m for m in found["methods"] if m["method"] == method)
    # the tensors are what torch's allocator peak counts; the total adds the CUDA context and fragmentation
    return {"tensors_mb": round(row["tensors"] / 2**20, 1), "total_mb": round(row["total"] / 2**20, 1),
            "seq_len": spec["max_length"], "batch": spec["batch_size"]}


# -- the driver ------------------------------------------------------------------------------

def run_worker(name: str, spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    spec_path, result_path = work / f"gpu-spec-{name}.json", work / f"gpu-result-{name}.json"
    spec_path.write_text(json.dumps({**spec, "out": str(work / "gpu-runs" / name)}))
    result_path.unlink(missing_ok=True)
    print(f"[gpu-check] {name} ...", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, str(spec_path), str(result_path)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    (work / f"gpu-log-{name}.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stdout + proc.stderr)[-2500:]
        print(f"[gpu-check] {name} FAILED (exit {proc.returncode}):\n{tail}", flush=True)
        return {"error": tail}
    result = json.loads(result_path.read_text())
    result["process_s"] = round(time.time() - t0, 1)
    print(f"[gpu-check] {name}: " + json.dumps({k: result.get(k) for k in
          ("real_tokens_per_s", "mfu", "peak_cuda_mb", "attention")}), flush=True)
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [f"## GPU check ({report['device']})", "",
             f"`{report['command']}` at commit {report['commit'].get('sha', '?')[:12]}"
             f"{' (with uncommitted changes)' if report['commit'].get('dirty') else ''}, {report['finished']}; "
             f"{report['model']['params'] / 1e9:.2f}B-parameter Llama shape, sequence length "
             f"{report['settings']['max_length']}, {report['settings']['examples']} examples, "
             f"{'bf16' if report['settings']['bf16'] else 'fp32 (smoke run)'}; flash-attn "
             f"{'installed' if report['flash_attn_installed'] else 'not installed'}.", "",
             "| method | trainer | tokens/s | MFU | peak CUDA MiB (allocated) | ftcore estimate MiB: tensors "
             "(with context and allocator) | attention | last loss |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for method in METHODS:
        for trainer in TRAINERS:
            r = report["runs"].get(f"{trainer}-{method}", {})
            if "error" in r:
                lines.append(f"| {method} | {trainer} | failed: see gpu_check.json | | | | | |")
                continue
            found = r.get("estimate") or {}
            est = found and f"{found['tensors_mb']} ({found['total_mb']})"
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            lines.append(f"| {method} | {trainer} | {r.get('real_tokens_per_s', 0):,.0f} | {mfu} | "
                         f"{r.get('peak_cuda_mb') or 'n/a'} | {est or 'n/a'} | {r.get('attention')} | "
                         f"{r.get('last_train_loss')} |")
    att = report.get("attention", {})
    if "skipped" not in att:
        lines += ["", f"Attention over packed rows of lengths {att.get('lengths')}, forward + backward:", "",
                  "| kernel | ms | max abs diff vs per-example SDPA |", "|---|---:|---:|"]
        for label in ("per_example_sdpa", "block_mask_sdpa", "torch_varlen", "flash_attn_varlen"):
            entry = att.get(label, {})
            lines.append(f"| {label} | {entry.get('ms_forward_backward', entry.get('error', ''))} | "
                         f"{entry.get('max_abs_diff_vs_per_example', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description="ftcore vs TRL on one GPU: bf16 LoRA and QLoRA, 1B shape, 2048 tokens.")
    ap.add_argument("--smoke", action="store_true", help="the same path on a CPU with a tiny model")
    ap.add_argument("--examples", type=int, help="training examples (default 800; --smoke 24)")
    ap.add_argument("--only", help="comma-separated subset of lora,qlora,attention")
    ap.add_argument("--work", default=str(HERE / ".work"))
    ap.add_argument("--out", help="the results JSON (default benchmarks/gpu_check.json; --smoke: in --work)")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(*args.worker)
        return
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible to torch (use --smoke for the CPU run of the same path).")
    started = time.time()
    s = settings(args.smoke, args.examples)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = make_data.generate(work, seed=s["seed"], max_words=s["max_words"])
    model_dir = make_data.build(work, s["model_size"], seed=s["seed"], vocab_size=s["vocab"],
                                max_positions=max(2048, s["max_length"]))
    train = work / f"gpu-train-{s['examples']}.jsonl"
    train.write_text("\n".join(paths["train"].read_text(encoding="utf-8").splitlines()[: s["examples"]]) + "\n")
    spec = {**s, "model": str(model_dir), "train": str(train),
            "attention_lengths": [1900, 700, 310, 2048, 96, 1200, 40, 1898]}
    only = set(args.only.split(",")) if args.only else {*METHODS, "attention"}
    timeout = 240 if not args.smoke else 600
    report: dict[str, Any] = {
        "command": "python benchmarks/gpu_check.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else
        f"CPU ({platform.machine()}, {os.cpu_count()} cores; smoke run)",
        "commit": bench.commit(), "versions": bench.versions(), "settings": s,
        "model": bench.model_summary(model_dir), "runs": {},
        "flash_attn_installed": __import__("importlib.util").util.find_spec("flash_attn") is not None,
    }
    for method in METHODS:
        if method in only:
            for trainer in TRAINERS:
                report["runs"][f"{trainer}-{method}"] = run_worker(f"{trainer}-{method}", spec, work, timeout)
    report["attention"] = run_worker("attention", spec, work, timeout) if "attention" in only else {"skipped": "--only"}
    report["total_s"] = round(time.time() - started, 1)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = Path(args.out) if args.out else (work / "gpu_check-smoke.json" if args.smoke else HERE / "gpu_check.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    print(text)
    print(f"[gpu-check] wrote {out} in {report['total_s']:.0f} s")
    failed = [name for name, r in report["runs"].items() if "error" in r]
    if failed:
        sys.exit(f"gpu_check: {', '.join(failed)} failed (their output is in {work}/gpu-log-*.txt)")


if __name__ == "__main__":
    main()
