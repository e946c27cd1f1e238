"""Packed (padding-free) DPO against TRL's padded default, side by side, on the same model, pairs and settings.

    python benchmarks/dpo_packing.py                       # CPU, 3 interleaved rounds (~10 min on 2 cores)
    python benchmarks/dpo_packing.py --quick               # a smoke run of the same path (tiny model, few steps)

Every trainer runs in its own process, on the same Llama-shaped model (built here, random weights: speed does not
depend on them), the same preference pairs (answers of very different lengths, as real preference data has: the
padded batches are mostly padding), LoRA r=16/alpha=32/dropout 0.05 on q/k/v/o, batch 4 pairs, learning rate,
steps, fp32, gradient checkpointing off everywhere, the trainer's default AdamW, plain SDPA attention:

- ``trl_padded``: TRL's DPOTrainer as its documentation sets it up (a PEFT model, a plain-text dataset, TRL's
  own tokenization and its padded collator). TRL's ``padding_free`` is disabled in TRL 1.16 (it warns and pads).
- ``ftcore_padded``: ``ftcore.run`` with ``--plugins lora,dpo`` and ``data.packing: false`` (TRL's trainer and
  collator inside ftcore: what ftcore itself adds to a step).
- ``ftcore_packed``: the same with ftcore's default ``data.packing: true``: each batch's real tokens in one row,
  positions restarting per sequence, ftcore's per-example attention on plain SDPA.

Measured alike for all: each optimizer step is timed (a callback, step begin to end), and the table's first
column is the median over every step of every round of that step's real tokens / its time; train time is the
Trainer's ``train_runtime``; tokens are the real (non-padding) tokens of
the batches trained on, counted when a training step takes a batch (as ftcore counts them); tokens/s = tokens /
train time. Every trainer takes the same batches in the same order (the pairs shuffled as ftcore reads them, the
same sampler seed), so the real token counts agree across the table. ``tests/test_objectives.py::test_packed_preference_batches_give_the_padded_runs_losses`` checks that the
packed run's losses equal the padded run's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRAINERS = ("trl_padded", "ftcore_padded", "ftcore_packed")
SEED = 42   # ftcore's default training.seed: every trainer takes the same batches in the same order
WORDS = ("the quick brown fox jumps over lazy dogs while models learn which answer people prefer and why some "
         "replies are polite helpful short long kind curt clear vague").split()


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"hidden": 64, "layers": 2, "pairs": 24, "steps": 4, "batch": 4, "max_length": 256}
    return {"hidden": 384, "layers": 2, "pairs": 64, "steps": 12, "batch": 4, "max_length": 768}


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompts of 20-120 words; answers of 5-240 words (log-uniform), the two sides of a pair of unrelated lengths."""
    rng = random.Random(seed)

    def length() -> int:
        return int(round(5 * (48 ** rng.random())))

    return [{"prompt": sentence(rng, rng.randint(20, 120)) + "?",
             "chosen": " Sure, " + sentence(rng, length()) + ".",
             "rejected": " No, " + sentence(rng, length()) + "."} for _ in range(n)]


def prepare(work: Path, s: dict[str, Any]) -> tuple[Path, Path]:
    sys.path.insert(0, str(HERE.parent))
    from ftcore.models.tiny import build_model, build_tokenizer

    pairs = make_pairs(s["pairs"])
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    model = work / f"model-{s['hidden']}x{s['layers']}"
    if not (model / "config.json").exists():
        tok = build_tokenizer([p["prompt"] + p["chosen"] + p["rejected"] for p in pairs[:50]], vocab_size=2048)
        build_model(model, tok, hidden_size=s["hidden"], layers=s["layers"], heads=max(4, s["hidden"] // 64),
                    kv_heads=max(2, s["hidden"] // 128))
    return model, data


# -- the workers (each in its own process) ---------------------------------------------------------------------------

def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")


def step_timer() -> Any:
    """A callback that times every optimizer step (the three trainers take the same batches, step for step)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.times.append(time.perf_counter() - self.started)

    return StepTimer()


def per_step(tokens: list[int], times: list[float]) -> dict[str, Any]:
    """Each step's tokens/s, and their median: robust to a slow spell of the shared machine."""
    speeds = [n / t for n, t in zip(tokens, times) if t > 0]
    return {"step_tokens": tokens, "step_times": times, "median_step_tokens_per_s": statistics.median(speeds)}


def run_trl(model_dir: Path, data: Path, s: dict[str, Any], out: Path) -> dict[str, Any]:
    import datasets
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa"),
                           lora_config())
    counted = {"real": 0, "computed": 0}
    args = DPOConfig(output_dir=str(out), max_steps=s["steps"], per_device_train_batch_size=s["batch"],
                     learning_rate=5e-5, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=1,
                     save_strategy="no", report_to="none", max_length=s["max_length"], bf16=False,
                     gradient_checkpointing=False, use_cpu=True, seed=SEED, data_seed=SEED, disable_tqdm=True)
    pairs = [json.loads(line) for line in data.read_text().splitlines()]
    random.Random(SEED).shuffle(pairs)   # the order ftcore reads them in (data.seed defaults to training.seed)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs),
                         processing_class=tok)
    step = trainer.training_step
    step_tokens: list[int] = []

    def counting(model, inputs, *args, **kwargs):   # noqa: ANN001 - counted when a step takes the batch, as ftcore
        counted["real"] += int(inputs["attention_mask"].sum())
        counted["computed"] += int(inputs["input_ids"].numel())
        step_tokens.append(int(inputs["attention_mask"].sum()))
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = counting
    timer = step_timer()
    trainer.add_callback(timer)
    output = trainer.train()
    return {"train_runtime": output.metrics["train_runtime"], "tokens": counted["real"],
            "computed_positions": counted["computed"], "loss": output.training_loss,
            **per_step(step_tokens, timer.times)}


def run_ftcore(model_dir: Path, data: Path, s: dict[str, Any], out: Path, packing: bool) -> dict[str, Any]:
    sys.path.insert(0, str(HERE.parent))
    import ftcore

    cfg = {"plugins": ["lora", "dpo"], "model": str(model_dir), "output_dir": str(out), "overwrite": True,
           "data": {"datasets": [str(data)], "max_length": s["max_length"], "val_size": 0, "packing": packing,
                    "cache": False},
           "training": {"max_steps": s["steps"], "batch_size": s["batch"], "gradient_accumulation": 1,
                        "learning_rate": 5e-5, "logging_steps": 1, "save_strategy": "no", "precision": "fp32",
                        "gradient_checkpointing": False, "seed": SEED},
           "report": {"samples": 0}}
    timer = step_timer()

    class Timing:
        name = "step-timer"

        @ftcore.hookimpl
        def ftcore_trainer_callbacks(self):
            return [timer]

    result = ftcore.run(cfg, plugins=[Timing()], log=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runtime = next(r["train_runtime"] for r in rows if "train_runtime" in r)
    seen = [r["tokens"] for r in rows if "loss" in r]   # cumulative real tokens at each step's log row
    return {"train_runtime": runtime, "tokens": result.metrics["tokens"],
            "computed_positions": result.metrics["computed_positions"], "loss": result.metrics["train_loss_mean"],
            **per_step([b - a for a, b in zip([0, *seen], seen)], timer.times)}


def worker(name: str, spec_path: Path, result_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    model, data, s, out = Path(spec["model"]), Path(spec["data"]), spec["settings"], Path(spec["out"])
    if name == "trl_padded":
        found = run_trl(model, data, s, out)
    else:
        found = run_ftcore(model, data, s, out, packing=name == "ftcore_packed")
    found["tokens_per_s"] = found["tokens"] / found["train_runtime"]
    result_path.write_text(json.dumps(found))


# -- the driver ------------------------------------------------------------------------------------------------------

def measure(work: Path, s: dict[str, Any], rounds: int) -> dict[str, list[dict[str, Any]]]:
    model, data = prepare(work, s)
    found: dict[str, list[dict[str, Any]]] = {t: [] for t in TRAINERS}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for r in range(rounds):
        for name in TRAINERS:   # interleaved: a slow spell of the shared machine hits every trainer
            spec = work / f"spec-{name}.json"
            result = work / f"result-{name}-{r}.json"
            spec.write_text(json.dumps({"model": str(model), "data": str(data), "settings": s,
                                        "out": str(work / f"out-{name}")}))
            proc = subprocess.run([sys.executable, __file__, "--worker", name, str(spec), str(result)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            found[name].append(json.loads(result.read_text()))
            print(f"round {r + 1} {name}: {found[name][-1]['tokens_per_s']:.0f} tokens/s (median step "
                  f"{found[name][-1]['median_step_tokens_per_s']:.0f})", file=sys.stderr)
    return found


def markdown(found: dict[str, list[dict[str, Any]]], s: dict[str, Any], command: str) -> str:
    import torch
    import transformers
    import trl

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in found[name])

    lines = ["# Packed DPO against TRL's padded default", "",
             f"Produced by `{command}` on {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores "
             f"(shared with other work) at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch "
             f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}.", "",
             f"A random Llama-shaped model (hidden {s['hidden']}, {s['layers']} layers), {s['pairs']} preference "
             f"pairs with answers of 5-240 words, LoRA r=16 on q/k/v/o, batch {s['batch']} pairs, {s['steps']} "
             f"steps, fp32, SDPA, gradient checkpointing off; {len(found[TRAINERS[0]])} interleaved rounds, median "
             f"(range).", "",
             "| trainer | tokens/s (median step) | tokens/s (whole run) | train time (s) | real tokens | "
             "computed positions | padding computed |",
             "|---|---|---|---|---|---|---|"]
    for name in TRAINERS:
        steps = [v for r in found[name] for v in (n / t for n, t in zip(r["step_tokens"], r["step_times"]) if t)]
        speeds = [r["tokens_per_s"] for r in found[name]]
        real, computed = med(name, "tokens"), med(name, "computed_positions")
        lines.append(f"| {name} | {statistics.median(steps):.0f} | {med(name, 'tokens_per_s'):.0f} "
                     f"({min(speeds):.0f}-{max(speeds):.0f}) | {med(name, 'train_runtime'):.1f} | {real:.0f} | "
                     f"{computed:.0f} | {1 - real / computed:.0%} |")

    def step_median(name: str) -> float:
        return statistics.median(n / t for r in found[name] for n, t in zip(r["step_tokens"], r["step_times"]) if t)

    base = step_median("trl_padded")
    lines += ["", f"Median step tokens/s, ftcore_packed / trl_padded: {step_median('ftcore_packed') / base:.2f}x; "
              f"ftcore_padded / trl_padded: {step_median('ftcore_padded') / base:.2f}x. The median over every "
              f"step of every round is the measure: the machine is shared and whole-run times swing with its load "
              f"(the range column).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=str(HERE / ".work-dpo"))
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--markdown")
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "SPEC", "RESULT"))
    a = parser.parse_args()
    if a.worker:
        worker(a.worker[0], Path(a.worker[1]), Path(a.worker[2]))
        return
    s = settings(a.quick)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rounds = 1 if a.quick else a.rounds
    found = measure(work, s, rounds)
    command = "python benchmarks/dpo_packing.py" + (" --quick" if a.quick else "") + \
        (f" --json {a.json_path}" if a.json_path else "") + (f" --markdown {a.markdown}" if a.markdown else "")
    text = markdown(found, s, command)
    print(text)
    if a.json_path:
        Path(a.json_path).write_text(json.dumps({"settings": s, "results": found}, indent=2))
    if a.markdown:
        Path(a.markdown).write_text(text)


if __name__ == "__main__":
    main()
