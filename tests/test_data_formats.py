"""The data users bring: raw text (the text format and .txt files), mapped columns and roles (Dolly, ShareGPT),
and tool-calling conversations rendered with real chat templates, masked token-exact."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from conftest import write_jsonl
from tool_templates import LLAMA31_SPECIALS, LLAMA31_TEMPLATE, QWEN25_SPECIALS, QWEN25_TEMPLATE

import ftcore
from ftcore.cli import main
from ftcore.data.labels import IGNORE_INDEX
from ftcore.testing import build_tokenizer, check_format, format_config, supervised_text
from ftcore.tools.prepare import prepare_data
from ftcore_plugins.formats import alpaca, chatml, text

DOCS = ["The quick brown fox jumps over the lazy dog. " * 6, "Paris is the capital of France.",
        "One, two, three, four, five, six, seven, eight, nine, ten. " * 4]


def prep(model_dir, datasets, plugins=("text",), max_length=32, sections=None, **data):
    cfg = {"model": str(model_dir), "plugins": list(plugins), **(sections or {}),
           "data": {"datasets": datasets, "max_length": max_length, "val_size": 0, "cache": False, **data}}
    return prepare_data(cfg, log=lambda m: None).data


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


# -- the text format --------------------------------------------------------------------------

def test_text_supervises_every_token_and_ends_with_eos():
    tok = build_tokenizer()
    cfg = format_config(names=["text"])
    ex, labels = check_format(text, {"text": "Paris is the capital of France."}, tok, cfg, strict_boundaries=True)
    ids = tok(ex.text, add_special_tokens=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels == [IGNORE_INDEX] + ids[1:]              # all but the BOS (which nothing predicts)
    assert supervised_text(ex, tok) == "Paris is the capital of France.</s>"
    assert ex.split_long


def test_text_field_is_configurable_and_validated():
    tok = build_tokenizer()
    cfg = format_config(names=["text"], text={"field": "body", "add_eos": False})
    ex, _ = check_format(text, {"body": "Hello there."}, tok, cfg)
    assert supervised_text(ex, tok) == "Hello there."
    for record, what in (({"text": "x"}, 'missing required field "body"'), ({"body": 3}, "expected a string"),
                         ({"body": "  "}, "is empty")):
        assert any(f == "body" and what in m for f, m in text.ftcore_validate_record(record, cfg)), record


def test_long_documents_are_split_into_consecutive_chunks_not_truncated(tiny_model_dir, tiny_tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    data = prep(tiny_model_dir, [str(f)], max_length=16, packing=False)
    rows = sorted(zip(data.train["input_ids"], data.train["labels"]))
    whole = [tiny_tokenizer(d + "</s>")["input_ids"] for d in DOCS]
    expected = sorted(c for ids in whole for c in (ids[i:i + 16] for i in range(0, len(ids), 16)) if len(c) > 1)
    assert [r[0] for r in rows] == expected                 # every token kept, in chunks of max_length
    assert all(len(ids) <= 16 for ids, _ in rows)
    for ids, labels in rows:                                 # every token supervised except a document's BOS
        assert labels == [IGNORE_INDEX if t == tiny_tokenizer.bos_token_id else t for t in ids]
    long_docs = sum(len(ids) > 16 for ids in whole)
    assert data.stats.split_documents == long_docs > 0 and data.stats.truncated == 0
    assert data.stats.examples == len(expected)


def test_long_documents_can_be_truncated_instead(tiny_model_dir, tiny_tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    data = prep(tiny_model_dir, [str(f)], max_length=16, packing=False,
                sections={"text": {"long_documents": "truncate"}})
    assert data.stats.split_documents == 0 and data.stats.truncated == 2 and data.stats.examples == 3
    assert sorted(data.train["input_ids"]) == sorted(tiny_tokenizer(d + "</s>")["input_ids"][:16] for d in DOCS)
    dropped = prep(tiny_model_dir, [str(f)], max_length=16, sections={"text": {"long_documents": "truncate"}},
                   too_long="drop")
    assert dropped.stats.dropped_too_long == 2 and dropped.stats.examples == 1


def test_txt_files_one_document_per_file_or_per_blank_line_block(tiny_model_dir, tiny_tokenizer, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("First paragraph\nstill first.\n\n\nSecond paragraph.\n")
    (folder / "b.txt").write_text("\n  \nOnly one.\n")
    (folder / "empty.txt").write_text(" \n\n")
    per_file = prep(tiny_model_dir, [{"path": str(folder), "txt_documents": "file"}], max_length=256)
    assert sorted(per_file.train["input_ids"]) == sorted(tiny_tokenizer(t + "</s>")["input_ids"] for t in (
        "First paragraph\nstill first.\n\n\nSecond paragraph.", "\n  \nOnly one."))
    blocks = prep(tiny_model_dir, [{"path": str(folder), "txt_documents": "blank_line"}], max_length=256)
    assert sorted(blocks.train["input_ids"]) == sorted(tiny_tokenizer(t + "</s>")["input_ids"] for t in (
        "First paragraph\nstill first.", "Second paragraph.", "Only one."))
    from ftcore.data.records import iter_text
    assert [w.rsplit(":", 1)[1] for w, _ in iter_text(folder / "a.txt", "blank_line")] == ["1", "5"]
    # a single .txt file named directly is one document (txt_documents: auto)
    single = prep(tiny_model_dir, [str(folder / "a.txt")], max_length=256)
    assert single.stats.examples == 1
    # by default a folder's .txt files are notes, and the error says how to read them
    code, out = cli("prepare", "--model", str(tiny_model_dir), "--plugins", "text", "--data", str(folder))
    assert code == 2 and "set txt_documents: file" in out


def test_a_txt_file_prepares_from_the_cli_split_and_packed(tiny_model_dir, tiny_tokenizer, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("\n\n".join(DOCS))
    result = CliRunner().invoke(main, ["prepare", "--model", str(tiny_model_dir), "--plugins", "text", "--data",
                                       str(f), "--set", "data.max_length=16", "--set", "data.val_size=0",
                                       "--set", "data.cache=false", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    n = len(tiny_tokenizer("\n\n".join(DOCS) + "</s>")["input_ids"])       # one document: the whole file
    assert stats["split_documents"] == 1 and stats["truncated"] == 0
    assert stats["train_examples"] == -(-n // 16) - (n % 16 == 1) and stats["tokens"] == n - (n % 16 == 1)
    assert stats["supervised_tokens"] == stats["tokens"] - 1                 # all but the BOS
    assert stats["packing_efficiency"] == 1.0                                 # packed as SFT data is
    code, out = cli("prepare", "--model", str(tiny_model_dir), "--plugins", "text", "--data", str(f),
                    "--set", "data.max_length=16", "--set", "data.cache=false", "--no-color")
    assert code == 0 and "split into chunks (too long)   1" in out


# -- column and role mapping ------------------------------------------------------------------

DOLLY = [{"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
         {"instruction": "Summarise.", "context": "Paris is the capital of France.", "response": "Paris: capital."}]
AS_ALPACA = [{"instruction": d["instruction"], "input": d["context"], "output": d["response"]} for d in DOLLY]
DOLLY_MAP = {"instruction_field": "instruction", "input_field": "context", "output_field": "response"}


def test_alpaca_field_names_map_dolly_records():
    tok = build_tokenizer()
    mapped = format_config(names=["alpaca"], alpaca=DOLLY_MAP)
    plain = format_config(names=["alpaca"])
    for dolly, same in zip(DOLLY, AS_ALPACA):
        ex, labels = check_format(alpaca, dolly, tok, mapped)
        assert (ex, labels) == check_format(alpaca, same, tok, plain)
    problems = alpaca.ftcore_validate_record({"instruction": "x", "output": "y"}, mapped)
    assert problems and problems[0][0] == "response" and "alpaca.output_field: response" in problems[0][1]
    assert "the record has fields instruction, output" in problems[0][1]


def test_dolly_file_loads_with_settings_alone_and_a_missing_field_names_file_line_and_field(tiny_model_dir, tmp_path):
    f = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    same = write_jsonl(tmp_path / "alpaca.jsonl", AS_ALPACA)
    mapped = prep(tiny_model_dir, [str(f)], plugins=("alpaca",), max_length=128, sections={"alpaca": DOLLY_MAP})
    assert mapped.train["labels"] == prep(tiny_model_dir, [str(same)], plugins=("alpaca",), max_length=128).train[
        "labels"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [DOLLY[0], {"instruction": "x", "context": "", "answer": "y"}])
    code, out = cli("prepare", "--model", str(tiny_model_dir), "--data", str(bad),
                    "--set", "alpaca.input_field=context", "--set", "alpaca.output_field=response")
    assert code == 2 and "Traceback" not in out
    assert f'{bad}:2: response: missing required field "response"' in out


SHAREGPT = {"conversations": [{"from": "system", "value": "You answer in one word."},
                              {"from": "human", "value": "Capital of France?"},
                              {"from": "gpt", "value": "Paris."}]}
AS_MESSAGES = {"messages": [{"role": {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]),
                             "content": m["value"]} for m in SHAREGPT["conversations"]]}
SHAREGPT_MAP = {"field": "conversations", "role_key": "from", "content_key": "value",
                "roles": {"human": "user", "gpt": "assistant", "system": "system"}}


@pytest.mark.parametrize("template", [None, QWEN25_TEMPLATE])
def test_chatml_maps_sharegpt_fields_and_roles(template):
    tok = build_tokenizer(chat_template=template, extra_special_tokens=QWEN25_SPECIALS if template else None)
    mapped, plain = format_config(names=["chatml"], chatml=SHAREGPT_MAP), format_config(names=["chatml"])
    chatml.ftcore_prepare_tokenizer(tok, plain)
    ex, labels = check_format(chatml, SHAREGPT, tok, mapped, strict_boundaries=True)
    assert (ex, labels) == check_format(chatml, AS_MESSAGES, tok, plain)
    assert supervised_text(ex, tok) == "Paris.<|im_end|>"


@pytest.mark.parametrize("record, field, what", [
    ({"messages": []}, "conversations", 'missing required field "conversations"'),
    ({"conversations": [{"role": "human", "value": "hi"}]}, "conversations[0].from", 'missing required field "from"'),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "conversations[0].from", "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "text": "hi"}]}, "conversations[0].value", 'missing required field "value"'),
])
def test_chatml_mapping_errors_name_the_mapped_field(record, field, what):
    problems = chatml.ftcore_validate_record(record, format_config(names=["chatml"], chatml=SHAREGPT_MAP))
    assert any(f == field and what in m for f, m in problems), problems


def test_chatml_role_map_targets_are_checked():
    with pytest.raises(ftcore.ConfigError, match="mapped to 'bot'"):
        format_config(names=["chatml"], chatml={"roles": {"gpt": "bot"}})


def test_sharegpt_file_loads_with_settings_alone(tiny_model_dir, tmp_path):
    f = write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT] * 3)
    same = write_jsonl(tmp_path / "chat.jsonl", [AS_MESSAGES] * 3)
    mapped = prep(tiny_model_dir, [str(f)], plugins=("chatml",), max_length=128, sections={"chatml": SHAREGPT_MAP})
    plain = prep(tiny_model_dir, [str(same)], plugins=("chatml",), max_length=128)
    assert mapped.train["input_ids"] == plain.train["input_ids"] and mapped.train["labels"] == plain.train["labels"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [SHAREGPT, {"conversations": [{"from": "robot", "value": "hi"}]}])
    with pytest.raises(ftcore.DataError, match=rf"{bad}:2: conversations\[0\].from: unknown role 'robot'"):
        prep(tiny_model_dir, [str(bad)], plugins=("chatml",), max_length=128, sections={"chatml": SHAREGPT_MAP})


# -- tool calling -----------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CHAT = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 20}'},
    {"role": "assistant", "content": "It is 20 degrees in Paris."},
]}
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'


@pytest.mark.parametrize("template, specials, expected", [
    (QWEN25_TEMPLATE, QWEN25_SPECIALS, QWEN_CALL + "It is 20 degrees in Paris.<|im_end|>"),
    (LLAMA31_TEMPLATE, LLAMA31_SPECIALS, LLAMA_CALL + "It is 20 degrees in Paris.<|eot_id|>"),
], ids=["qwen2.5", "llama3.1"])
def test_tool_calls_are_supervised_and_tool_results_are_not(template, specials, expected):
    tok = build_tokenizer(chat_template=template, extra_special_tokens=specials)
    cfg = format_config(names=["chatml"])
    assert chatml.ftcore_validate_record(TOOL_CHAT, cfg) == []
    ex, labels = check_format(chatml, TOOL_CHAT, tok, cfg, strict_boundaries=True)
    # rendered exactly as the model sees it at inference, tools included
    assert ex.text == tok.apply_chat_template(TOOL_CHAT["messages"], tools=TOOL_CHAT["tools"], tokenize=False)
    assert "get_weather" in ex.text[:ex.text.index("Weather in Paris?")]
    # token-exact: the supervised tokens are the assistant's tool call and answer, each with its end of turn
    assert supervised_text(ex, tok) == expected
    ids = tok(ex.text, add_special_tokens=False)["input_ids"]
    assert [t for t in labels if t != IGNORE_INDEX] == \
        [i for part in _turns(expected, specials) for i in tok(part, add_special_tokens=False)["input_ids"]]
    assert len(labels) == len(ids)


def _turns(expected: str, specials: list[str]) -> list[str]:
    end = "<|im_end|>" if "<|im_end|>" in specials else "<|eot_id|>"
    return [t + end for t in expected.split(end) if t]


def test_several_tool_calls_and_results_in_a_qwen_conversation():
    tok = build_tokenizer(chat_template=QWEN25_TEMPLATE, extra_special_tokens=QWEN25_SPECIALS)
    record = {"tools": json.dumps([WEATHER]), "messages": [      # tools as a JSON string, as a CSV cell holds them
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                                             {"name": "get_weather", "arguments": {"city": "Rome"}}]},
        {"role": "tool", "content": {"temp": 20}},
        {"role": "tool", "content": {"temp": 25}},
        {"role": "assistant", "content": "Paris 20, Rome 25."}]}
    cfg = format_config(names=["chatml"], chatml={"train_on": "last_assistant"})
    assert chatml.ftcore_validate_record(record, cfg) == []
    ex, _ = check_format(chatml, record, tok, cfg, strict_boundaries=True)
    assert '<tool_response>\n{"temp": 25}\n</tool_response>' in ex.text
    assert supervised_text(ex, tok) == "Paris 20, Rome 25.<|im_end|>"
    ex, _ = check_format(chatml, record, tok, format_config(names=["chatml"]), strict_boundaries=True)
    assert supervised_text(ex, tok) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>'
        "Paris 20, Rome 25.<|im_end|>")


def test_train_on_all_supervises_user_turns_but_never_tool_results():
    tok = build_tokenizer(chat_template=QWEN25_TEMPLATE, extra_special_tokens=QWEN25_SPECIALS)
    ex, _ = check_format(chatml, TOOL_CHAT, tok, format_config(names=["chatml"], chatml={"train_on": "all"}),
                         strict_boundaries=True)
    got = supervised_text(ex, tok)
    assert got.startswith("You help.\n\n# Tools") and "Weather in Paris?<|im_end|>" + QWEN_CALL in got
    assert got.endswith("It is 20 degrees in Paris.<|im_end|>") and '{"temp": 20}' not in got
    assert "<|im_start|>" not in got                                 # role headers are not supervised
    llama = build_tokenizer(chat_template=LLAMA31_TEMPLATE, extra_special_tokens=LLAMA31_SPECIALS)
    with pytest.raises(ftcore.DataError, match="chatml.train_on: assistant"):     # tools in the first user turn
        chatml.ftcore_format_record(TOOL_CHAT, llama, format_config(names=["chatml"], chatml={"train_on": "all"}))


def test_a_template_without_tool_support_is_refused_naming_what_it_drops():
    plain = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
             "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}")
    tok = build_tokenizer(chat_template=plain, extra_special_tokens=LLAMA31_SPECIALS)
    with pytest.raises(ftcore.DataError, match="does not support tool calling.*'get_weather'"):
        chatml.ftcore_format_record(TOOL_CHAT, tok, format_config(names=["chatml"]))


def test_tool_calls_without_a_tool_template_fail_naming_file_and_line(tiny_model_dir, tmp_path):
    f = write_jsonl(tmp_path / "tools.jsonl", [AS_MESSAGES, TOOL_CHAT])
    with pytest.raises(ftcore.DataError, match=rf"{f}:2: this conversation calls tools, and ChatML"):
        prep(tiny_model_dir, [str(f)], plugins=("chatml",), max_length=512)


@pytest.mark.parametrize("messages, field, what", [
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": "get_weather"}],
     "messages[1].tool_calls", "expected a list of tool calls, got str"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"function": 3}]}],
     "messages[1].tool_calls[0]", "expected an object"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"arguments": {}}]}],
     "messages[1].tool_calls[0].name", "a tool call names its function"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "tool_calls": [{"name": "f", "arguments": "not json"}]}],
     "messages[1].tool_calls[0].arguments", "expected an object of arguments"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "20"}, {"role": "assistant", "content": "y"}],
     "messages[1].role", "a tool result without a tool call before it"),
    ([{"role": "user", "content": "x", "tool_calls": []}, {"role": "assistant", "content": "y"}],
     "messages[0].tool_calls", "only assistant messages make tool calls"),
])
def test_bad_tool_calling_input_names_the_field(messages, field, what):
    problems = chatml.ftcore_validate_record({"messages": messages}, format_config(names=["chatml"]))
    assert any(f == field and what in m for f, m in problems), problems


def test_bad_tools_list_names_the_field():
    cfg = format_config(names=["chatml"])
    record = {"messages": TOOL_CHAT["messages"], "tools": [{"type": "function", "function": {"description": "x"}}]}
    assert any(f == "tools[0]" and "with a name" in m for f, m in chatml.ftcore_validate_record(record, cfg))
    assert chatml.ftcore_validate_record({**record, "tools": "get_weather"}, cfg) == [
        ("tools", "expected a list of tool schemas, got str")]


# -- the configuration reference's worked examples ---------------------------------------------

def test_the_configuration_reference_shows_dolly_and_sharegpt_as_worked_examples_that_validate():
    from ftcore.tools.reference import REPO_DOC, worked_examples

    doc = REPO_DOC.read_text()
    for name, schema in (("alpaca", alpaca.AlpacaConfig), ("chatml", chatml.ChatmlConfig), ("text", text.TextConfig)):
        for _, settings in schema.EXAMPLES:
            schema(**settings)                                      # each example is a valid section
        shown = "\n".join(worked_examples(name, schema))
        assert shown and shown in doc
    assert "  input_field: context\n  output_field: response" in doc
    assert "  field: conversations\n  role_key: from\n  content_key: value\n  roles:\n    human: user" in doc
    # and the examples are what the mapping tests above load files with
    assert alpaca.AlpacaConfig.EXAMPLES[0][1] == DOLLY_MAP and chatml.ChatmlConfig.EXAMPLES[0][1] == SHAREGPT_MAP


# -- a real run on text -------------------------------------------------------------------------

def test_report_samples_of_plain_text_prompt_with_the_first_half(tiny_tokenizer):
    import datasets

    from ftcore.training.callbacks import sample_prompts

    ids = tiny_tokenizer("Paris is the capital of France. Berlin is the capital of Germany.</s>")["input_ids"]
    labels = [IGNORE_INDEX] + ids[1:]                       # the text format: all but the BOS supervised
    got = sample_prompts(datasets.Dataset.from_dict({"input_ids": [ids], "labels": [labels]}), tiny_tokenizer, 1)
    assert got[0]["prompt_ids"] == ids[:len(ids) // 2] and got[0]["prompt"].startswith("Paris is")


def test_a_run_continues_pretraining_on_a_txt_corpus(tiny_model_dir, tmp_path):
    from conftest import tiny_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(DOCS * 4))
    (corpus / "b.txt").write_text("Berlin is the capital of Germany. " * 20)
    cfg = tiny_config(tiny_model_dir, corpus, tmp_path / "out")
    cfg["plugins"] = ["lora", "text"]
    cfg["data"].update(datasets=[{"path": str(corpus), "txt_documents": "blank_line"}], max_length=24, val_size=2)
    result = ftcore.run(cfg, log=lambda m: None)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    stats = summary["data_stats"]
    assert stats["records"] == 13 and stats["split_documents"] > 0 and stats["truncated"] == 0
    assert stats["supervised_tokens"] == stats["tokens"] - stats["records"]          # every token but each BOS
    assert result.metrics["packing_efficiency"] == 1.0 and result.metrics["steps"] > 0
    assert math.isfinite(result.metrics["eval_loss"]) and result.metrics["eval_loss"] < result.metrics["eval_loss_start"]
