"""Deterministic benchmark data and model: long-tailed alpaca records and a small Llama.

    python benchmarks/make_data.py --out benchmarks/.work            # what run.py calls

Writes ``train.jsonl`` (a few thousand alpaca records), ``heldout.jsonl`` (a fixed
held-out set), ``alpaca-100k.jsonl`` (for the data-preparation benchmark) and a model
folder built with ``ftcore.testing`` (a byte-level BPE tokenizer trained on the
generated text, a Llama-architecture model) and then briefly pretrained on plain text of
the same made-up language (``pretrain``: no instructions, no tasks), so that a fine-tune
starts from a model that can learn, not from random weights at the uniform-guess loss.
Everything follows from ``--seed``: the same seed gives the same files.

The length distribution is long-tailed on purpose, as real instruction data is: most
records are short (tens of tokens), about one in eight is long (hundreds of tokens,
some near the maximum length). Every record has a non-empty ``input``, so the reference
recipe's prompt (which always has an Input section) and ftcore's alpaca prompt are the
same text and the held-out loss is measured on identical token sequences.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "pa", "qu", "or", "en", "al", "is", "um",
             "bra", "cle", "dro", "fen", "gri", "hal", "jor", "kel", "mun", "nor", "pel", "ros", "sten", "tal"]
COMMON = ("the a of to and in is it that for on with as was at by this be from or an are not have which "
          "one all were when we there can more if will about up out them then so some her would make like "
          "time into has look two write go see number way could people than first water been call who oil "
          "its now find long down day did get come made may part river city house garden stone light music").split()
MODEL_SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate)
    "tiny": (128, 2, 4, 4, 384),           # for tests and --quick smoke runs
    "small": (512, 6, 8, 8, 1408),         # ~36M parameters with the benchmark tokenizer: the CPU default
    "medium": (1024, 20, 16, 16, 2816),    # ~290M: weights dominate memory (the QLoRA comparison)
    "1b": (2048, 16, 32, 8, 8192),         # Llama-3.2-1B shape: the GPU option
}


def make_words(rng: random.Random, n: int) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


def zipf_word(rng: random.Random, words: list[str]) -> str:
    if rng.random() < 0.35:
        return rng.choice(COMMON)
    i = int(len(words) * rng.random() ** 3)   # a heavy head, a long tail of rare words
    return words[i]


def length(rng: random.Random, long_share: float, max_words: int) -> int:
    """Words in a record's input: log-normal for most, a long tail up to max_words."""
    if rng.random() < long_share:
        return rng.randint(max_words // 3, max_words)
    return max(2, min(max_words, int(math.exp(rng.gauss(2.3, 0.6)))))


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    body = " ".join(zipf_word(rng, words) for _ in range(n))
    return body[:1].upper() + body[1:] + "."


def text_of(rng: random.Random, words: list[str], n: int) -> str:
    out, left = [], n
    while left > 0:
        k = min(left, rng.randint(5, 14))
        out.append(sentence(rng, words, k))
        left -= k
    return " ".join(out)


def record(rng: random.Random, words: list[str], long_share: float, max_words: int) -> dict[str, str]:
    n = length(rng, long_share, max_words)
    task = rng.randrange(6)
    if task == 0:
        items = [zipf_word(rng, words) for _ in range(n)]
        return {"instruction": "Reverse the order of the words in the list.",
                "input": " ".join(items), "output": " ".join(reversed(items))}
    if task == 1:
        nums = [rng.randint(0, 999) for _ in range(max(2, n // 2))]
        return {"instruction": "Sort these numbers from smallest to largest.",
                "input": ", ".join(map(str, nums)), "output": ", ".join(map(str, sorted(nums)))}
    if task == 2:
        text = text_of(rng, words, n)
        return {"instruction": "Rewrite the text in capital letters.", "input": text, "output": text.upper()}
    if task == 3:
        text = text_of(rng, words, n)
        return {"instruction": "How many sentences does the text have? Answer with the number and the first sentence.",
                "input": text, "output": f"{text.count('.')}. {text.split('. ')[0].rstrip('.')}."}
    if task == 4:
        a, b = zipf_word(rng, words), zipf_word(rng, words)
        text = text_of(rng, words, n)
        return {"instruction": f"Replace every '{a}' with '{b}' in the text and repeat it.",
                "input": text, "output": " ".join(b if w == a else w for w in text.split(" "))}
    topic = zipf_word(rng, words)
    return {"instruction": f"Write a short note about {topic} in the style of the example.",
            "input": sentence(rng, words, max(3, n // 4)), "output": text_of(rng, words, n)}


def generate(out: Path, seed: int = 0, train: int = 3000, heldout: int = 200, prep: int = 100_000,
             max_words: int = 200, long_share: float = 0.12) -> dict[str, Path]:
    """Write the data files (skipped when present with the same recipe); return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    recipe = {"seed": seed, "train": train, "heldout": heldout, "prep": prep, "max_words": max_words,
              "long_share": long_share, "version": 1}
    stamp = out / "data-recipe.json"
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl", "prep": out / "alpaca-100k.jsonl"}
    if stamp.exists() and json.loads(stamp.read_text()) == recipe and all(p.exists() for p in paths.values()):
        return paths
    rng = random.Random(seed)
    words = make_words(rng, 12000)
    for name, count in (("train", train), ("heldout", heldout), ("prep", prep)):
        with open(paths[name], "w", encoding="utf-8") as fh:
            for _ in range(count):
                fh.write(json.dumps(record(rng, words, long_share, max_words)) + "\n")
    stamp.write_text(json.dumps(recipe))
    return paths


def build(out: Path, size: str = "small", seed: int = 0, vocab_size: int = 16384, max_positions: int = 2048,
          pretrain_tokens: int = 0) -> Path:
    """Train the tokenizer on the generated training text and save a Llama of ``size``: random weights, then
    (``pretrain_tokens`` > 0) about that many tokens of causal-LM pretraining on plain made-up text."""
    from ftcore.testing import build_model, build_tokenizer

    folder = out / (f"model-{size}-v{vocab_size}" + (f"-pt{pretrain_tokens // 1000}k" if pretrain_tokens else ""))
    if (folder / "config.json").exists():
        return folder
    texts = []
    with open(out / "train.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            texts.append(f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:\n{r['output']}")
    tok = build_tokenizer(texts, vocab_size=vocab_size)
    hidden, layers, heads, kv, inter = MODEL_SIZES[size]
    build_model(folder, tok, hidden_size=hidden, layers=layers, heads=heads, kv_heads=kv, intermediate_size=inter,
                max_positions=max_positions, seed=seed)
    if pretrain_tokens:
        pretrain(folder, seed=seed, tokens=pretrain_tokens)
    if size in ("medium", "1b"):
        # Saved in bf16 like published checkpoints of this size (what QLoRA and the GPU runs load).
        import torch
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(torch.bfloat16).save_pretrained(folder)
    return folder


def pretrain(folder: Path, seed: int = 0, tokens: int = 200_000, block: int = 64, batch: int = 16) -> None:
    """Causal-LM pretraining of the model in ``folder`` (in place) on plain text of the made-up language.

    The text is sentences only (``text_of``), never an instruction, a task or the alpaca prompt, so the
    fine-tune still has everything to learn about the tasks; the model just stops being a uniform guess.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(seed + 1)
    words = make_words(random.Random(seed), 12000)   # the same vocabulary as the records
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tok(text_of(rng, words, rng.randint(20, 120)))["input_ids"] + [tok.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    steps = max(1, len(blocks) // batch)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for i in range(steps):
        x = blocks[i * batch:(i + 1) * batch]
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.save_pretrained(str(folder), safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/.work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-size", default="small", choices=sorted(MODEL_SIZES))
    args = ap.parse_args()
    out = Path(args.out)
    paths = generate(out, seed=args.seed)
    model = build(out, args.model_size, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in {**paths, "model": model}.items()}, indent=2))


if __name__ == "__main__":
    main()
