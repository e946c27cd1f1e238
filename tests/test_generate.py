"""ftcore generate and ftcore chat: a base model, an adapter, a run directory; piped input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import corpus
from ux_runs import shared_run

from ftcore.cli import main
from ftcore.models.generation import ChatSession, complete
from ftcore.testing import CHATML_TEMPLATE, tiny_model
from ftcore.tools.generate import load

PROMPT = "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"


def _greedy(model, tok, text, n, add_special_tokens=True, stop=None):
    """Plain transformers greedy decoding, the reference the commands are checked against."""
    import torch

    ids = tok(text, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
    extra = {"stop_strings": stop, "tokenizer": tok} if stop else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, **extra)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny-chat"), corpus(), chat_template=CHATML_TEMPLATE)


def test_generate_base_model_matches_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir), "-n", "8", PROMPT])
    assert res.exit_code == 0, res.output
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    assert res.stdout == _greedy(model, tok, PROMPT, 8) + "\n"


def test_generate_reads_backslash_escapes_in_an_argument_as_llama_cli_does(tiny_model_dir):
    typed = PROMPT.replace("\n", "\\n")   # what a user types in double quotes: a backslash and an n
    runner = CliRunner()
    escaped = runner.invoke(main, ["generate", "--model", str(tiny_model_dir), "-n", "8", typed])
    piped = runner.invoke(main, ["generate", "--model", str(tiny_model_dir), "-n", "8", "-"], input=PROMPT)
    literal = runner.invoke(main, ["generate", "--model", str(tiny_model_dir), "-n", "8", "--no-escape", typed])
    assert escaped.exit_code == piped.exit_code == literal.exit_code == 0, escaped.output + literal.output
    assert escaped.stdout == piped.stdout != literal.stdout
    from ftcore.cli.generate import unescape

    assert unescape("a\\nb\\tc\\\\n\\x") == "a\nb\tc\\n\\x"   # an escaped backslash stays one; \x is kept


def test_generate_with_an_adapter_three_ways(tmp_path_factory, tiny_model_dir):
    """--adapter, the adapter folder alone, and the run directory all give base + adapter (plain PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = shared_run(tmp_path_factory, tiny_model_dir)
    adapter = result.model_dir
    tok = AutoTokenizer.from_pretrained(str(adapter))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter))
    expected = _greedy(peft_model.eval(), tok, PROMPT, 8)
    base_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    runner = CliRunner()
    for args in (["--model", str(tiny_model_dir), "--adapter", str(adapter)], ["--model", str(adapter)],
                 ["--model", str(result.output_dir)]):
        res = runner.invoke(main, ["generate", *args, "-n", "8", "-"], input=PROMPT)   # prompt on stdin
        assert res.exit_code == 0, res.output
        assert res.stdout == expected + "\n"
    model, tok2 = load(str(result.output_dir))
    assert complete(model, tok2, PROMPT, 8) == expected
    # the adapter really is applied: the logits are PEFT's, not the base model's
    import torch

    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs, base = (m(input_ids=ids).logits for m in (model, peft_model, base_model))
    assert torch.allclose(ours, theirs, atol=1e-4) and (ours - base).abs().max() > 1e-4


def test_generate_errors_are_messages(tmp_path):
    res = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "missing"), "hi"])
    assert res.exit_code == 2 and "no such folder" in res.stderr
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "empty"), "hi"])
    assert res.exit_code == 2 and "not a transformers model folder" in res.stderr


def _chat_reference(model, tok, turns, n):
    """What a conversation should produce: the chat template, greedy, stopping at the end-of-turn marker."""
    history, replies = [], []
    for user in turns:
        if user == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": user})
        text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        reply = _greedy(model, tok, text, n, add_special_tokens=False, stop=["<|im_end|>"])
        reply = reply.split("<|im_end|>")[0].strip()
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def test_chat_with_piped_input_follows_the_chat_template(chat_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    turns = ["Hello there.", "What is the capital of France?", "/reset", "Say one, two, three."]
    proc = subprocess.run([sys.executable, "-m", "ftcore.cli", "chat", "--model", str(chat_model_dir), "-n", "6"],
                          input="\n".join(turns) + "\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(str(chat_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(chat_model_dir)).eval()
    expected = _chat_reference(model, tok, turns, 6)
    assert proc.stdout.split("\n")[:-1] == expected           # one line per reply, nothing else on stdout
    assert "conversation reset" in proc.stderr


def test_chat_session_keeps_history_and_the_marker_out(chat_model_dir):
    model, tok = load(str(chat_model_dir))
    session = ChatSession(model, tok, system="Be brief.", max_new_tokens=6)
    assert session.marker == "<|im_end|>"
    first = session.reply("Hi")
    session.reply("Again")
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "user", "assistant"]
    assert session.history[2]["content"] == first and "<|im_end|>" not in first
    session.reset()
    assert session.history == [{"role": "system", "content": "Be brief."}]


def test_chat_refuses_a_model_without_a_chat_template(tiny_model_dir):
    res = CliRunner().invoke(main, ["chat", "--model", str(tiny_model_dir)], input="hello\n")
    assert res.exit_code == 2 and "has no chat template" in res.stderr and "ftcore generate" in res.stderr
