"""The plugin's own tests, written with the helpers ftcore.testing offers plugin authors."""

import pytest

import ftcore_sharegpt
from ftcore.testing import build_tokenizer, check_format, format_config, supervised_text

RECORD = {"conversations": [
    {"from": "human", "value": "What is the capital of France?"},
    {"from": "gpt", "value": "Paris."},
    {"from": "human", "value": "And of Italy?"},
    {"from": "gpt", "value": "Rome."},
]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_renders_vicuna_style_and_supervises_only_replies(tokenizer):
    example, labels = check_format(ftcore_sharegpt, RECORD, tokenizer, strict_boundaries=True)
    assert example.text == (ftcore_sharegpt.VICUNA_SYSTEM
                            + " USER: What is the capital of France? ASSISTANT: Paris.</s>"
                            + " USER: And of Italy? ASSISTANT: Rome.</s>")
    assert supervised_text(example, tokenizer) == " Paris.</s> Rome.</s>"


def test_labels_and_system_turn_are_configurable(tokenizer):
    config = format_config([ftcore_sharegpt], sharegpt={"user_label": "Q:", "assistant_label": "A:"})
    record = {"conversations": [{"from": "system", "value": "Be brief."}, *RECORD["conversations"][:2]]}
    example, _ = check_format(ftcore_sharegpt, record, tokenizer, config)
    assert example.text == "Be brief. Q: What is the capital of France? A: Paris.</s>"


@pytest.mark.parametrize("record, field", [
    ({}, "conversations"),
    ({"conversations": []}, "conversations"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "conversations[0].from"),
    ({"conversations": [{"from": "gpt", "value": 3}]}, "conversations[0].value"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "conversations"),
])
def test_bad_records_name_the_field(record, field):
    problems = ftcore_sharegpt.ftcore_validate_record(record, format_config([ftcore_sharegpt]))
    assert [f for f, _ in problems] == [field]
