"""Every speedup that ships gives the same loss (float tolerance) as the plain path it replaces."""

from __future__ import annotations

import json

import pytest
import torch

import ftcore
from ftcore.data import labels
from ftcore.data import pipeline as data_mod
from ftcore.training import speedups
from tests.conftest import tiny_config, write_jsonl


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, init_lora_weights=False))
    model.eval()
    return model


def packed_batch(lengths, vocab, prompt=3):
    """One packed row as DataCollatorWithFlattening builds it: restarting positions, first label masked."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (1, sum(lengths)), generator=g)
    labels = ids.clone()
    pos, start = [], 0
    for n in lengths:
        pos += list(range(n))
        labels[0, start:start + prompt] = -100   # the prompt (and each example's first token) is not supervised
        start += n
    return {"input_ids": ids, "labels": labels, "position_ids": torch.tensor([pos])}


def padded_batch(lengths, vocab, pad):
    g = torch.Generator().manual_seed(2)
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), pad)
    labels = torch.full((len(lengths), longest), -100)
    mask = torch.zeros((len(lengths), longest), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, vocab, (n,), generator=g)
        labels[i, 4:n] = ids[i, 4:n]
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lora_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


@pytest.mark.parametrize("kind", ["packed", "padded"])
@pytest.mark.parametrize("num_items", [None, 37])
def test_sparse_logits_loss_and_grads_match_the_full_logits_loss(lora_model, kind, num_items):
    vocab = lora_model.config.vocab_size
    batch = (packed_batch([9, 30, 5, 17], vocab) if kind == "packed"
             else padded_batch([9, 30, 5, 17], vocab, lora_model.config.pad_token_id or 0))
    lora_model.zero_grad()
    full = lora_model(**batch, num_items_in_batch=num_items).loss
    full.backward()
    full_grads = lora_grads(lora_model)
    lora_model.zero_grad()
    sparse, outputs = speedups.sparse_causal_lm_loss(lora_model, batch, num_items)
    sparse.backward()
    sparse_grads = lora_grads(lora_model)
    n_targets = int((batch["labels"][:, 1:] != -100).any(dim=0).sum())
    assert outputs.logits.shape[1] == n_targets < batch["input_ids"].shape[1]   # really fewer logits
    assert torch.allclose(sparse, full, rtol=1e-5, atol=1e-6)
    assert torch.allclose(sparse_grads, full_grads, rtol=1e-4, atol=1e-7)


def test_packed_attention_matches_masked_sdpa(lora_model):
    vocab = lora_model.config.vocab_size
    batch = packed_batch([12, 40, 7, 21], vocab)
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}   # as in training
    base = lora_model.get_base_model()
    with torch.no_grad():
        reference = lora_model(**inputs).logits
        config = ftcore.RunConfig.model_validate({"model": "x"})
        name = speedups.apply(lora_model, config, log=lambda m: None)
        try:
            assert name == speedups.PACKED_ATTENTION == base.config._attn_implementation
            packed = lora_model(**inputs).logits
            padded = padded_batch([12, 30], vocab, 0)
            padded.pop("labels")
            padded["use_cache"] = False
            packed_padded = lora_model(**padded).logits
        finally:
            speedups.restore(lora_model, name)
        assert base.config._attn_implementation == "sdpa"
        sdpa_padded = lora_model(**padded).logits
    assert torch.allclose(packed, reference, atol=1e-5)
    mask = padded["attention_mask"].bool()
    assert torch.allclose(packed_padded[mask], sdpa_padded[mask], atol=1e-5)


def test_packed_attention_splits_the_row_per_example():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert speedups._segments(pos) == [(0, 3), (3, 5), (5, 9)]
    assert speedups._segments(torch.arange(6)[None]) == [(0, 6)]
    assert speedups._segments(torch.zeros(2, 4, dtype=torch.long)) is None   # a real batch is not a packed row
    # Computed once per forward pass (cached on the tensor), never reused for another row of the same shape.
    again = torch.tensor([[0, 1, 0, 1, 2, 3, 4, 0, 1]])
    assert speedups._segments(pos) == [(0, 3), (3, 5), (5, 9)]
    assert speedups._segments(again) == [(0, 2), (2, 7), (7, 9)]
    again[0, 2] = 2   # changed in place: recomputed
    assert speedups._segments(again) == [(0, 7), (7, 9)]


def test_batched_tokenization_gives_identical_ids_and_labels(tiny_tokenizer):
    examples = [ftcore.Example.from_segments([(f"### Instruction:\nSay {w}.\n\n### Response:\n", False),
                                                (f"{w} {w}! 🙂" + tiny_tokenizer.eos_token, True)],
                                               add_special_tokens=i % 3 != 0)
                for i, w in enumerate(["hello", "Paris", "naïve", "one two three", "x"] * 3)]
    examples.append(ftcore.Example("a b c d", [(0, 1), (4, 7)]))   # several spans
    examples.append(ftcore.Example("no spans", []))
    one_by_one = [labels.tokenize(ex, tiny_tokenizer) for ex in examples]
    assert labels.tokenize_many(examples, tiny_tokenizer) == one_by_one
    assert any(-100 in labels and set(labels) != {-100} for _, labels in one_by_one)


def test_prepare_batched_equals_record_by_record(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    records = [{"instruction": f"Say {w}.", "input": "" if i % 2 else w,
                "output": " ".join([w] * (i % 13 + 1))} for i, w in enumerate(["alpha", "beta", "gamma"] * 20)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config, plugins = ftcore.resolve({**tiny_config(tiny_model_dir, path, tmp_path / "o"),
                                      "data": {"datasets": [str(path)], "max_length": 40, "val_size": 5,
                                               "cache": False}})
    monkeypatch.setattr(data_mod, "TOKENIZE_BATCH", 7)
    batched = data_mod.prepare(config, plugins, tiny_tokenizer, log=lambda m: None)
    monkeypatch.setattr(data_mod, "TOKENIZE_BATCH", 1)
    single = data_mod.prepare(config, plugins, tiny_tokenizer, log=lambda m: None)
    assert batched.train.to_dict() == single.train.to_dict()
    assert batched.eval.to_dict() == single.eval.to_dict()
    assert batched.stats.as_dict() == single.stats.as_dict()
    assert batched.stats.truncated > 0


class EvalCounter:
    """A throw-away plugin counting evaluations and recording which trainer/attention ran."""

    def __init__(self):
        from transformers import TrainerCallback

        self.evaluations = 0
        self.seen = {}
        counter = self

        class Count(TrainerCallback):
            def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001
                counter.evaluations += 1

        self.callback = Count()

    @ftcore.hookimpl
    def ftcore_trainer_callbacks(self, ctx):
        return [self.callback]

    @ftcore.hookimpl
    def ftcore_trainer_created(self, trainer, ctx):
        base = trainer.model.get_base_model()
        self.seen = {"trainer": type(trainer).__name__, "attention": base.config._attn_implementation}


def metrics_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_speedups_has_the_same_losses_as_without(tiny_model_dir, tmp_path):
    records = [{"instruction": f"Count from {a} to {a + n}.", "input": "",
                "output": " ".join(str(a + k) for k in range(n + 1))}
               for a, n in [(i, (i * 7) % 23 + 1) for i in range(40)]]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    runs = {}
    for name, switch in (("fast", True), ("plain", False)):
        probe = EvalCounter()
        cfg = tiny_config(tiny_model_dir, data, tmp_path / name, sparse_logits=switch, packed_attention=switch,
                          eval_strategy="epoch", loss="auto" if switch else "plain")
        result = ftcore.run(cfg, plugins=[probe], log=lambda m: None)
        runs[name] = (result, probe)
    fast, plain = runs["fast"], runs["plain"]
    assert fast[1].seen == {"trainer": "FastLossTrainer", "attention": speedups.PACKED_ATTENTION}
    assert plain[1].seen == {"trainer": "Trainer", "attention": "sdpa"}
    assert fast[0].metrics["loss"]["path"] == "chunked" and plain[0].metrics["loss"]["path"] == "plain"
    fast_losses = [r["loss"] for r in metrics_rows(fast[0].output_dir) if "loss" in r]
    plain_losses = [r["loss"] for r in metrics_rows(plain[0].output_dir) if "loss" in r]
    assert len(fast_losses) == len(plain_losses) >= 8
    assert fast_losses == pytest.approx(plain_losses, rel=1e-4)
    assert fast[0].metrics["eval_loss"] == pytest.approx(plain[0].metrics["eval_loss"], rel=1e-4)
    assert fast[0].metrics["eval_loss_start"] == pytest.approx(plain[0].metrics["eval_loss_start"], rel=1e-4)
    # One evaluation at the start and one at the end of the epoch: the final metrics reuse the last one.
    assert fast[1].evaluations == plain[1].evaluations == 2
    last_logged = [r["eval_loss"] for r in metrics_rows(fast[0].output_dir) if "eval_loss" in r][-1]
    assert fast[0].metrics["eval_loss"] == last_logged


def test_example_lengths_read_from_arrow_follow_selection_and_shuffling():
    """The run summary's padding figures take lengths from the Arrow column; they must be the rows' own lengths
    in the dataset's current order (a split or shuffle keeps an index mapping over the same table)."""
    import datasets

    from ftcore.data.pipeline import example_lengths

    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in (5, 1, 3, 8, 2)], "labels": [[0]] * 5})
    for view in (ds, ds.select([3, 0, 4]), ds.shuffle(seed=3), ds.train_test_split(test_size=2, seed=1)["train"]):
        assert example_lengths(view) == [len(row["input_ids"]) for row in view]
