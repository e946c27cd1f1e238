"""The data path inside real runs on a tiny model: packing is exact, new chat tokens are trained
and saved so plain PEFT loads the adapter, evaluation runs on schedule, and the summary counts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, write_jsonl

import ftcore
from ftcore.data.batching import PackedCollator, PaddedCollator
from ftcore.data.labels import IGNORE_INDEX

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _features(tok):
    texts = [("Add 2 and 3.\n", "5</s>"), ("The quick brown fox\n", "jumps over the lazy dog.</s>"),
             ("Capital of France?\n", "Paris is the capital of France.</s>"), ("Count:\n", "One, two, three.</s>")]
    out = []
    for prompt, answer in texts:
        p = tok(prompt)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a})
    return out


def _one_by_one(model, features):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss.item()
                for f in features]


def _per_example_losses(logits, labels, boundaries):
    """Mean next-token loss of each example in a flattened row, given each example's (start, end)."""
    losses = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none",
                                               ignore_index=IGNORE_INDEX)
    out = []
    for start, end in boundaries:
        targets = labels[0, start + 1:end]
        out.append((losses[start:end - 1].sum() / (targets != IGNORE_INDEX).sum()).item())
    return out


def test_packed_batch_gives_the_same_per_example_loss_as_one_by_one(tiny):
    model, tok = tiny
    features = _features(tok)
    expected = _one_by_one(model, features)
    batch = PackedCollator()(features)
    assert batch["input_ids"].shape[0] == 1                       # one row, no padding
    assert batch["input_ids"].shape[1] == sum(len(f["input_ids"]) for f in features)
    lengths = [len(f["input_ids"]) for f in features]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert [int(batch["position_ids"][0, s]) for s in starts] == [0] * len(features)   # positions restart
    assert all(int(batch["labels"][0, s]) == IGNORE_INDEX for s in starts)            # no loss across boundaries
    boundaries = [(s, s + n) for s, n in zip(starts, lengths)]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        packed = _per_example_losses(logits, batch["labels"], boundaries)
        # the trainer's loss on the packed row is the token-weighted mean of the same losses
        loss = model(**batch).loss.item()
    assert packed == pytest.approx(expected, abs=1e-5)
    n_sup = [sum(1 for t in f["labels"][1:] if t != IGNORE_INDEX) for f in features]
    assert loss == pytest.approx(sum(e * n for e, n in zip(expected, n_sup)) / sum(n_sup), abs=1e-5)
    # the controls: positions that do not restart, or a KV cache (which turns the packed mask off),
    # let examples attend to each other
    with torch.no_grad():
        for leaky in (model(input_ids=batch["input_ids"], use_cache=False).logits,
                      model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits):
            losses = _per_example_losses(leaky, batch["labels"], boundaries)
            # (a random tiny model may barely react for one example; leakage anywhere is the point)
            assert max(abs(a - b) for a, b in zip(losses[1:], expected[1:])) > 1e-3


def test_padded_batch_gives_the_same_per_example_loss(tiny):
    model, tok = tiny
    features = _features(tok)
    expected = _one_by_one(model, features)
    collator = PaddedCollator(tok.pad_token_id)
    batch = collator(features)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = [_per_example_losses(logits[i:i + 1], batch["labels"][i:i + 1], [(0, len(f["input_ids"]))])[0]
           for i, f in enumerate(features)]
    assert got == pytest.approx(expected, abs=1e-5)
    real = sum(len(f["input_ids"]) for f in features)
    collator.counter.add_batch(batch)   # what a training step counts of the batch it takes
    assert collator.counter.real == real and collator.counter.computed == batch["input_ids"].numel() > real


class Grab:
    """Keeps the model a run trains, and the new tokens' rows as they were before training."""

    name = "grab"

    @ftcore.hookimpl
    def ftcore_model_loaded(self, model, ctx):
        self.model = model
        ids = torch.tensor([ctx.tokenizer.convert_tokens_to_ids(t) for t in ctx.added_tokens])
        self.ids = ids
        with torch.no_grad():
            self.emb_before = model.get_input_embeddings()(ids).clone()
            self.head_before = model.get_output_embeddings()(self.emb_before).clone()


CHATS = [{"messages": [{"role": "system", "content": "Answer with a number."},
                       {"role": "user", "content": f"What is {a} plus {a + 1}?"},
                       {"role": "assistant", "content": str(2 * a + 1)},
                       {"role": "user", "content": "And times two?"},
                       {"role": "assistant", "content": str(4 * a + 2)}]} for a in range(20)]


def test_chatml_new_tokens_are_trained_saved_and_load_with_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out", learning_rate=1e-3,
                      eval_strategy="steps", eval_steps=2)
    cfg["plugins"] = ["lora", "chatml"]
    grab = Grab()
    result = ftcore.run(cfg, plugins=[grab], **QUIET)

    # the markers were missing, so they were added, trained (input and output rows) and saved
    adapter = result.model_dir
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    new_ids = grab.ids.tolist()
    assert adapter_cfg["trainable_token_indices"] == {"embed_tokens": new_ids, "lm_head": new_ids}
    model = grab.model.eval()
    with torch.no_grad():
        emb_after = model.get_input_embeddings()(grab.ids)
        assert not torch.allclose(emb_after, grab.emb_before)
        assert not torch.allclose(model.get_output_embeddings()(grab.emb_before), grab.head_before)

    # what a user does with the adapter folder: plain transformers + PEFT
    tok = AutoTokenizer.from_pretrained(str(adapter))
    assert tok.convert_tokens_to_ids("<|im_end|>") in new_ids and "<|im_start|>" in tok.chat_template
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    text = tok.apply_chat_template(CHATS[0]["messages"], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert set(new_ids) <= set(ids[0].tolist())
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)

    # evaluation at the configured interval, at the start and at the end
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [r["step"] for r in rows if "eval_loss" in r]
    assert eval_steps[:3] == [0, 2, 4] and result.metrics["eval_loss"] is not None
    assert result.metrics["packing_efficiency"] == 1.0 and result.data_stats["packing_efficiency"] == 1.0


def test_run_summary_counts_too_long_examples_and_padding(tiny_model_dir, alpaca_file, tmp_path):
    long = {"instruction": "Repeat.", "input": "", "output": " ".join(["word"] * 300)}
    lines = alpaca_file.read_text().splitlines()
    data = write_jsonl(tmp_path / "train.jsonl", [*lines, json.dumps(long), json.dumps(long)])
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out")
    cfg["data"].update(packing=False, too_long="drop")
    result = ftcore.run(cfg, **QUIET)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["data_stats"]["dropped_too_long"] == 2 and summary["data_stats"]["truncated"] == 0
    assert 0 < summary["metrics"]["packing_efficiency"] < 1
    assert summary["data_stats"]["padded_efficiency"] == summary["data_stats"]["packing_efficiency"] < 1
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out2")
    cfg["data"]["too_long"] = "truncate"
    result = ftcore.run(cfg, **QUIET)
    assert result.data_stats["truncated"] == 2 and result.data_stats["dropped_too_long"] == 0
    assert result.metrics["packing_efficiency"] == 1.0


def test_a_model_that_cannot_take_packed_positions_gets_padded_batches(tiny_model_dir, tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

    from ftcore.data.batching import make_collator

    tok = tiny[1]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    logged = []
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))     # looks through PEFT
    assert isinstance(make_collator(True, tok, wrapped, logged.append), PackedCollator) and not logged
    # Bloom uses ALiBi and takes no position_ids: packed examples would attend to each other
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=16, n_layer=1, n_head=2))
    assert isinstance(make_collator(True, tok, bloom, logged.append), PaddedCollator)
    assert "does not take position_ids" in logged[0]
    assert isinstance(make_collator(False, tok, wrapped, logged.append), PaddedCollator)
