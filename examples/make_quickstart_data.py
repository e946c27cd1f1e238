"""Write the quickstart datasets (examples/data/) and the builtin model's pretraining text.

The records are small, checkable facts written for ftcore: capitals, opposites, plurals,
numbers in words, weekdays and upper case. Each answer is one correct word or name, so
a fine-tune can be judged by eye.
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


def facts() -> list[tuple[str, str, str]]:
    """Every fact the quickstart teaches: (kind, key, answer)."""
    out = [("capital", country, city) for country, city in CAPITALS.items()]
    for word, opp in OPPOSITES.items():
        out += [("opposite", word, opp), ("opposite", opp, word)]
    out += [("plural", word, plural) for word, plural in PLURALS.items()]
    out += [("number", str(n), word) for n, word in enumerate(NUMBER_WORDS)]
    out += [("next_day", day, DAYS[(i + 1) % 7]) for i, day in enumerate(DAYS)]
    out += [("upper", word, word.upper()) for word in WORDS]
    return out


# Three ways to ask for each kind of fact ({k} is the key). The key stays in the instruction: with it
# in alpaca's input field instead, this small model answered 20 of 34 held-out questions, not 33.
QUESTIONS = {
    "capital": ["What is the capital of {k}?", "Name the capital city of {k}.", "Which city is the capital of {k}?"],
    "opposite": ["What is the opposite of {k}?", "Give the opposite of the word {k}.",
                 "Write a word that means the opposite of {k}."],
    "plural": ["What is the plural of {k}?", "Write the plural form of the noun {k}.",
               "One {k}, two ...? Give the plural."],
    "number": ["Write the number {k} in words.", "Spell out the number {k}.",
               "How is the number {k} written in words?"],
    "next_day": ["Which day comes after {k}?", "Name the day after {k}.", "What day follows {k}?"],
    "upper": ["Write {k} in capital letters.", "Write the word {k} in capital letters.",
              "Give the upper-case form of {k}."],
}
# How the builtin model's pretraining states each fact (ftcore/assets/pretrain-corpus.txt).
STATEMENTS = {
    "capital": "The capital of {k} is {a}.",
    "opposite": "The opposite of {k} is {a}.",
    "plural": "The plural of {k} is {a}.",
    "number": "The number {k} is written {a}.",
    "next_day": "The day after {k} is {a}.",
    "upper": "The word {k} in capital letters is {a}.",
}


def alpaca_records(rng: random.Random) -> list[dict[str, str]]:
    """Each fact asked three ways; the answer is the fact alone, so a right answer is plain to see.

    The model has read every fact in its pretraining (as a statement, never as an instruction);
    the fine-tune teaches it to answer questions from what it read. A held-out record asks a fact
    the training records ask in other words.
    """
    out: list[dict[str, str]] = []
    for kind, key, answer in facts():
        for question in QUESTIONS[kind]:
            out.append({"instruction": question.format(k=key), "input": "", "output": answer})
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
    """One plain statement per fact, for the builtin model's short pretraining."""
    out = [STATEMENTS[kind].format(k=key, a=answer) for kind, key, answer in facts()]
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(1234)
    data = ROOT / "data"
    data.mkdir(exist_ok=True)
    alpaca = alpaca_records(rng)
    chat = chat_records(random.Random(4321))
    (data / "quickstart-alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    (data / "quickstart-chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    assets = ROOT.parent / "ftcore" / "assets"
    (assets / "pretrain-corpus.txt").write_text("\n\n".join(pretraining_text(random.Random(99))) + "\n")
    # ftcore/assets/tokenizer-corpus.txt (the builtin tokenizer's and the tests' tokenizers' training text)
    # is not rewritten: it covers these words already, and the tests' token counts rest on it.
    print(f"wrote {len(alpaca)} alpaca and {len(chat)} chat records")


if __name__ == "__main__":
    main()
