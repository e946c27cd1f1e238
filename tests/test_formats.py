"""The bundled formats: alpaca's prompt and supervision, chatml's templates and exact token masking,
and the ftcore.testing helpers a plugin author uses to check a format."""

from __future__ import annotations

import re

import pytest

import ftcore
from ftcore import testing
from ftcore.errors import ConfigError
from ftcore.testing import build_tokenizer, check_example, check_format, format_config, supervised_text
from ftcore_plugins.formats import alpaca, chatml

# A Llama-3-like template (its own header and end-of-turn tokens, BOS written by the template,
# contents trimmed) and a Zephyr-like one (role tags, EOS as the end of each turn).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
ZEPHYR_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>"]

CONVERSATION = {"messages": [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "a"},                       # contents that also occur in the scaffolding
    {"role": "assistant", "content": "a"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin, of course."},
]}


@pytest.fixture(scope="module")
def plain_tok():
    return build_tokenizer()


def _config(**sections):
    return format_config(names=["alpaca", "chatml"], **sections)


# -- alpaca --------------------------------------------------------------------------

def test_alpaca_classic_prompt_with_input_and_eos(plain_tok):
    ex = alpaca.ftcore_format_record({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
                                     plain_tok, _config())
    assert ex.text == "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\nHello</s>"
    assert ex.add_special_tokens   # BOS from the tokenizer
    assert supervised_text(ex, plain_tok) == "Hello</s>"


@pytest.mark.parametrize("given", ["", "   ", None])
def test_alpaca_omits_the_input_block_when_input_is_empty(plain_tok, given):
    record = {"instruction": "Say hi.", "output": "Hi"} if given is None else \
        {"instruction": "Say hi.", "input": given, "output": "Hi"}
    ex = alpaca.ftcore_format_record(record, plain_tok, _config())
    assert ex.text == "### Instruction:\nSay hi.\n\n### Response:\nHi</s>"
    assert "### Input:" not in ex.text


def test_alpaca_supervises_response_and_eos_only_by_default(plain_tok):
    ex, labels = check_format(alpaca, {"instruction": "Add 2 and 3.", "input": "", "output": "5"}, plain_tok)
    ids = plain_tok(ex.text)["input_ids"]
    assert ids[0] == plain_tok.bos_token_id and labels[0] == -100
    assert labels[-1] == plain_tok.eos_token_id
    assert supervised_text(ex, plain_tok) == "5</s>"


def test_alpaca_train_on_inputs_supervises_the_prompt_too(plain_tok):
    cfg = _config(alpaca={"train_on_inputs": True})
    ex = alpaca.ftcore_format_record({"instruction": "Add 2 and 3.", "output": "5"}, plain_tok, cfg)
    assert supervised_text(ex, plain_tok) == "### Instruction:\nAdd 2 and 3.\n\n### Response:\n5</s>"


def test_alpaca_template_is_configurable_and_validated(plain_tok):
    cfg = _config(alpaca={"prompt": "Q: {instruction} [{input}]\nA: ", "prompt_no_input": "Q: {instruction}\nA: ",
                          "add_eos": False})
    ex = alpaca.ftcore_format_record({"instruction": "2+2?", "input": "math", "output": "4"}, plain_tok, cfg)
    assert ex.text == "Q: 2+2? [math]\nA: 4" and supervised_text(ex, plain_tok) == "4"
    ex = alpaca.ftcore_format_record({"instruction": "2+2?", "output": "4"}, plain_tok, cfg)
    assert ex.text == "Q: 2+2?\nA: 4"
    with pytest.raises(ConfigError, match=r"alpaca.prompt.*\{input\}"):
        _config(alpaca={"prompt": "Q: {instruction}\nA: "})
    with pytest.raises(ConfigError, match=r"alpaca.prompt_no_input.*\{instruction\}"):
        _config(alpaca={"prompt_no_input": "A: "})
    with pytest.raises(ConfigError, match="literal brace"):
        _config(alpaca={"prompt": "{instruction} {input} {oops}"})


@pytest.mark.parametrize("record, field, what", [
    ({"input": "", "output": "x"}, "instruction", "missing required field"),
    ({"instruction": "x"}, "output", "missing required field"),
    ({"instruction": 3, "output": "x"}, "instruction", "expected a string, got int"),
    ({"instruction": "x", "input": ["a"], "output": "x"}, "input", "expected a string, got list"),
    ({"instruction": "x", "output": "  "}, "output", "is empty"),
])
def test_alpaca_validation_names_field_and_problem(record, field, what):
    problems = alpaca.ftcore_validate_record(record, _config())
    assert any(f == field and what in m for f, m in problems), problems


# -- chatml: exact token-level masking --------------------------------------------------

def _assistant_text(end_marker: str, messages=CONVERSATION["messages"], strip=False) -> str:
    return "".join((m["content"].strip() if strip else m["content"]) + end_marker
                   for m in messages if m["role"] == "assistant")


def test_chatml_without_template_adds_markers_and_masks_exactly(plain_tok):
    tok = build_tokenizer()
    cfg = _config()
    added = chatml.ftcore_prepare_tokenizer(tok, cfg)
    assert added == ["<|im_start|>", "<|im_end|>"]
    assert len(tok) == len(plain_tok) + 2 and tok.chat_template == chatml.CHATML_TEMPLATE
    ex, labels = check_format(chatml, CONVERSATION, tok, cfg)
    assert ex.text == tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert supervised_text(ex, tok) == _assistant_text("<|im_end|>")
    # the markers are single special tokens, never split
    ids = tok(ex.text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == len(CONVERSATION["messages"])
    # a second prepare adds nothing
    assert chatml.ftcore_prepare_tokenizer(tok, cfg) == []


@pytest.mark.parametrize("template, specials, end", [
    (LLAMA3_TEMPLATE, LLAMA3_SPECIALS, "<|eot_id|>"),
    (ZEPHYR_TEMPLATE, ZEPHYR_SPECIALS, "</s>"),
])
def test_chatml_uses_the_tokenizers_own_template_and_masks_exactly(template, specials, end):
    tok = build_tokenizer(chat_template=template, extra_special_tokens=specials)
    cfg = _config()
    assert chatml.ftcore_prepare_tokenizer(tok, cfg) == []          # nothing added: the template is used
    ex, labels = check_format(chatml, CONVERSATION, tok, cfg, strict_boundaries=True)
    assert ex.text == tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert "<|im_start|>" not in ex.text
    assert supervised_text(ex, tok) == _assistant_text(end)
    # tokens as the model sees them at inference: the template's own tokenization
    assert tok(ex.text, add_special_tokens=False)["input_ids"] == \
        tok.apply_chat_template(CONVERSATION["messages"], tokenize=True, return_dict=True)["input_ids"]


def test_chatml_template_that_trims_contents_still_masks_exactly():
    tok = build_tokenizer(chat_template=LLAMA3_TEMPLATE, extra_special_tokens=LLAMA3_SPECIALS)
    messages = [{"role": "user", "content": "  Hi  "}, {"role": "assistant", "content": "\n Hello there. \n"}]
    ex, _ = check_format(chatml, {"messages": messages}, tok, _config())
    assert supervised_text(ex, tok) == "Hello there.<|eot_id|>"


@pytest.mark.parametrize("train_on, expected", [
    ("all", lambda end: "".join(m["content"] + end for m in CONVERSATION["messages"])),
    ("last_assistant", lambda end: "Berlin, of course." + end),
    ("assistant", lambda end: _assistant_text(end)),
])
@pytest.mark.parametrize("templated", [False, True])
def test_chatml_train_on_selects_turns(train_on, expected, templated):
    tok = build_tokenizer(chat_template=LLAMA3_TEMPLATE if templated else None,
                          extra_special_tokens=LLAMA3_SPECIALS if templated else None)
    cfg = _config(chatml={"train_on": train_on})
    chatml.ftcore_prepare_tokenizer(tok, cfg)
    ex, _ = check_format(chatml, CONVERSATION, tok, cfg)
    assert supervised_text(ex, tok) == expected("<|eot_id|>" if templated else "<|im_end|>")


def test_chatml_can_ignore_the_tokenizer_template():
    tok = build_tokenizer(chat_template=LLAMA3_TEMPLATE, extra_special_tokens=LLAMA3_SPECIALS)
    cfg = _config(chatml={"use_tokenizer_template": False})
    assert chatml.ftcore_prepare_tokenizer(tok, cfg) == ["<|im_start|>", "<|im_end|>"]
    ex, _ = check_format(chatml, CONVERSATION, tok, cfg)
    assert ex.text.startswith("<|im_start|>system\n") and supervised_text(ex, tok) == _assistant_text("<|im_end|>")


def test_chatml_custom_field():
    tok = build_tokenizer()
    cfg = _config(chatml={"field": "conversation"})
    chatml.ftcore_prepare_tokenizer(tok, cfg)
    ex, _ = check_format(chatml, {"conversation": CONVERSATION["messages"]}, tok, cfg)
    assert supervised_text(ex, tok) == _assistant_text("<|im_end|>")


def test_chatml_template_that_refuses_a_conversation_is_a_data_error():
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}" \
             "{% endif %}{{ m['content'] + eos_token }}{% endfor %}"
    tok = build_tokenizer(chat_template=strict)
    with pytest.raises(ftcore.DataError, match="no system role"):
        chatml.ftcore_format_record(CONVERSATION, tok, _config())


@pytest.mark.parametrize("record, field, what", [
    ({}, "messages", 'missing required field "messages"'),
    ({"messages": "hi"}, "messages", "expected a list of messages, got str"),
    ({"messages": []}, "messages", "is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", "unknown role 'bot'"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", 'missing required field "role"'),
    ({"messages": [{"role": "assistant", "content": 5}]}, "messages[0].content", "expected a string, got int"),
    ({"messages": [{"role": "assistant"}]}, "messages[0].content", 'missing required field "content"'),
    ({"messages": ["hi"]}, "messages[0]", "expected an object with role and content"),
])
def test_chatml_validation_names_field_and_problem(record, field, what):
    problems = chatml.ftcore_validate_record(record, _config())
    assert any(f == field and what in m for f, m in problems), problems


# -- ftcore.testing: the checks a plugin author uses -----------------------------------

def test_check_example_accepts_a_good_example(plain_tok):
    ex = ftcore.Example.from_segments([("Q: hi\nA:", False), (" hello</s>", True)])
    labels = check_example(ex, plain_tok, strict_boundaries=True)
    assert len(labels) == len(plain_tok(ex.text, add_special_tokens=False)["input_ids"])
    assert testing.render_supervision(ex, plain_tok) == "Q: hi\nA:[[ hello</s>]]"


@pytest.mark.parametrize("example, message", [
    (ftcore.Example("abc", [(0, 10)]), "outside the text"),
    (ftcore.Example("abc", [(2, 2)]), "empty or outside"),
    (ftcore.Example("abcdef", [(0, 4), (2, 6)]), "overlaps"),
    (ftcore.Example("abcdef", [(4, 6), (0, 2)]), "out of order"),
    (ftcore.Example("", []), "text is empty"),
    (ftcore.Example("nothing supervised", []), "no token is supervised"),
    (ftcore.Example("abc", [("0", 2)]), "is not (start, end)"),
    ("just a string", "expected ftcore.Example"),
])
def test_check_example_rejects_malformed_examples(plain_tok, example, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_example(example, plain_tok)


def test_check_example_strict_boundaries_catches_a_span_that_cuts_a_token(plain_tok):
    text = "The quick brown fox"
    cut = text.index("quick") + 2                   # inside the token "quick"
    ex = ftcore.Example(text, [(cut, len(text))])
    check_example(ex, plain_tok)                     # well formed...
    with pytest.raises(AssertionError, match="straddles"):
        check_example(ex, plain_tok, strict_boundaries=True)   # ...but part of "quick" would be trained on


def test_check_format_reports_a_plugin_that_rejects_a_good_record(plain_tok):
    with pytest.raises(AssertionError, match="rejected a record"):
        check_format(alpaca, {"instruction": "x"}, plain_tok)
