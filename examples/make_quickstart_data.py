"""Write the quickstart datasets (examples/data/) and the builtin model's tokenizer corpus.

The records are small, checkable instruction tasks written for ftcore: capitals,
opposites, plurals, arithmetic, sorting, counting, case changes, unit conversion and
weekday questions. Each answer is correct, so a fine-tune can be judged by eye.
Run it again to regenerate the files exactly (the seed is fixed).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasilia", "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin", "India": "New Delhi", "China": "Beijing",
    "Mexico": "Mexico City", "Chile": "Santiago", "Austria": "Vienna", "Hungary": "Budapest",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "strong": "weak", "rich": "poor", "up": "down", "old": "young",
    "hard": "soft", "loud": "quiet", "wet": "dry", "near": "far", "high": "low", "clean": "dirty",
}
PLURALS = {
    "cat": "cats", "box": "boxes", "child": "children", "mouse": "mice", "city": "cities", "leaf": "leaves",
    "tooth": "teeth", "bus": "buses", "knife": "knives", "person": "people", "foot": "feet", "day": "days",
    "story": "stories", "glass": "glasses", "woman": "women", "potato": "potatoes",
}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "house", "garden", "pencil", "window",
         "orange", "mountain", "bridge", "candle", "rocket", "violin", "forest", "planet", "island", "silver"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def alpaca_records(rng: random.Random) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for country, city in CAPITALS.items():
        out.append({"instruction": f"What is the capital of {country}?", "input": "",
                    "output": f"The capital of {country} is {city}."})
    for word, opp in OPPOSITES.items():
        out.append({"instruction": "Give the opposite of the word.", "input": word, "output": opp})
        out.append({"instruction": "Give the opposite of the word.", "input": opp, "output": word})
    for word, plural in PLURALS.items():
        out.append({"instruction": "Write the plural form of the noun.", "input": word, "output": plural})
    for _ in range(70):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        out.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)})
    for _ in range(40):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        out.append({"instruction": f"What is {a} times {b}?", "input": "", "output": f"{a} times {b} is {a * b}."})
    for _ in range(50):
        words = rng.sample(WORDS, rng.randint(3, 6))
        out.append({"instruction": "Sort these words alphabetically.", "input": ", ".join(words),
                    "output": ", ".join(sorted(words))})
    for _ in range(30):
        word = rng.choice(WORDS)
        out.append({"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()})
    for _ in range(30):
        word = rng.choice(WORDS)
        out.append({"instruction": "How many letters are in this word?", "input": word,
                    "output": f'"{word}" has {len(word)} letters.'})
    for _ in range(30):
        km = rng.randint(1, 20)
        out.append({"instruction": "Convert kilometres to metres.", "input": f"{km} km",
                    "output": f"{km} km is {km * 1000} metres."})
    for i, day in enumerate(DAYS):
        for step in (1, 2):
            after = DAYS[(i + step) % 7]
            out.append({"instruction": f"Which day comes {NUMBER_WORDS[step]} day{'s' if step > 1 else ''} after {day}?",
                        "input": "", "output": f"{after}."})
    for n in range(0, 10):
        out.append({"instruction": "Write the number in words.", "input": str(n), "output": NUMBER_WORDS[n]})
    rng.shuffle(out)
    return out


def chat_records(rng: random.Random) -> list[dict[str, object]]:
    out = []
    system = "You are a concise assistant."
    countries = list(CAPITALS.items())
    for _ in range(120):
        (c1, k1), (c2, k2) = rng.sample(countries, 2)
        msgs = [{"role": "user", "content": f"What is the capital of {c1}?"},
                {"role": "assistant", "content": f"{k1}."},
                {"role": "user", "content": f"And of {c2}?"},
                {"role": "assistant", "content": f"{k2}."}]
        if rng.random() < 0.5:
            msgs.insert(0, {"role": "system", "content": system})
        out.append({"messages": msgs})
    for _ in range(80):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return out


def pretraining_text(rng: random.Random) -> list[str]:
    """Plain statements of the same facts, for the builtin model's short pretraining.

    The base model learns the facts; the quickstart's fine-tune then teaches it to answer
    instructions in the alpaca format, which it has never seen.
    """
    out = []
    for country, city in CAPITALS.items():
        out.append(f"{city} is the capital of {country}. The capital of {country} is {city}.")
    for word, opp in OPPOSITES.items():
        out.append(f"The opposite of {word} is {opp}, and the opposite of {opp} is {word}.")
    for word, plural in PLURALS.items():
        out.append(f"One {word}, two {plural}. The plural of {word} is {plural}.")
    for _ in range(150):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        out.append(f"{a} plus {b} is {a + b}. {a} and {b} make {a + b}.")
    for _ in range(60):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        out.append(f"{a} times {b} is {a * b}.")
    for _ in range(60):
        words = rng.sample(WORDS, rng.randint(3, 6))
        out.append(f"In alphabetical order: {', '.join(sorted(words))}.")
    for word in WORDS:
        out.append(f"The word {word} has {len(word)} letters. In capitals it is {word.upper()}.")
    for km in range(1, 21):
        out.append(f"{km} km is {km * 1000} metres.")
    for i, day in enumerate(DAYS):
        out.append(f"After {day} comes {DAYS[(i + 1) % 7]}, then {DAYS[(i + 2) % 7]}.")
    for n in range(10):
        out.append(f"The number {n} is written {NUMBER_WORDS[n]}.")
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(1234)
    data = ROOT / "data"
    data.mkdir(exist_ok=True)
    alpaca = alpaca_records(rng)
    chat = chat_records(rng)
    (data / "quickstart-alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    (data / "quickstart-chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    assets = ROOT.parent / "ftcore" / "assets"
    facts = pretraining_text(random.Random(99))
    (assets / "pretrain-corpus.txt").write_text("\n\n".join(facts) + "\n")
    corpus = list(facts)
    for r in alpaca:
        corpus.append(f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:\n{r['output']}")
    for r in chat:
        corpus.append("\n".join(f"{m['role']}\n{m['content']}" for m in r["messages"]))
    (assets / "tokenizer-corpus.txt").write_text("\n\n".join(corpus) + "\n")
    print(f"wrote {len(alpaca)} alpaca and {len(chat)} chat records")


if __name__ == "__main__":
    main()
