"""The data-quality audit of `ftcore prepare`: duplicates, leakage, empty answers, nothing supervised, answers cut
by truncation, length outliers, supervised share; data that teaches nothing stops with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import write_jsonl

import ftcore
from ftcore.data.audit import Audit, record_text, signatures
from ftcore.tools.prepare import prepare_data

QUIET = {"log": lambda m: None}
LONG = ("the quick brown fox jumps over the lazy dog and then runs far away into the deep dark forest where "
        "nobody ever finds it again because the trees are tall and the paths are narrow and winding")


def _alpaca(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": str(2 * a + 1)}
            for a in range(start, start + n)]


def _cfg(model, datasets, plugins=("alpaca",), **data):
    return {"model": str(model), "plugins": list(plugins),
            "data": {"datasets": datasets, "max_length": 128, "val_size": 0, **data},
            "training": {"batch_size": 4}}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ftcore.cli", "prepare", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


# -- the audit itself (no tokenizer) --------------------------------------------------------------

def test_minhash_finds_near_duplicates_and_leakage_but_not_different_records():
    audit = Audit(threshold=0.8)
    words = LONG.split()
    texts = [LONG]                                                     # 0: the original
    texts.append(" ".join(words[:-1] + ["today"]))                    # 1: one word changed: near 0
    texts.append("an entirely different sentence about arithmetic and the sum of seven and eight")   # 2
    texts.append(LONG)                                                # 3: exact copy of 0
    texts.append(" ".join(["a"] + words[1:]))                          # 4: held out, near 0
    texts.append("yet another unrelated text that shares nothing with the others at all")         # 5: held out
    for i, t in enumerate(texts):
        audit.add(f"d.jsonl:{i + 1}", record_text({"text": t}), 10, 5)
    out = audit.summary([0, 1, 2, 3], [4, 5])
    found = out["findings"]
    assert found["exact_duplicates"] == {"count": 1, "lines": ["d.jsonl:4: same as d.jsonl:1"]}
    assert found["near_duplicates"] == {"count": 1, "lines": ["d.jsonl:2: near d.jsonl:1"]}
    assert found["leakage_near"] == {"count": 1, "lines": ["d.jsonl:5: held out, but near training d.jsonl:1"]}
    assert "leakage_exact" not in found
    assert out["duplicate_share"] == 0.5


def test_signatures_are_deterministic_and_estimate_jaccard():
    a = LONG
    b = " ".join(LONG.split()[:20])
    s1, s2 = signatures([a, b, ""]), signatures([a, b, ""])
    assert (s1 == s2).all() and s1.shape == (3, 64)
    assert (s1[2] == 0xFFFF).all()                                    # no words: no shingles
    assert (s1[0] == s1[1]).mean() < 0.8                              # a prefix of half the text is not near


def test_record_text_normalises_case_and_whitespace_and_ignores_keys():
    assert record_text({"instruction": "Add  2\nand 3.", "output": "5"}) == record_text(
        {"question": "add 2 and   3.", "answer": "5"})
    assert record_text({"messages": [{"role": "user", "content": "Hi"}]}) == "user hi"


# -- in prepare -------------------------------------------------------------------------------------

def test_prepare_reports_duplicates_leakage_and_distributions_with_lines(tiny_model_dir, tmp_path):
    records = _alpaca(24)
    records += [dict(records[2]), dict(records[5])]                          # lines 25, 26: exact copies
    data = write_jsonl(tmp_path / "train.jsonl", records)
    held = write_jsonl(tmp_path / "eval.jsonl", [dict(records[7]), *_alpaca(3, start=100)])   # eval.jsonl:1 leaks
    warnings = []
    report = prepare_data(_cfg(tiny_model_dir, [str(data)], eval_datasets=[str(held)]), log=warnings.append)
    audit = report.stats.audit
    found = audit["findings"]
    assert found["exact_duplicates"]["count"] == 2
    assert set(found["exact_duplicates"]["lines"]) == {f"{data}:25: same as {data}:3", f"{data}:26: same as {data}:6"}
    assert found["leakage_exact"] == {"count": 1, "lines": [f"{held}:1: held out, but also in training at {data}:8"]}
    assert audit["length"]["min"] <= audit["length"]["q1"] <= audit["length"]["median"] <= audit["length"]["max"]
    share = audit["supervised_share"]
    assert 0 < share["min"] <= share["q1"] <= share["median"] <= share["q3"] <= share["max"] <= 1
    # leakage warns (naming the line); 2 duplicates of 26 is heavy duplication (above 5%): a warning too
    assert any(w.startswith("warning: 1 of 4 held-out examples") and f"{held}:1" in w for w in warnings)
    assert any(w.startswith("warning: 2 training examples (7.7%") and f"{data}:25" in w for w in warnings)


def test_leakage_and_duplicates_stop_with_exit_2_when_set_to_error(tiny_model_dir, tmp_path):
    records = _alpaca(20)
    data = write_jsonl(tmp_path / "train.jsonl", records + [dict(records[4]), dict(records[5])])
    held = write_jsonl(tmp_path / "eval.jsonl", [dict(records[9])])
    base = ["--plugins", "alpaca", "--model", tiny_model_dir, "--data", data, "--set", "data.max_length=128"]
    leak = _cli(*base, "--set", f"data.eval_datasets={held}", "--set", "data.audit.on_leakage=error")
    assert leak.returncode == 2, leak.stderr
    assert "Traceback" not in leak.stderr
    assert f"{held}:1: held out, but also in training at {data}:10" in leak.stderr
    assert "data.audit.on_leakage: error" in leak.stderr
    dup = _cli(*base, "--set", "data.val_size=0", "--set", "data.audit.on_duplicates=error")
    assert dup.returncode == 2 and "Traceback" not in dup.stderr
    assert f"{data}:21: same as {data}:5" in dup.stderr and "data.audit.max_duplicate_share" in dup.stderr
    fine = _cli(*base, "--set", "data.val_size=0", "--set", "data.audit.on_duplicates=error",
                "--set", "data.audit.max_duplicate_share=0.1")            # 2 of 22 is below 10%
    assert fine.returncode == 0, fine.stderr
    assert "  exact duplicates in the training data: 2" in fine.stdout
    assert f"    {data}:22: same as {data}:6" in fine.stdout


def test_cached_data_keeps_its_audit_and_the_policy_still_applies(tiny_model_dir, tmp_path):
    records = _alpaca(12)
    data = write_jsonl(tmp_path / "train.jsonl", records + [dict(records[0])])
    first = prepare_data(_cfg(tiny_model_dir, [str(data)]), **QUIET)
    again = prepare_data(_cfg(tiny_model_dir, [str(data)]), **QUIET)
    assert again.stats.cached and not first.stats.cached
    assert again.stats.audit == first.stats.audit and again.stats.audit["findings"]["exact_duplicates"]["count"] == 1
    with pytest.raises(ftcore.DataError, match=r"train\.jsonl:13: same as .*train\.jsonl:1"):
        prepare_data(_cfg(tiny_model_dir, [str(data)], audit={"on_duplicates": "error"}), **QUIET)
    # a changed threshold is a changed audit: prepared again
    assert not prepare_data(_cfg(tiny_model_dir, [str(data)], audit={"near_duplicate_threshold": 0.9}),
                            **QUIET).stats.cached


def test_data_cut_before_every_answer_teaches_nothing_exit_2_naming_lines(tiny_model_dir, tmp_path):
    long_prompt = "Please read this carefully: " + LONG
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"{long_prompt} {i}", "input": "",
                                                   "output": "Yes."} for i in range(4)])
    proc = _cli("--plugins", "alpaca", "--model", tiny_model_dir, "--data", data, "--set", "data.max_length=16")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "the data would teach nothing: every example (4) is cut by data.max_length=16 before its answer" \
        in proc.stderr
    assert f"{data}:1: the answer starts after data.max_length=16 tokens" in proc.stderr


def test_answers_partly_cut_and_length_outliers_are_named(tiny_model_dir, tmp_path):
    records = _alpaca(12)
    records.append({"instruction": "Repeat the story.", "input": "", "output": LONG})     # line 13: long answer
    data = write_jsonl(tmp_path / "train.jsonl", records)
    audit = prepare_data(_cfg(tiny_model_dir, [str(data)], max_length=40), **QUIET).stats.audit
    assert audit["findings"]["answer_cut"]["lines"] == [f"{data}:13: the answer is cut at data.max_length=40"]
    audit = prepare_data(_cfg(tiny_model_dir, [str(data)], max_length=512), **QUIET).stats.audit
    outliers = audit["findings"]["length_outliers"]
    assert outliers["count"] == 1 and outliers["lines"][0].startswith(f"{data}:13: ")
    assert "answer_cut" not in audit["findings"]


class QuietFormat:
    """A format whose answer is the record's `answer` field, supervised with the EOS token after it."""

    name = "answer-field"

    @ftcore.hookimpl
    def ftcore_validate_record(self, record):
        return []

    @ftcore.hookimpl
    def ftcore_format_record(self, record, tokenizer):
        return ftcore.Example.from_segments([(record["question"] + "\n", False),
                                             (record["answer"] + tokenizer.eos_token, record["supervise"])])


def test_empty_answers_and_nothing_supervised_are_named_and_all_unsupervised_is_exit_2(tiny_model_dir, tmp_path):
    records = [{"question": f"Question {i}?", "answer": f"Answer {i}.", "supervise": True} for i in range(8)]
    records.append({"question": "Say nothing.", "answer": "  \n", "supervise": True})          # line 9
    records.append({"question": "Masked.", "answer": "Hidden.", "supervise": False})           # line 10
    data = write_jsonl(tmp_path / "train.jsonl", records)
    report = prepare_data(_cfg(tiny_model_dir, [str(data)], plugins=()), plugins=[QuietFormat()], **QUIET)
    found = report.stats.audit["findings"]
    assert found["empty_answers"] == {"count": 1, "lines": [f"{data}:9"]}
    assert found["unsupervised"] == {"count": 1, "lines": [f"{data}:10: the format supervises no token of it"]}
    assert report.stats.dropped_unsupervised == 1
    masked = write_jsonl(tmp_path / "masked.jsonl", [dict(r, supervise=False) for r in records])
    with pytest.raises(ftcore.DataError) as err:
        prepare_data(_cfg(tiny_model_dir, [str(masked)], plugins=()), plugins=[QuietFormat()], **QUIET)
    assert "the data would teach nothing: none of the 10 valid examples has a supervised token" in str(err.value)
    assert f"{masked}:1: the format supervises no token of it" in str(err.value)


def test_prepare_prints_the_audit_and_its_json(tiny_model_dir, tmp_path):
    records = _alpaca(16)
    data = write_jsonl(tmp_path / "train.jsonl", records + [dict(records[3])])
    proc = _cli("--plugins", "alpaca", "--model", tiny_model_dir, "--data", data, "--set", "data.val_size=0")
    assert proc.returncode == 0, proc.stderr
    assert "data audit (17 examples checked): 1 exact duplicates in the training data" in proc.stdout
    assert f"    {data}:17: same as {data}:4" in proc.stdout
    assert "supervised share per example: min " in proc.stdout and "length in tokens: min " in proc.stdout
    js = _cli("--plugins", "alpaca", "--model", tiny_model_dir, "--data", data, "--set", "data.val_size=0", "--json")
    stats = json.loads(js.stdout[js.stdout.index("{"):])["stats"]
    assert stats["audit"]["findings"]["exact_duplicates"]["lines"] == [f"{data}:17: same as {data}:4"]


def test_audit_can_be_turned_off(tiny_model_dir, tmp_path):
    records = _alpaca(8)
    data = write_jsonl(tmp_path / "train.jsonl", records + [dict(records[0])])
    report = prepare_data(_cfg(tiny_model_dir, [str(data)], audit={"enabled": False}), **QUIET)
    assert report.stats.audit == {}


def test_preference_data_gets_duplicate_and_leakage_checks(tiny_model_dir, tmp_path):
    pairs = [{"prompt": f"Tell me about topic {i}.", "chosen": f" Sure, topic {i} is fine.",
              "rejected": f" No, topic {i} is bad."} for i in range(10)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs + [dict(pairs[2])])
    held = write_jsonl(tmp_path / "held.jsonl", [dict(pairs[5])])
    cfg = {"model": str(tiny_model_dir), "plugins": ["dpo"], "output_dir": str(tmp_path / "out"),
           "data": {"datasets": [str(data)], "eval_datasets": [str(held)], "max_length": 64}}
    warnings = []
    audit = prepare_data(cfg, log=warnings.append).stats.audit
    assert audit["findings"]["exact_duplicates"]["lines"] == [f"{data}:11: same as {data}:3"]
    assert audit["findings"]["leakage_exact"]["lines"] == [f"{held}:1: held out, but also in training at {data}:6"]
    assert any(w.startswith("warning: 1 of 1 held-out examples") for w in warnings)
    cfg["data"]["audit"] = {"on_leakage": "error"}
    with pytest.raises(ftcore.DataError, match=r"held\.jsonl:1: held out"):
        prepare_data(cfg, **QUIET)


def test_config_file_audit_section_is_validated(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", _alpaca(4))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"plugins": ["alpaca"], "model": str(tiny_model_dir),
                                   "data": {"datasets": [str(data)], "audit": {"on_leakage": "stop"}}}))
    proc = _cli(cfg)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "on_leakage" in proc.stderr


def test_chunks_of_a_split_document_are_audited_by_their_own_text(tiny_model_dir, tmp_path):
    doc = " ".join(f"item {i} is {['red', 'green', 'blue', 'big', 'small'][i % 5]} and costs {i * 7}"
                   for i in range(60))
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": doc}, {"text": "A short note about apples."}])
    report = prepare_data(_cfg(tiny_model_dir, [str(data)], plugins=("text",), max_length=32), **QUIET)
    audit = report.stats.audit
    assert report.stats.split_documents == 1 and audit["examples"] == len(report.data.train) > 3
    assert "exact_duplicates" not in audit["findings"] and "near_duplicates" not in audit["findings"]
    copy = write_jsonl(tmp_path / "copy.jsonl", [{"text": doc}, {"text": doc}])
    found = prepare_data(_cfg(tiny_model_dir, [str(copy)], plugins=("text",), max_length=32),
                         **QUIET).stats.audit["findings"]
    assert found["exact_duplicates"]["lines"][0] == f"{copy}:2 (chunk 1): same as {copy}:1 (chunk 1)"
