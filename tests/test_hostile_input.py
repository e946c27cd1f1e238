"""The holes an adversarial pass found in the handling of bad input: each one, through the real command.

Data: CSV cells that look like JSON stay text, an unpaired surrogate or absurd nesting is one bad record,
memory follows max_length rather than the longest line, and every data-path message says what is there.
Paths and models: user errors, not internal ones (exit status 2, no traceback).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_jsonl

from ftcore.cli import main

GOOD = [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": str(2 * a + 1)} for a in range(8)]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def prepare(model: Path, *data: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """`ftcore prepare --json`: the exit status and what it printed on stdout (the JSON; logs go to stderr)."""
    args = ["prepare", "--model", str(model), "--set", "data.cache=false", *extra]
    for d in data:
        args += ["--data", d]
    result = CliRunner().invoke(main, [*args, "--json"])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


# -- records ---------------------------------------------------------------------------------

def test_csv_cells_that_look_like_json_stay_text(tiny_model_dir, tmp_path):
    rows = ['instruction,input,output', 'Give the config as JSON.,,"{""lr"": 0.0002}"',
            'List three numbers.,,"[1, 2, 3]"', 'Say hi.,,hi']
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    code, out = prepare(tiny_model_dir, str(tmp_path / "d.csv"), extra=("--set", "data.val_size=0", "--show", "3"))
    assert code == 0, out
    report = json.loads(out)
    assert report["stats"]["bad_records"] == 0 and report["stats"]["train_examples"] == 3
    shown = "\n".join(report["examples"])
    assert '{"lr": 0.0002}' in shown and "[1, 2, 3]" in shown


def test_a_conversation_in_a_csv_cell_still_loads_for_chatml(tiny_model_dir, tmp_path):
    import csv

    conversation = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    with open(tmp_path / "chat.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerows([["messages"], [conversation], [conversation]])
    code, out = prepare(tiny_model_dir, str(tmp_path / "chat.csv"),
                        extra=("--plugins", "chatml", "--set", "data.val_size=0"))
    assert code == 0, out
    assert json.loads(out)["stats"]["train_examples"] == 2


@pytest.mark.parametrize("line, field, reason", [
    ('{"instruction": "caf\\ud83d", "output": "x"}', "instruction", "unpaired UTF-16 surrogate"),
    ('{"instruction": "x", "output": "y", "meta": {"tag": ["\\udc00"]}}', r"meta\.tag\[0\]", "unpaired UTF-16 surrogate"),
    ('{"instruction": "x", "output": ' + "[" * 100_000 + "]" * 100_000 + "}", None, "nested too deeply"),
    ('{"instruction": "x", "output": ' + "9" * 5000 + "}", None, "malformed JSON"),
], ids=["surrogate", "nested-surrogate", "deep-nesting", "huge-integer"])
def test_a_hostile_record_is_one_bad_record_named_by_its_line(tiny_model_dir, tmp_path, line, field, reason):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:3]) + line + "\n"
                    + "".join(json.dumps(r) + "\n" for r in GOOD[3:]))
    code, out = cli("prepare", "--model", str(tiny_model_dir), "--data", str(data), "--set", "data.cache=false")
    assert code == 2 and "Traceback" not in out, out
    where = rf"train\.jsonl:4: {field}: " if field else r"train\.jsonl:4: "
    assert __import__("re").search(where + ".*" + reason, out), out
    code, out = prepare(tiny_model_dir, str(data), extra=("--set", "data.on_bad_record=skip", "--set", "data.val_size=0"))
    assert code == 0, out
    stats = json.loads(out)["stats"]
    assert stats["bad_records"] == 1 and stats["train_examples"] == len(GOOD)   # every valid record survives


def test_a_json_array_saved_as_jsonl_is_named_once_with_the_fix(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(GOOD * 25, indent=2))
    code, out = cli("prepare", "--model", str(tiny_model_dir), "--data", str(data))
    assert code == 2 and out.count("error:") == 1
    assert "train.jsonl:1: this file holds one JSON array, not one JSON object per line" in out and "name it .json" in out


def test_jsonl_named_txt_is_read_by_its_content(tiny_model_dir, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    code, out = prepare(tiny_model_dir, str(data), extra=("--set", "data.val_size=0"))
    assert code == 0, out
    assert json.loads(out)["stats"]["train_examples"] == len(GOOD)
    (tmp_path / "notes.txt").write_text("just some prose\n")   # plain text: one document {text: ...}
    code, out = cli("prepare", "--model", str(tiny_model_dir), "--data", str(tmp_path / "notes.txt"))
    assert code == 2 and "could not be read as parquet" not in out
    assert 'notes.txt:1: instruction: missing required field "instruction"' in out and "has fields text" in out
    (tmp_path / "notes.md").write_text("just some prose\n")
    code, out = cli("prepare", "--model", str(tiny_model_dir), "--data", str(tmp_path / "notes.md"))
    assert code == 2 and "notes.md: not a data file ftcore reads" in out


def test_a_folder_without_data_files_says_what_it_holds(tiny_model_dir, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    (folder / "b.txt").write_text("y")
    code, out = cli("prepare", "--model", str(tiny_model_dir), "--data", str(folder))
    assert code == 2 and "not found" not in out
    assert f"data folder {folder} holds no data files ftcore reads" in out and "2 .txt" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = cli("prepare", "--model", str(tiny_model_dir), "--data", str(empty))
    assert code == 2 and "holds no files" in out.replace("holds\nno", "holds no")


def test_an_empty_data_path_is_refused_instead_of_scanning_the_working_directory(tiny_model_dir, tmp_path):
    code, out = cli("prepare", "--model", str(tiny_model_dir), "--data", "")
    assert code == 2 and "a data path is empty" in out


@pytest.mark.slow
def test_a_50_mb_record_is_prepared_within_a_memory_cap(tiny_model_dir, tmp_path):
    """Memory follows max_length, not the longest line: what preparing 8 small records needs (the process's
    peak address space) plus 1 GiB is enough for a 50 MB record too. Tokenized whole, it took ~10 GB."""
    small = write_jsonl(tmp_path / "small.jsonl", GOOD)
    big = write_jsonl(tmp_path / "big.jsonl", [*GOOD, {"instruction": "Repeat.", "input": "",
                                                        "output": "word " * 10_000_000}])
    assert big.stat().st_size > 50_000_000
    probe = ("import sys\nsys.argv = ['ftcore', 'prepare', '--model', sys.argv[1], '--data', sys.argv[2], "
             "'--set', 'data.cache=false', '--set', 'data.max_length=256']\nfrom ftcore.cli import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             "peak = next(l for l in open('/proc/self/status') if l.startswith('VmPeak'))\n"
             "print('exit', code, int(peak.split()[1]) * 1024)\n")

    def prepare_in(data: Path, cap: int | None = None) -> tuple[int, int, str]:
        limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))) if cap else None
        proc = subprocess.run([sys.executable, "-c", probe, str(tiny_model_dir), str(data)], capture_output=True,
                              text=True, timeout=600, preexec_fn=limit)
        last = proc.stdout.strip().splitlines()[-1].split() if proc.stdout.strip() else ["exit", "?", "0"]
        return proc.returncode if last[1] == "?" else int(last[1]), int(last[2]), proc.stdout + proc.stderr

    code, peak, text = prepare_in(small)
    assert code == 0, text
    code, _, text = prepare_in(big, cap=peak + (1 << 30))
    assert code == 0, text
    assert "truncated (too long)           1" in text


# -- paths -----------------------------------------------------------------------------------

def test_an_output_path_that_is_a_file_is_a_user_error(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    target = tmp_path / "out"
    target.write_text("my notes")
    code, out = cli("run", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(target))
    assert code == 2 and "Traceback" not in out and out.count("error:") == 1, out
    assert "exists and is not a directory" in out and target.read_text() == "my notes"


def test_an_output_under_a_file_is_a_user_error(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    (tmp_path / "afile").write_text("x")
    code, out = cli("run", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "afile" / "run"))
    assert code == 2 and "Traceback" not in out, out
    assert f"{tmp_path / 'afile'} is a file, not a folder" in out


def test_an_output_in_an_unwritable_place_is_a_user_error(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    code, out = cli("run", "--model", str(tiny_model_dir), "--data", str(data), "--output", "/sys/ftcore-test/run")
    assert code == 2 and "Traceback" not in out, out
    assert "no permission" in out and "/sys/ftcore-test" in out


# -- models ----------------------------------------------------------------------------------

def test_a_truncated_weights_file_is_a_user_error_naming_the_folder(tiny_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    code, out = cli("run", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in out and "bug in that plugin" not in out, out
    assert f"model folder {model}: a weights file is damaged or incomplete" in out
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A model of another shape (hidden 32), for an adapter trained on the tiny model to be merged onto."""
    from ftcore.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("other-base"), hidden_size=32, heads=2, kv_heads=1)


def test_merging_or_generating_with_the_wrong_base_is_a_user_error(other_base, tmp_path):
    from ftcore.testing import finished_run

    adapter = finished_run(tmp_path / "run") / "adapter"
    code, out = cli("merge", "--adapter", str(adapter), "--base", str(other_base), "--output", str(tmp_path / "m"))
    assert code == 2 and "Traceback" not in out, out
    assert f"does not fit the base model {other_base}" in out and not (tmp_path / "m").exists()
    code, out = cli("generate", "--model", str(other_base), "--adapter", str(adapter), "hello")
    assert code == 2 and "Traceback" not in out and "does not fit the base model" in out, out


def test_generating_from_a_pickle_only_model_is_a_user_error(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    code, out = cli("generate", "--model", str(model), "hello")
    assert code == 2 and "Traceback" not in out, out
    assert "weights only as pickle files" in out


def test_generate_takes_the_builtin_model(monkeypatch, tiny_model_dir):
    from ftcore.models import builtin

    monkeypatch.setattr(builtin, "builtin_model", lambda name, log=print: Path(tiny_model_dir))
    code, out = cli("generate", "--model", "ftcore:tiny-llama", "--max-new-tokens", "3", "hello")
    assert code == 0, out


# -- checks --dry-run now does -------------------------------------------------------------------

def test_dry_run_finds_two_format_plugins_for_one_dataset_and_resume_with_overwrite(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD)
    code, out = cli("run", "--model", "m", "--plugins", "lora,alpaca,chatml", "--data", str(data), "--dry-run")
    assert code == 2 and "several format plugins are selected (alpaca and chatml)" in out
    code, out = cli("run", "--model", "ftcore:tiny-llama", "--data", str(data), "--resume", "auto", "--overwrite",
                    "--dry-run")
    assert code == 2 and "--resume and --overwrite contradict each other" in out
