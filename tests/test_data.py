"""The data path without a model: loading every supported source, validation with file:line
messages, length limits, the validation split, mixing datasets, and the tokenized-data cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import write_jsonl

import ftcore
import ftcore.testing
from ftcore.cli import main
from ftcore.errors import DataError
from ftcore.tools.prepare import prepare_data
from ftcore_plugins.formats import alpaca

ALPACA = [{"instruction": f"Add {a} and {a + 1}.", "input": "" if a % 2 else f"{a}", "output": str(2 * a + 1)}
          for a in range(12)]
CHAT = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w.title()}]}
        for w in ("one", "two", "three", "four", "five", "six")]


def prep(model_dir, datasets, plugins=("alpaca",), objects=(), log=None, training=None, **data):
    """Run the data path alone (tokenizer only) for these dataset specs."""
    cfg = {"model": str(model_dir), "plugins": list(plugins),
           "data": {"datasets": datasets, "max_length": 128, "val_size": 0, **data},
           "training": {"batch_size": 4, **(training or {})}}
    return prepare_data(cfg, plugins=objects, log=log or (lambda m: None)).data


def _ids(prepared) -> list[list[int]]:
    return sorted(prepared.train["input_ids"])


# -- loading -------------------------------------------------------------------------

def test_jsonl_json_parquet_csv_give_the_same_examples(tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    (tmp_path / "d.json").write_text(json.dumps(ALPACA, indent=2))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ALPACA}))
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "d.parquet")
    import csv
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl.read_bytes())      # saved by a Windows editor
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode())
    reference = prep(tiny_model_dir, [str(jsonl)])
    assert reference.stats.records == len(ALPACA) == reference.stats.train_examples
    for name in ("d.json", "wrapped.json", "d.parquet", "d.csv", "bom.jsonl", "bom.json"):
        got = prep(tiny_model_dir, [str(tmp_path / name)])
        assert _ids(got) == _ids(reference), name
        assert got.stats.supervised_tokens == reference.stats.supervised_tokens


def test_globs_and_folders(tiny_model_dir, tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / ".ipynb_checkpoints").mkdir()
    write_jsonl(folder / "a.jsonl", ALPACA[:4])
    write_jsonl(folder / "sub" / "b.jsonl", ALPACA[4:7])
    (folder / "c.json").write_text(json.dumps(ALPACA[7:]))
    write_jsonl(folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl", ALPACA)   # hidden: ignored
    (folder / "notes.txt").write_text("not data")
    assert prep(tiny_model_dir, [str(folder)]).stats.records == len(ALPACA)
    assert prep(tiny_model_dir, [str(folder / "*.jsonl")]).stats.records == 4
    assert prep(tiny_model_dir, [str(folder / "**" / "*.jsonl")]).stats.records == 7


def test_saved_datasets_library_folders_and_splits(tiny_model_dir, tmp_path):
    import datasets

    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA[:5]),
                          "validation": datasets.Dataset.from_list(ALPACA[5:])}).save_to_disk(str(tmp_path / "dd"))
    assert prep(tiny_model_dir, [str(tmp_path / "saved")]).stats.records == len(ALPACA)
    assert prep(tiny_model_dir, [{"path": str(tmp_path / "dd"), "split": "validation"}]).stats.records == 7
    with pytest.raises(DataError, match="no split 'test'; it has train, validation"):
        prep(tiny_model_dir, [{"path": str(tmp_path / "dd"), "split": "test"}])


def test_a_datasets_library_name_loads_through_the_datasets_cache(tiny_model_dir, tmp_path, monkeypatch):
    """A hub dataset downloaded earlier and cached by the datasets library, now loaded offline by name."""
    import shutil

    import datasets

    cache = tmp_path / "hf-datasets"
    source = write_jsonl(tmp_path / "src.jsonl", ALPACA)
    datasets.load_dataset("json", data_files=str(source), split="train", cache_dir=str(cache))
    built = next(cache.glob("json/*/*/*/dataset_info.json")).parent      # json/<config>/<version>/<hash>
    # the layout the datasets library gives a downloaded hub dataset "someone/tiny-alpaca"
    target = cache / "someone___tiny-alpaca" / "default" / built.parent.name / built.name
    shutil.copytree(built, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", "tiny-alpaca-"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    got = prep(tiny_model_dir, ["someone/tiny-alpaca"])
    assert got.stats.records == len(ALPACA) and got.stats.per_dataset == {"someone/tiny-alpaca": len(ALPACA)}
    assert prep(tiny_model_dir, ["someone/tiny-alpaca"]).stats.cached     # keyed by the dataset's fingerprint
    assert _ids(got) == _ids(prep(tiny_model_dir, [str(source)]))


def test_a_dataset_name_that_cannot_be_loaded_is_a_clear_error(tiny_model_dir):
    # Names go to datasets.load_dataset; offline (as here) an uncached name must say so, not crash.
    with pytest.raises(DataError, match="dataset nobody/no-such-dataset is not in the datasets cache, and "
                                        "HF_HUB_OFFLINE is set"):
        prep(tiny_model_dir, ["nobody/no-such-dataset"])


def test_several_datasets_each_with_its_format_are_mixed_and_shuffled_by_seed(tiny_model_dir, tmp_path):
    a = write_jsonl(tmp_path / "instr.jsonl", ALPACA)
    c = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    specs = [{"path": str(a), "format": "alpaca"}, {"path": str(c), "format": "chatml"}]
    first = prep(tiny_model_dir, specs, plugins=["alpaca", "chatml"], seed=1)
    assert first.stats.per_dataset == {str(a): len(ALPACA), str(c): len(CHAT)}
    order = first.train["input_ids"]
    assert prep(tiny_model_dir, specs, plugins=["alpaca", "chatml"], seed=1).train["input_ids"] == order
    other = prep(tiny_model_dir, specs, plugins=["alpaca", "chatml"], seed=2).train["input_ids"]
    assert other != order and sorted(other) == sorted(order)
    # mixed, not concatenated: chat examples (no "###") are spread among the instruction ones
    tok = prepare_data({"model": str(tiny_model_dir), "plugins": ["alpaca", "chatml"],
                        "data": {"datasets": specs, "val_size": 0, "seed": 1}}, log=lambda m: None).tokenizer
    kinds = [tok.decode(ids).count("###") > 0 for ids in order]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)


def test_a_dataset_without_format_when_several_are_selected_is_an_error(tiny_model_dir, tmp_path):
    a = write_jsonl(tmp_path / "instr.jsonl", ALPACA)
    with pytest.raises(DataError, match="set format: in its data.datasets entry"):
        prep(tiny_model_dir, [str(a)], plugins=["alpaca", "chatml"])


# -- validation --------------------------------------------------------------------------

BAD_LINES = [
    ('{"instruction": "x", "output": "y"', ":2: malformed JSON at column"),
    ('{"input": "", "output": "y"}', ':2: instruction: missing required field "instruction"'),
    ('{"instruction": ["x"], "output": "y"}', ":2: instruction: expected a string, got list"),
    ('[1, 2]', ":2: expected a JSON object, got list"),
]
BAD_CHATS = [
    ({"messages": []}, ":2: messages: is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, ":2: messages: has no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
     ":2: messages[1].role: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
     ":2: messages[0].content: expected a string, got int"),
]


@pytest.mark.parametrize("line, expected", BAD_LINES)
def test_bad_alpaca_record_is_reported_with_file_line_field(tiny_model_dir, tmp_path, line, expected):
    f = write_jsonl(tmp_path / "train.jsonl", [ALPACA[0], line, *ALPACA[1:]])
    with pytest.raises(DataError) as info:
        prep(tiny_model_dir, [str(f)])
    assert f"{f}{expected}" in str(info.value)
    assert "data.on_bad_record: skip" in str(info.value)


@pytest.mark.parametrize("record, expected", BAD_CHATS)
def test_bad_chat_record_is_reported_with_file_line_field(tiny_model_dir, tmp_path, record, expected):
    f = write_jsonl(tmp_path / "chat.jsonl", [CHAT[0], record, *CHAT[1:]])
    with pytest.raises(DataError) as info:
        prep(tiny_model_dir, [str(f)], plugins=["chatml"])
    assert f"{f}{expected}" in str(info.value)


def test_line_numbers_in_json_arrays_and_csv(tiny_model_dir, tmp_path):
    records = [ALPACA[0], {"instruction": "x"}, ALPACA[1]]
    (tmp_path / "d.json").write_text(json.dumps(records, indent=2))
    line = json.dumps(records, indent=2).splitlines().index("  {", 2) + 1
    with pytest.raises(DataError, match=rf"d\.json:{line}: output: missing"):
        prep(tiny_model_dir, [str(tmp_path / "d.json")])
    (tmp_path / "d.csv").write_text('instruction,input,output\n"a\nmultiline",,b\nno output,,\n')
    with pytest.raises(DataError, match=r"d\.csv:4: output: is empty"):
        prep(tiny_model_dir, [str(tmp_path / "d.csv")])
    (tmp_path / "broken.json").write_text('[\n  {"instruction": "x",\n  "output": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: malformed JSON"):
        prep(tiny_model_dir, [str(tmp_path / "broken.json")])


def test_the_error_lists_the_first_few_problems(tiny_model_dir, tmp_path):
    bad = [{"instruction": f"x{i}"} for i in range(9)]
    f = write_jsonl(tmp_path / "train.jsonl", [*ALPACA, *bad])
    with pytest.raises(DataError) as info:
        prep(tiny_model_dir, [str(f)], max_errors_shown=3)
    msg = str(info.value)
    assert "9 of 21 records are invalid" in msg
    assert msg.count("missing required field") == 3 and "... and 6 more problems" in msg
    assert f"{f}:13:" in msg and f"{f}:16:" not in msg


def test_skip_mode_skips_bad_records_and_reports_how_many(tiny_model_dir, tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [*ALPACA, "{oops", {"instruction": "x"}])
    logged = []
    got = prep(tiny_model_dir, [str(f)], on_bad_record="skip", log=logged.append)
    assert got.stats.bad_records == 2 and got.stats.train_examples == len(ALPACA)
    assert any("skipped 2 invalid records of 14" in m for m in logged)


@pytest.mark.parametrize("content, expected", [
    ("", "the training data is empty"),
    ("\n\n", "the training data is empty"),
    ('{"instruction": 1}\n{"output": 2}\n', "every record (2) is invalid"),
])
def test_empty_or_all_bad_data_is_an_error_even_when_skipping(tiny_model_dir, tmp_path, content, expected):
    f = tmp_path / "train.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        prep(tiny_model_dir, [str(f)], on_bad_record="skip")


def test_missing_file_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match=r"data file .*nope\.jsonl not found"):
        prep(tiny_model_dir, [str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataError, match="not found"):
        prep(tiny_model_dir, [str(tmp_path / "*.jsonl")])


def _cli(args):
    result = CliRunner().invoke(main, args)
    assert "Traceback" not in result.output
    return result


def test_bad_data_through_the_cli_exits_2_with_the_message(tiny_model_dir, tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [*ALPACA, {"instruction": "x", "output": 3}])
    result = _cli(["prepare", "--plugins", "alpaca", "--model", str(tiny_model_dir), "--data", str(f)])
    assert result.exit_code == 2
    assert f"{f}:13: output: expected a string, got int" in result.output
    result = _cli(["prepare", "--plugins", "alpaca", "--model", str(tiny_model_dir),
                   "--data", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "not found" in result.output
    # `ftcore run` stops the same way before loading a model, and never starts a zero-step run
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = subprocess.run([sys.executable, "-m", "ftcore.cli", "run", "--plugins", "lora,alpaca",
                           "--model", str(tiny_model_dir), "--data", str(empty), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "the training data is empty" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "adapter").exists()


# -- length limits and the validation split --------------------------------------------------

def test_too_long_examples_are_truncated_or_dropped_and_counted(tiny_model_dir, tmp_path):
    long = {"instruction": "Repeat.", "input": "", "output": " ".join(["word"] * 200)}
    long_prompt = {"instruction": " ".join(["word"] * 200), "input": "", "output": "ok"}
    f = write_jsonl(tmp_path / "train.jsonl", [*ALPACA, long, long_prompt])
    cut = prep(tiny_model_dir, [str(f)], max_length=64)
    assert cut.stats.truncated == 1 and cut.stats.dropped_too_long == 0
    assert cut.stats.dropped_unsupervised == 1     # truncation left nothing supervised: not trained on
    assert max(len(ids) for ids in cut.train["input_ids"]) == 64
    dropped = prep(tiny_model_dir, [str(f)], max_length=64, too_long="drop")
    assert dropped.stats.dropped_too_long == 2 and dropped.stats.truncated == 0
    assert dropped.stats.train_examples == len(ALPACA)
    # nothing left at all: an error that says where the records went, never a zero-step run
    only_long = write_jsonl(tmp_path / "long.jsonl", [long_prompt, long_prompt])
    with pytest.raises(DataError, match=r"of 2 records, 0 are invalid, 0 were dropped as longer than "
                                        r"data.max_length=64, 2 had nothing supervised left"):
        prep(tiny_model_dir, [str(only_long)], max_length=64)


@pytest.mark.parametrize("val_size, n_eval", [(0.25, 3), (5, 5), (0, 0)])
def test_val_size_fraction_or_count(tiny_model_dir, tmp_path, val_size, n_eval):
    f = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    got = prep(tiny_model_dir, [str(f)], val_size=val_size)
    assert got.stats.eval_examples == n_eval and got.stats.train_examples == len(ALPACA) - n_eval
    assert (got.eval is None) == (n_eval == 0)
    if got.eval is not None:   # held out: no example is in both
        assert not set(map(tuple, got.eval["input_ids"])) & set(map(tuple, got.train["input_ids"]))


def test_explicit_eval_datasets_replace_val_size(tiny_model_dir, tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    e = write_jsonl(tmp_path / "eval.jsonl", ALPACA[:3])
    got = prep(tiny_model_dir, [str(f)], eval_datasets=[str(e)], val_size=0.5)
    assert got.stats.train_examples == len(ALPACA) and got.stats.eval_examples == 3
    bad = write_jsonl(tmp_path / "bad-eval.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match="no evaluation examples are left in data.eval_datasets"):
        prep(tiny_model_dir, [str(f)], eval_datasets=[str(bad)], on_bad_record="skip")


# -- the tokenized-data cache ------------------------------------------------------------------

ALPACA_DEFAULTS = ftcore.testing.format_config(names=["alpaca"])


class CountingFormat:
    """Alpaca, counting how often records are formatted (i.e. tokenized)."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    @ftcore.hookimpl
    def ftcore_validate_record(self, record):
        return alpaca.ftcore_validate_record(record, ALPACA_DEFAULTS)

    @ftcore.hookimpl
    def ftcore_format_record(self, record, tokenizer):
        self.calls += 1
        return ftcore.Example.from_segments([(record["instruction"] + "\n", False), (record["output"], True)])


def test_second_run_on_the_same_data_skips_tokenization(tiny_model_dir, tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    fmt = CountingFormat()
    first = prep(tiny_model_dir, [str(f)], plugins=[], objects=[fmt], val_size=2)
    assert fmt.calls == len(ALPACA) and not first.stats.cached
    again = prep(tiny_model_dir, [str(f)], plugins=[], objects=[fmt], val_size=2,
                 training={"batch_size": 2}, packing=False)       # batching settings do not matter
    assert fmt.calls == len(ALPACA) and again.stats.cached
    assert again.train["input_ids"] == first.train["input_ids"] and again.eval["labels"] == first.eval["labels"]
    assert again.stats.packing_efficiency < 1.0               # computed for the padded mode asked now
    prep(tiny_model_dir, [str(f)], plugins=[], objects=[fmt], val_size=2, cache=False)
    assert fmt.calls == 2 * len(ALPACA)


def test_cache_is_invalidated_by_content_format_settings_and_tokenizer(tiny_model_dir, tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    assert not prep(tiny_model_dir, [str(f)]).stats.cached
    assert prep(tiny_model_dir, [str(f)]).stats.cached
    # the format's section
    cfg = {"model": str(tiny_model_dir), "plugins": ["alpaca"], "alpaca": {"train_on_inputs": True},
           "data": {"datasets": [str(f)], "max_length": 128, "val_size": 0}}
    assert not prepare_data(cfg, log=lambda m: None).stats.cached
    # a data setting that changes the examples
    assert not prep(tiny_model_dir, [str(f)], max_length=40).stats.cached
    # the file's content, even at the same size and modification time
    import os
    st = f.stat()
    text = f.read_text()
    f.write_text(text.replace('"Add 0', '"Add 9', 1))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    assert not prep(tiny_model_dir, [str(f)]).stats.cached
    # the tokenizer: its vocabulary, added tokens and chat template
    from transformers import AutoTokenizer

    from ftcore.data.cache import tokenizer_fingerprint
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    before = tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tiny_model_dir))) == before
    tok.chat_template = "{{ messages }}"
    with_template = tokenizer_fingerprint(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert len({before, with_template, tokenizer_fingerprint(tok)}) == 3


# -- tokenization with labels --------------------------------------------------------------------

def test_labels_supervise_exactly_the_tokens_overlapping_a_span():
    import random

    from ftcore.data.labels import IGNORE_INDEX, labels_from_offsets

    def by_definition(ids, offsets, spans):
        return [t if e > s and any(s < se and e > ss for ss, se in spans) else IGNORE_INDEX
                for t, (s, e) in zip(ids, offsets)]

    rng = random.Random(0)
    for _ in range(2000):      # random tokenizations (empty tokens included) and unsorted, overlapping spans
        pos, offsets = 0, []
        for _ in range(rng.randint(0, 30)):
            width = rng.choice([0, 1, 2, 3])
            offsets.append((pos, pos + width))
            pos += width
        spans = [(a, a + rng.randint(1, 6)) for a in (rng.randint(0, pos + 2) for _ in range(rng.randint(0, 4)))]
        ids = list(range(100, 100 + len(offsets)))
        assert labels_from_offsets(ids, offsets, spans) == (ids, by_definition(ids, offsets, spans))


def test_batched_tokenization_equals_one_by_one(tiny_tokenizer):
    from ftcore.data.labels import tokenize_many

    examples = [ftcore.Example.from_segments([(f"Q{i}: add {i} and {i}\n", False), (f"A: {2 * i}</s>", True)],
                                             add_special_tokens=bool(i % 2)) for i in range(7)]
    singles = []
    for ex in examples:
        enc = tiny_tokenizer(ex.text, add_special_tokens=ex.add_special_tokens)
        assert enc["input_ids"][0] == tiny_tokenizer.bos_token_id or not ex.add_special_tokens
        singles.append(tokenize_many([ex], tiny_tokenizer)[0])
    assert tokenize_many(examples, tiny_tokenizer) == singles
    expected = [tiny_tokenizer(ex.text, add_special_tokens=ex.add_special_tokens)["input_ids"] for ex in examples]
    assert [ids for ids, _ in singles] == expected


def test_the_backend_encoder_equals_the_tokenizers_own_call_or_gives_way_to_it(tiny_tokenizer):
    """prepare's tokenizer thread calls the Rust backend directly; the first batch is checked against the
    tokenizer's own call, and a tokenizer whose call does more than its backend (here: it upper-cases the text)
    keeps its own call."""
    import copy

    from ftcore.data.labels import backend_encoder, tokenize_batch, tokenize_many

    examples = [ftcore.Example.from_segments([(f"Q{i}: say {w}\n", False), (f"A: {w} {w}</s>", True)],
                                             add_special_tokens=bool(i % 2))
                for i, w in enumerate(["hello", "naïve", "x y z", "🙂 ok"] * 3)]
    own = copy.deepcopy(tiny_tokenizer)
    fast = tokenize_batch(examples, own, None, backend_encoder(own))
    assert [(i.tolist(), lab.tolist()) for i, lab in fast.rows()] == tokenize_many(examples, tiny_tokenizer)

    class Shouting(type(tiny_tokenizer)):
        def __call__(self, text, *args, **kwargs):
            return super().__call__([t.upper() for t in text], *args, **kwargs)

    loud = copy.deepcopy(tiny_tokenizer)
    loud.__class__ = Shouting
    expected = tokenize_many(examples, loud)
    assert expected != tokenize_many(examples, tiny_tokenizer)
    encode = backend_encoder(loud)
    for _ in range(2):   # the first batch (checked both ways), and one after it
        got = tokenize_batch(examples, loud, None, encode)
        assert [(i.tolist(), lab.tolist()) for i, lab in got.rows()] == expected
