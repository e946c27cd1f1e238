"""The chunked loss against the plain loss on a large vocabulary, side by side in one run.

    python benchmarks/large_vocab_loss.py            # CPU: 2 losses x 2 vocabularies x 5 interleaved rounds
    python benchmarks/large_vocab_loss.py --smoke    # the same path with tiny models (tests/test_large_vocab_loss.py)

Two Llama models that differ only in their vocabulary rows (1,024 and Llama 3's 128,256; hidden 256, 4 layers,
untied embeddings), the same alpaca data with every token supervised (``alpaca.train_on_inputs``) packed into
rows of about 1,800 tokens, a few LoRA steps with ftcore's defaults, under two losses:

- ``plain``: ``training.loss=plain``, every supervised position's logits at once (``sparse_logits`` on: with every
  token supervised that is every position);
- ``chunked``: ``training.loss=chunked`` (what ``auto`` picks on a CPU), the output layer and cross-entropy in chunks.

Every configuration trains in its own process, so each peak is its own (VmHWM: the whole process's peak
resident memory, model loading included); rounds interleave the four configurations so a slow spell of the
shared machine hits them all. Training tokens/s is a step's tokens (every step trains one packed row of about
the same length) over the median step time after the first step (which allocates and warms up).

Speeds of separate processes on a shared machine differ by several times from run to run, far more than the 5%
the target asks about, so the speed comparison is also made paired: per vocabulary, one process alternates
training steps (forward and backward of the whole LoRA model on one row) between the two losses, and the ratio
is the median of the per-pair ratios. The targets (docs/performance.md, issue 20): the extra peak memory of the
large vocabulary under the chunked loss at most 1.5x its extra weights plus 300 MiB (separate runs), and the
chunked loss's speed at most 5% below the plain loss's on the same model (paired).

Writes benchmarks/results-loss.json and benchmarks/RESULTS-loss.md (``--out-dir`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ftcore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import commit  # noqa: E402  (benchmarks/ is not a package; the commit as the main benchmark records it)

LOSSES = ("plain", "chunked")
MIB = 2**20
FULL = dict(vocabs=(1024, 128_256), hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688, examples=128,
            batch=8, words=16, steps=8, rounds=5, pairs=12)
SMOKE = dict(vocabs=(512, 8192), hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, examples=8,
             batch=4, words=12, steps=2, rounds=1, pairs=2)


# -- the worker: one configuration in its own process ------------------------------------

def proc_status_mib() -> dict[str, float]:
    from ftcore.reporting.memory import proc_status

    found = proc_status()
    return {key: round(found[key] / MIB, 1) for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


class Timing:
    """An extension plugin: the training steps' time and the tokens they trained on."""

    name = "loss_benchmark_timing"

    def __init__(self) -> None:
        self.began = self.ended = 0.0
        self.before_train: dict[str, float] = {}
        self.step_began = 0.0
        self.steps: list[float] = []

    @ftcore.hookimpl
    def ftcore_trainer_callbacks(self, ctx: Any) -> list[Any]:
        from transformers import TrainerCallback

        timing = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
                timing.before_train = proc_status_mib()
                timing.began = time.perf_counter()

            def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
                timing.step_began = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
                timing.steps.append(time.perf_counter() - timing.step_began)

            def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
                timing.ended = time.perf_counter()

        return [Callback()]


def worker(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    timing = Timing()
    result = ftcore.run(spec["config"], plugins=[timing], log=lambda m: None)
    seconds = timing.ended - timing.began
    metrics = result.metrics
    # The steady speed: the median step after the first (which allocates and warms up), over the mean step's tokens.
    # Every step trains one packed row of about the same length.
    steady = statistics.median(timing.steps[1:] or timing.steps)
    out = {"loss": spec["loss"], "vocab": spec["vocab"], "round": spec["round"],
           "peak_rss_mib": proc_status_mib()["VmHWM"], "load_peak_rss_mib": timing.before_train.get("VmHWM"),
           "train_s": round(seconds, 3), "tokens": metrics["tokens"],
           "tokens_per_s": round(metrics["tokens"] / len(timing.steps) / steady, 2),
           "tokens_per_s_with_first_step": round(metrics["tokens"] / seconds, 2),
           "step_s": [round(t, 3) for t in timing.steps], "train_loss": metrics["train_loss"],
           "loss_path": metrics["loss"]["path"], "loss_chunk_size": metrics["loss"]["chunk_size"],
           "peak_rss_run_mib": round(metrics.get("peak_rss_bytes", 0) / MIB, 1)}
    Path(result_path).write_text(json.dumps(out))


def paired_worker(spec_path: str, result_path: str) -> None:
    """The speed comparison that a shared machine cannot spoil: one process, one model (ftcore's LoRA defaults),
    one packed row with every token supervised, and training steps (forward and backward of the whole model)
    alternating between the plain and the chunked loss, each pair in alternating order. A slow spell of the
    machine slows both steps of a pair, so the per-pair ratio stays honest where separate runs' speeds do not."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftcore.training.loss import LossPlan, auto_chunk_size, causal_lm_loss

    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (1, spec["tokens"]), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    plans = {"plain": LossPlan("sparse", sparse=True),
             "chunked": LossPlan("chunked", sparse=True, chunk_size=auto_chunk_size(vocab))}

    def step(name: str) -> tuple[float, float]:
        began = time.perf_counter()
        loss, _ = causal_lm_loss(model, inputs, plans[name])
        loss.backward()
        seconds = time.perf_counter() - began
        model.zero_grad(set_to_none=True)
        return seconds, float(loss)

    for name in plans:                        # warm-up: allocations, first-call overheads
        step(name)
    pairs = []
    for i in range(spec["pairs"]):
        order = ("plain", "chunked") if i % 2 == 0 else ("chunked", "plain")
        done = {name: step(name) for name in order}
        pairs.append({"plain_s": round(done["plain"][0], 4), "chunked_s": round(done["chunked"][0], 4),
                      "plain_loss": done["plain"][1], "chunked_loss": done["chunked"][1]})
    ratios = [p["plain_s"] / p["chunked_s"] for p in pairs]     # chunked tokens/s over plain tokens/s
    out = {"vocab": vocab, "tokens": spec["tokens"], "chunk_size": plans["chunked"].chunk_size, "pairs": pairs,
           "ratio_median": round(statistics.median(ratios), 3), "ratio_range": [round(min(ratios), 3),
                                                                                 round(max(ratios), 3)],
           "plain_tokens_per_s": round(spec["tokens"] / statistics.median(p["plain_s"] for p in pairs), 1),
           "chunked_tokens_per_s": round(spec["tokens"] / statistics.median(p["chunked_s"] for p in pairs), 1),
           "max_loss_difference": max(abs(p["plain_loss"] - p["chunked_loss"]) for p in pairs)}
    Path(result_path).write_text(json.dumps(out))


# -- the driver ---------------------------------------------------------------------------

def build_models(shape: dict[str, Any], work: Path) -> dict[int, Path]:
    from ftcore.models.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    models = {}
    for vocab in shape["vocabs"]:
        folder = work / f"model-{vocab}"
        if not (folder / "config.json").exists():
            build_model(folder, tokenizer, hidden_size=shape["hidden"], layers=shape["layers"], heads=shape["heads"],
                        kv_heads=shape["kv_heads"], intermediate_size=shape["intermediate"], vocab_size=vocab)
        models[vocab] = folder
    return models


def write_data(shape: dict[str, Any], work: Path) -> Path:
    """Alpaca records of about 1,800 / batch tokens each: a batch packs into one row of about 1,800 tokens."""
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "number", "seven", "garden"]
    path = work / "train.jsonl"
    with path.open("w") as fh:
        for i in range(shape["examples"]):
            text = " ".join(f"{words[(i + k) % len(words)]}{(i * 7 + k) % 100}" for k in range(shape["words"]))
            fh.write(json.dumps({"instruction": f"Repeat item {i}.", "input": text, "output": text}) + "\n")
    return path


def run_config(model: Path, data: Path, out: Path, loss: str, shape: dict[str, Any]) -> dict[str, Any]:
    return {"plugins": ["lora", "alpaca"], "model": str(model), "output_dir": str(out), "overwrite": True,
            "alpaca": {"train_on_inputs": True},
            "data": {"datasets": [str(data)], "max_length": 2048, "val_size": 0, "packing": True, "cache": False},
            "report": {"enabled": False, "samples": 0},
            "training": {"loss": loss, "max_steps": shape["steps"], "batch_size": shape["batch"],
                         "gradient_accumulation": 1, "save_strategy": "no", "eval_strategy": "no",
                         "logging_steps": 1, "precision": "fp32", "gradient_checkpointing": False}}


def spawn(flag: str, tag: str, spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """Run one worker (``--worker`` or ``--paired-worker``) in its own process; its result with the load average
    before and after."""
    spec_path, result_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, flag, str(spec_path), str(result_path)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"{tag} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(result_path.read_text())
    result.update(load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2))
    return result


def run_worker(spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    tag = f"{spec['loss']}-{spec['vocab']}-r{spec['round']}"
    result = spawn("--worker", tag, spec, work, timeout)
    print(f"{tag}: peak {result['peak_rss_mib']:.0f} MiB, {result['tokens_per_s']:.0f} tokens/s, "
          f"train loss {result['train_loss']:.4f} ({result['loss_path']})", flush=True)
    return result


def run_paired(model: Path, tokens: int, pairs: int, work: Path, timeout: float) -> dict[str, Any]:
    tag = f"paired-{model.name}"
    result = spawn("--paired-worker", tag, {"model": str(model), "tokens": tokens, "pairs": pairs}, work, timeout)
    print(f"{tag}: chunked over plain {result['ratio_median']:.3f}x (pairs {result['ratio_range'][0]:.3f}-"
          f"{result['ratio_range'][1]:.3f}), max loss difference {result['max_loss_difference']:.2e}", flush=True)
    return result


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarize(runs: list[dict[str, Any]], shape: dict[str, Any], paired: dict[int, dict[str, Any]]
              ) -> dict[str, Any]:
    small, large = shape["vocabs"]
    cell = {(loss, vocab): [r for r in runs if r["loss"] == loss and r["vocab"] == vocab]
            for loss in LOSSES for vocab in shape["vocabs"]}
    table = {f"{loss}-{vocab}": {"peak_rss_mib": median(rs, "peak_rss_mib"),
                                 "peak_rss_range": [min(r["peak_rss_mib"] for r in rs), max(r["peak_rss_mib"] for r in rs)],
                                 "tokens_per_s": median(rs, "tokens_per_s"),
                                 "tokens_per_s_range": [min(r["tokens_per_s"] for r in rs),
                                                        max(r["tokens_per_s"] for r in rs)],
                                 "train_loss": median(rs, "train_loss"), "chunk_size": rs[0]["loss_chunk_size"]}
             for (loss, vocab), rs in cell.items()}
    extra_weights_mib = 2 * (large - small) * shape["hidden"] * 4 / MIB   # embedding and output layer rows, fp32
    budget_mib = 1.5 * extra_weights_mib + 300
    extra = {loss: table[f"{loss}-{large}"]["peak_rss_mib"] - table[f"{loss}-{small}"]["peak_rss_mib"] for loss in LOSSES}
    speed = {vocab: table[f"chunked-{vocab}"]["tokens_per_s"] / table[f"plain-{vocab}"]["tokens_per_s"]
             for vocab in shape["vocabs"]}
    paired_speed = {vocab: paired[vocab]["ratio_median"] for vocab in shape["vocabs"]}
    return {"table": table, "extra_weights_mib": round(extra_weights_mib, 1), "budget_mib": round(budget_mib, 1),
            "extra_peak_mib": {k: round(v, 1) for k, v in extra.items()},
            "chunked_over_plain_tokens_per_s": {str(k): round(v, 3) for k, v in speed.items()},
            "chunked_over_plain_paired": {str(k): v for k, v in paired_speed.items()},
            "targets": {"memory": extra["chunked"] <= budget_mib, "speed": paired_speed[large] >= 0.95}}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("ftcore", "transformers", "peft", "torch")}


def markdown(report: dict[str, Any]) -> str:
    s, shape = report["summary"], report["shape"]
    small, large = shape["vocabs"]
    lines = [
        "# Large vocabulary: the chunked loss against the plain loss",
        "",
        f"`python benchmarks/large_vocab_loss.py{' --smoke' if report['smoke'] else ''}` on {report['machine']}, "
        f"commit {report['commit']['sha'][:12]}{' (with uncommitted changes)' if report['commit']['dirty'] else ''}, "
        f"{shape['rounds']} interleaved round(s), medians (range). LoRA (ftcore defaults), fp32, {shape['steps']} steps "
        f"of one packed row of ~{report['row_tokens']} tokens, every token supervised; two Llama models (hidden "
        f"{shape['hidden']}, {shape['layers']} layers) that differ only in vocabulary rows ({small:,} and {large:,}). "
        f"Peak = the worker process's VmHWM (loading included). Training tokens/s = a step's tokens over the "
        f"median step time after the first step.",
        "",
        "| loss | vocabulary | peak RSS MiB | training tokens/s | final train loss | chunk |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for loss in LOSSES:
        for vocab in shape["vocabs"]:
            row = s["table"][f"{loss}-{vocab}"]
            lo, hi = row["peak_rss_range"]
            tlo, thi = row["tokens_per_s_range"]
            lines.append(f"| {loss} | {vocab:,} | {row['peak_rss_mib']:,.0f} ({lo:,.0f}-{hi:,.0f}) | "
                         f"{row['tokens_per_s']:,.0f} ({tlo:,.0f}-{thi:,.0f}) | {row['train_loss']:.4f} | "
                         f"{row['chunk_size'] or '-'} |")
    mem_ok, speed_ok = s["targets"]["memory"], s["targets"]["speed"]
    loads = ", ".join(f"{r['load_before']}/{r['load_after']}" for r in report["runs"])
    lines += [
        "",
        f"- Extra peak of the {large:,}-row vocabulary: plain {s['extra_peak_mib']['plain']:,.0f} MiB, chunked "
        f"{s['extra_peak_mib']['chunked']:,.0f} MiB, for {s['extra_weights_mib']:,.0f} MiB of extra weights (target: "
        f"at most 1.5x that + 300 MiB = {s['budget_mib']:,.0f} MiB: {'met' if mem_ok else 'missed'}).",
        f"- Chunked over plain training speed, paired in one process (forward and backward of the whole LoRA model "
        f"on one ~{report['row_tokens']}-token row, the two losses alternating, {shape['pairs']} pairs, median of "
        f"the per-pair ratios): {pair_text(report, large)} at {large:,} rows, {pair_text(report, small)} at "
        f"{small:,} (target: at least 0.95x at {large:,}: {'met' if speed_ok else 'missed'}). Losses of the two paths "
        f"differ by at most {max(report['paired'][str(v)]['max_loss_difference'] for v in shape['vocabs']):.1e}.",
        f"- The same ratio from the separate runs' medians (noisy on a shared machine): "
        f"{s['chunked_over_plain_tokens_per_s'][str(large)]:.2f}x at {large:,} rows, "
        f"{s['chunked_over_plain_tokens_per_s'][str(small)]:.2f}x at {small:,}.",
        f"- Load average before/after each run: {loads}"
        " (the machine is shared; ratios within a round are what compare).",
        "",
    ]
    return "\n".join(lines)


def pair_text(report: dict[str, Any], vocab: int) -> str:
    found = report["paired"][str(vocab)]
    lo, hi = found["ratio_range"]
    return f"{found['ratio_median']:.3f}x ({lo:.3f}-{hi:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--paired-worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny models, one round: the path, not the numbers")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; 1 with --smoke)")
    parser.add_argument("--work", type=Path, default=HERE / ".work-loss", help="models, data and runs")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where results-loss.json and RESULTS-loss.md go")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.paired_worker:
        paired_worker(*args.paired_worker)
        return
    shape = dict(SMOKE if args.smoke else FULL)
    if args.rounds:
        shape["rounds"] = args.rounds
    args.work.mkdir(parents=True, exist_ok=True)
    models = build_models(shape, args.work)
    data = write_data(shape, args.work)
    runs = []
    for rnd in range(shape["rounds"]):
        order = [(loss, vocab) for vocab in shape["vocabs"] for loss in LOSSES]
        if rnd % 2:
            order.reverse()            # alternate which configuration runs first
        for loss, vocab in order:
            config = run_config(models[vocab], data, args.work / f"run-{loss}-{vocab}", loss, shape)
            runs.append(run_worker({"config": config, "loss": loss, "vocab": vocab, "round": rnd}, args.work,
                                   args.timeout))
    row_tokens = round(runs[0]["tokens"] / shape["steps"])
    paired = {vocab: run_paired(models[vocab], row_tokens, shape["pairs"], args.work, args.timeout)
              for vocab in shape["vocabs"]}
    report = {"smoke": args.smoke, "shape": shape, "runs": runs, "paired": {str(k): v for k, v in paired.items()},
              "summary": summarize(runs, shape, paired), "row_tokens": row_tokens,
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "versions": versions(),
              "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results-loss.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out_dir / "RESULTS-loss.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
