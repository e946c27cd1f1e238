"""Generated hostile records against every bundled format and `ftcore prepare`: each case ends in exit status
0 or 2, never 1 (a traceback), and with data.on_bad_record: skip every valid record survives.

The generator is seeded (the same cases every run) and mixes records that must be refused (random bytes,
deep nesting, unpaired surrogates, huge numbers, wrong types, missing fields, non-objects) with records
that are odd but valid (emoji, right-to-left text, NUL characters, long text, extra fields; max_length
holds the longest, so none is truncated away), so that "every
valid record survives" is checked against records known to be valid.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftcore.cli import main

SEED = 20261201
ODD_TEXT = ["caf\u00e9 na\u00efve", "emoji \U0001f642\U0001f680", "\u05e9\u05dc\u05d5\u05dd rtl", "nul\u0000inside",
            "tab\tand\rreturn", "combining e\u0301", " leading space", "x" * 1500, "<|im_start|> not special",
            "{\"looks\": \"like json\"}", "[1, 2]", "###", "\u200bzero width"]
WRONG = [None, 0, -1, 1.5, 10**30, True, [], ["a"], {}, {"a": 1}]


def _odd(rng: random.Random) -> str:
    return rng.choice(ODD_TEXT) + f" {rng.randint(0, 10**6)}"


def valid_record(fmt: str, rng: random.Random) -> dict:
    extra = {"id": rng.randint(0, 99), "source": "fuzz"} if rng.random() < 0.3 else {}
    if fmt == "alpaca":
        return {"instruction": _odd(rng), "input": rng.choice(["", _odd(rng)]), "output": _odd(rng), **extra}
    turns = [{"role": "system", "content": _odd(rng)}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        turns += [{"role": "user", "content": _odd(rng)}, {"role": "assistant", "content": _odd(rng)}]
    return {"messages": turns, **extra}


def hostile_line(fmt: str, rng: random.Random) -> bytes:
    """One line that must be refused, by one of many ways of being wrong."""
    good = valid_record(fmt, rng)
    kind = rng.randrange(11)
    if kind == 0:   # random bytes (no newline), invalid UTF-8 likely
        return bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(rng.randint(1, 200)))
    if kind == 1:   # deep nesting in a field
        depth = rng.choice([50, 5_000, 200_000])
        return b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == 2:   # an unpaired surrogate in a field the format reads
        text = json.dumps(good)
        return text.replace('"', '"\\ud83d', 4).encode() if fmt == "alpaca" else \
            json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) \
            .replace('"b"', '"\\udc00b"').encode()
    if kind == 3:   # a number too big for Python to read, or JSON's non-numbers
        return rng.choice([b'{"instruction": ' + b"9" * 6000 + b"}", b'{"instruction": NaN, "output": Infinity}',
                           b'{"output": 1e999999}'])
    if kind == 4:   # not an object
        return json.dumps(rng.choice([[1, 2], "text", 42, None, True])).encode()
    if kind == 5:   # truncated JSON
        text = json.dumps(good)
        return text[: rng.randint(1, len(text) - 1)].encode()
    if fmt == "alpaca":
        if kind in (6, 7):   # a required field missing
            del good[rng.choice(["instruction", "output"])]
        elif kind in (8, 9):   # a field of the wrong type
            good[rng.choice(["instruction", "input", "output"])] = rng.choice([w for w in WRONG if w is not None])
        else:   # nothing to learn
            good["output"] = rng.choice(["", "   ", "\n\t"])
        return json.dumps(good).encode()
    turns = good["messages"]
    if kind == 6:
        good["messages"] = rng.choice([[], None, "text", 5, {"role": "user"}])
    elif kind == 7:
        turns[rng.randrange(len(turns))]["role"] = rng.choice(["bot", "", None, 3, "USER"])
    elif kind == 8:
        turns[rng.randrange(len(turns))]["content"] = rng.choice([w for w in WRONG if not isinstance(w, str)])
    elif kind == 9:
        del turns[rng.randrange(len(turns))][rng.choice(["role", "content"])]
    else:
        good["messages"] = [t for t in turns if t["role"] != "assistant"]   # nothing to learn
    return json.dumps(good).encode()


def fuzz_file(path: Path, fmt: str, n: int = 240) -> tuple[int, int]:
    """Write n mixed lines; return (valid, hostile) counts."""
    rng = random.Random(f"{SEED}-{fmt}")
    lines, valid = [], 0
    for _ in range(n):
        if rng.random() < 0.4:
            lines.append(json.dumps(valid_record(fmt, rng)).encode())
            valid += 1
        else:
            lines.append(hostile_line(fmt, rng).replace(b"\n", b" "))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return valid, n - valid


def run_prepare(model: Path, data: Path, fmt: str, *extra: str):
    return CliRunner().invoke(main, ["prepare", "--model", str(model), "--plugins", fmt, "--data", str(data),
                                     "--set", "data.cache=false", "--set", "data.val_size=0",
                                     "--set", "data.max_length=8192", *extra, "--json"])


@pytest.mark.parametrize("fmt", ["alpaca", "chatml"])
def test_with_skip_every_valid_record_survives_and_every_hostile_one_is_counted(tiny_model_dir, tmp_path, fmt):
    data = tmp_path / f"{fmt}.jsonl"
    valid, hostile = fuzz_file(data, fmt)
    result = run_prepare(tiny_model_dir, data, fmt, "--set", "data.on_bad_record=skip")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    assert stats["records"] == valid + hostile
    assert stats["bad_records"] == hostile
    assert stats["train_examples"] == valid


@pytest.mark.parametrize("fmt", ["alpaca", "chatml"])
def test_without_skip_the_file_is_refused_with_exit_2(tiny_model_dir, tmp_path, fmt):
    data = tmp_path / f"{fmt}.jsonl"
    fuzz_file(data, fmt)
    result = run_prepare(tiny_model_dir, data, fmt)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{data}:" in result.output and "data.on_bad_record: skip" in result.output


@pytest.mark.parametrize("fmt", ["alpaca", "chatml"])
def test_each_hostile_record_alone_ends_in_exit_2(tiny_model_dir, tmp_path, fmt):
    """One file per case, as a user would bring it: every kind of being wrong, several times each."""
    rng = random.Random(f"{SEED}-alone-{fmt}")
    for case in range(33):
        data = tmp_path / f"case{case}.jsonl"
        data.write_bytes(hostile_line(fmt, rng).replace(b"\n", b" ") + b"\n")
        result = run_prepare(tiny_model_dir, data, fmt)
        assert result.exit_code == 2, (case, data.read_bytes()[:200], result.output)
        assert "Traceback" not in result.output
