"""Training objectives as plugins: the hooks, the bundled sft default, and preference training (dpo, kto) with
TRL's own trainers on a tiny model and a synthetic preference task built here."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config, write_jsonl

import ftcore

QUIET = {"log": lambda m: None}

TOPICS = ["the fox", "the dog", "Paris", "Berlin", "the model", "a language", "the task", "a dataset", "France",
          "Germany", "the capital", "seven", "eight", "nine", "ten", "hello", "the response", "unicode", "emoji",
          "text", "a pretrained model", "the lazy dog", "one", "two", "three", "four", "five", "six"]


def preference_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """The synthetic task: the chosen answer agrees politely ("Sure, ..."), the rejected one breaks the rule
    ("No, ..."); otherwise the two are the same, and the prompts vary."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        t, u = rng.choice(TOPICS), rng.choice(TOPICS)
        pairs.append({"prompt": f"Tell me about {t} and {u}.", "chosen": f" Sure, {t} is fine.",
                      "rejected": f" No, {t} is fine."})
    return pairs


def unpaired(pairs: list[dict[str, str]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for p in pairs:
        out += [{"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                {"prompt": p["prompt"], "completion": p["rejected"], "label": False}]
    return out


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class TrainerSpy:
    """A plugin object that keeps the trainer the objective built."""

    name = "trainer-spy"

    def __init__(self) -> None:
        self.trainer = None

    @ftcore.hookimpl
    def ftcore_trainer_created(self, trainer):
        self.trainer = trainer
        model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        self.attention = model.config._attn_implementation   # as training starts


def held_out_reward_accuracy(model_dir: Path, adapter_dir: Path, pairs: list[dict[str, str]]) -> float:
    """The share of held-out pairs whose chosen answer gets the higher implicit reward, log pi(y|x) - log
    pi_ref(y|x), computed here from the saved adapter (enabled: the policy; disabled: the reference)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter_dir)).eval()

    def logp(prompt: str, answer: str) -> float:
        p = tok(prompt)["input_ids"]
        full = tok(prompt + answer + tok.eos_token)["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(ids).logits.log_softmax(-1)[0, :-1]
        targets = ids[0, 1:]
        scores = logits.gather(1, targets[:, None])[:, 0]
        return float(scores[len(p) - 1:].sum())

    def reward(prompt: str, answer: str) -> float:
        policy = logp(prompt, answer)
        with model.disable_adapter():
            reference = logp(prompt, answer)
        return policy - reference

    right = sum(reward(p["prompt"], p["chosen"]) > reward(p["prompt"], p["rejected"]) for p in pairs)
    return right / len(pairs)


def preference_config(model_dir: Path, data: Path, out: Path, objective: str, **training) -> dict:
    settings = {"epochs": 2, "learning_rate": 5e-3, "eval_strategy": "epoch"}
    settings.update(training)
    cfg = tiny_config(model_dir, data, out, **settings)
    cfg["plugins"] = ["lora", objective]
    return cfg


# -- the objective kind ---------------------------------------------------------------------------------------

class RawText:
    """A third party's objective, written with the public hooks only: continued pretraining on records
    ``{"text": ...}``, every token supervised, through ftcore's supervised trainer."""

    name = "raw-text"

    @ftcore.hookimpl
    def ftcore_prepare_data(self, config, tokenizer, ctx):
        def check(record):
            text = record.get("text")
            return [] if isinstance(text, str) and text.strip() else [("text", "expected non-empty text")]

        import datasets

        train, held_out, stats = ftcore.read_datasets(config, check, ctx.log)

        def tokenized(records):
            ids = [tokenizer(r["text"] + tokenizer.eos_token)["input_ids"][: config.data.max_length]
                   for _, r in records]
            return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})

        train_ds = tokenized(train)
        stats.tokens = stats.supervised_tokens = sum(len(i) for i in train_ds["input_ids"])
        return ftcore.PreparedData(train_ds, tokenized(held_out) if held_out else None, stats)

    @ftcore.hookimpl
    def ftcore_build_trainer(self, model, args, train_dataset, eval_dataset, callbacks, optimizer, ctx):
        return ftcore.supervised_trainer(model, args, train_dataset, eval_dataset, callbacks, optimizer, ctx)


def test_hook_ftcore_prepare_data(tiny_model_dir, tmp_path):
    """An objective's own data path: its records are read with file and line, its datasets are what is trained."""
    data = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"Paris is the capital of France {i}."}
                                                   for i in range(12)] + [{"text": ""}])
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "bad", max_steps=1)
    cfg["data"]["packing"] = False   # padded batches: every label the plugin gave is counted as it is
    with pytest.raises(ftcore.DataError, match=r"corpus\.jsonl:13: text: expected non-empty text"):
        ftcore.run(cfg, plugins=[RawText()], **QUIET)
    assert not (tmp_path / "bad").exists()   # refused before anything was written
    cfg["data"]["on_bad_record"] = "skip"
    cfg["output_dir"] = str(tmp_path / "out")
    result = ftcore.run(cfg, plugins=[RawText()], **QUIET)
    assert result.data_stats["records"] == 13 and result.data_stats["bad_records"] == 1
    assert result.data_stats["train_examples"] == 8 and result.data_stats["eval_examples"] == 4
    # every token of the text is supervised: the third party's labels are what the trainer counted
    assert result.metrics["supervised_tokens"] == result.metrics["tokens"] > 0


def test_hook_ftcore_build_trainer(tiny_model_dir, alpaca_file, tmp_path):
    """A third party's objective replaces the default sft and is recorded as the run's objective."""
    spy = TrainerSpy()
    built = []

    class Smoothed:
        name = "smoothed-sft"

        @ftcore.hookimpl
        def ftcore_build_trainer(self, model, args, train_dataset, eval_dataset, callbacks, optimizer, ctx):
            trainer = ftcore.supervised_trainer(model, dict(args, label_smoothing_factor=0.5), train_dataset,
                                                eval_dataset, callbacks, optimizer, ctx)
            built.append(trainer)
            return trainer

    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "smooth", max_steps=2)
    result = ftcore.run(cfg, plugins=[Smoothed(), spy], **QUIET)
    assert built and spy.trainer is built[0] and spy.trainer.args.label_smoothing_factor == 0.5
    kinds = {p["name"]: p["kind"] for p in json.loads((result.output_dir / "plugins.json").read_text())}
    assert kinds["smoothed-sft"] == "objective" and "sft" not in kinds
    plain = ftcore.run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "plain", max_steps=2), plugins=[spy],
                       **QUIET)
    assert type(spy.trainer).__name__ in ("Trainer", "FastLossTrainer")   # the default: sft, as before
    first = [r["loss"] for r in rows(result.output_dir) if "loss" in r][0]
    assert first != pytest.approx([r["loss"] for r in rows(plain.output_dir) if "loss" in r][0])


def test_one_objective_per_run():
    from ftcore.registry.selection import select

    chosen = select(["lora", "dpo"])
    assert chosen.names("objective") == ["dpo"]
    with pytest.raises(ftcore.PluginError, match="'dpo' and 'kto' are both of kind 'objective'"):
        select(["dpo", "kto"])


# -- preference data ---------------------------------------------------------------------------------------------

def test_bad_preference_records_are_named_by_file_line_and_field(tiny_model_dir, tmp_path):
    good = preference_pairs(6, seed=1)
    bad = [
        {"prompt": "Hi.", "chosen": " Sure."},                                    # 7: missing side
        {"prompt": "Hi.", "chosen": " Sure.", "rejected": " Sure."},              # 8: equal answers
        {"prompt": 3, "chosen": " Sure.", "rejected": " No."},                    # 9: wrong type
        {"prompt": "Hi.", "chosen": "   ", "rejected": " No."},                   # 10: empty answer
        {"prompt": [{"role": "user", "content": "Hi."}], "chosen": " Sure.",      # 11: text answer to a chat
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": [{"role": "user", "content": "Hi."}],                          # 12: a user message as answer
         "chosen": [{"role": "user", "content": "Sure."}], "rejected": [{"role": "assistant", "content": "No."}]},
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", good + bad)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out")
    cfg["plugins"] = ["dpo"]
    cfg["data"]["max_errors_shown"] = 10
    with pytest.raises(ftcore.DataError) as err:
        ftcore.prepare_data(cfg, **QUIET)
    text = str(err.value)
    for expected in ("pairs.jsonl:7: rejected: missing", "pairs.jsonl:8: rejected: is the same as chosen",
                     "pairs.jsonl:9: prompt: expected text or a list of messages, got int",
                     "pairs.jsonl:10: chosen: is empty", "pairs.jsonl:11: chosen: is text but the prompt is a "
                     "conversation", "pairs.jsonl:12: chosen[0].role: an answer holds assistant messages only"):
        assert expected in text
    kto = write_jsonl(tmp_path / "kto.jsonl", unpaired(good) + [{"prompt": "Hi.", "completion": " Sure.",
                                                                 "label": "yes"}])
    cfg["data"]["datasets"] = [str(kto)]
    cfg["plugins"] = ["kto"]
    with pytest.raises(ftcore.DataError, match=r"kto\.jsonl:13: label: expected true \(desirable\) or false"):
        ftcore.prepare_data(cfg, **QUIET)


def test_prepare_shows_a_pair_with_its_scored_tokens_and_the_pair_statistics(tiny_model_dir, tmp_path):
    pairs = preference_pairs(10, seed=2)
    # answers that agree for longer than max_length leaves them: truncated, and identical once cut
    pairs[0] = {"prompt": "Tell me about the fox.", "chosen": " Well," * 40 + " sure.", "rejected": " Well," * 40 + " no."}
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    proc = subprocess.run([sys.executable, "-m", "ftcore.cli", "prepare", "--plugins", "dpo", "--model",
                           str(tiny_model_dir), "--data", str(data), "--set", "data.max_length=64",
                           "--set", "data.val_size=0", "--set", "data.seed=5", "--show", "10", "--no-color"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--- pair 1, chosen" in out and "--- pair 1, rejected" in out and "scored tokens in [[...]]" in out
    assert "[[ Sure," in out and "[[ No," in out   # the answer is scored, the prompt is not
    assert "Tell me about [[" not in out
    assert "pairs" in out and "truncated" in out and "identical pairs" in out and "chosen tokens mean" in out
    stats = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1] for line in out.splitlines()
             if line.startswith(("truncated", "identical pairs", "pairs "))}
    assert stats["identical pairs"] == "1" and stats["truncated"] == "1"


def test_conversations_are_rendered_with_the_chat_template_as_chatml_renders_them(tiny_model_dir, tmp_path):
    records = [{"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Hi {i}."}],
                "chosen": [{"role": "assistant", "content": "Sure, hello."}],
                "rejected": [{"role": "assistant", "content": "No."}]} for i in range(6)]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out")
    cfg["plugins"] = ["chatml", "dpo"]
    cfg["data"]["val_size"] = 0
    report = ftcore.prepare_data(cfg, **QUIET)
    tok = report.tokenizer
    from ftcore_plugins.formats import chatml

    for row in report.data.train:
        assert tok.decode(row["chosen_ids"]) == "Sure, hello.<|im_end|>\n"
        assert tok.decode(row["rejected_ids"]) == "No.<|im_end|>\n"
        record = next(r for r in records if r["prompt"] == row["prompt"])
        # the text the chatml format renders for the conversation with its chosen answer, token for token
        rendered = chatml.ftcore_format_record(record={"messages": record["prompt"] + record["chosen"]},
                                               tokenizer=tok, config=report.config)
        assert tok.decode(row["prompt_ids"] + row["chosen_ids"]) == rendered.text
        assert tok.decode(row["prompt_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_a_dataset_of_the_datasets_library_works_as_for_sft(hub, tiny_model_dir, tmp_path):
    """A Hub id (through the datasets library and a local Hub) and a saved datasets folder, as for SFT."""
    import datasets

    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", preference_pairs(10, seed=3))
    hub.add_folder("acme/prefs", folder, kind="dataset")
    saved = tmp_path / "saved-pairs"
    datasets.Dataset.from_list(preference_pairs(8, seed=3)).save_to_disk(str(saved))
    for spec, records in (("acme/prefs", 10), (str(saved), 8)):
        cfg = {"model": str(tiny_model_dir), "plugins": ["dpo"], "output_dir": str(tmp_path / "out"),
               "data": {"datasets": [spec], "max_length": 128, "val_size": 2}}
        report = ftcore.prepare_data(cfg, **QUIET)
        assert report.stats.records == records and report.stats.per_dataset == {spec: records}
        assert report.stats.train_examples == records - 2 and report.stats.eval_examples == 2
        assert report.data.train[0]["chosen_ids"] and report.data.train[0]["rejected_ids"]


# -- settings ------------------------------------------------------------------------------------------------------

def test_dpo_and_kto_settings_are_validated_sections(tiny_model_dir, alpaca_file, tmp_path):
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    cfg["plugins"] = ["dpo"]
    cfg["dpo"] = {"loss_type": "ipoo"}
    with pytest.raises(ftcore.ConfigError, match="dpo.loss_type"):
        ftcore.run(cfg, dry_run=True, **QUIET)
    cfg["dpo"] = {"beta": 0}
    with pytest.raises(ftcore.ConfigError, match="dpo.beta"):
        ftcore.run(cfg, dry_run=True, **QUIET)
    cfg["dpo"] = {"bta": 0.2}
    with pytest.raises(ftcore.ConfigError, match="beta"):
        ftcore.run(cfg, dry_run=True, **QUIET)
    cfg["dpo"] = {"loss_type": "ipo", "beta": 0.3, "label_smoothing": 0.1, "reference": "precompute"}
    ftcore.run(cfg, dry_run=True, **QUIET)
    cfg["plugins"] = ["kto"]
    del cfg["dpo"]
    cfg["kto"] = {"desirable_weight": -1}
    with pytest.raises(ftcore.ConfigError, match="kto.desirable_weight"):
        ftcore.run(cfg, dry_run=True, **QUIET)


def test_bad_preference_input_exits_2_with_nothing_written(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(6, seed=4) + [{"prompt": "Hi.", "chosen": " A"}])
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ftcore.cli", "run", "--plugins", "lora,dpo", "--model",
                           str(tiny_model_dir), "--data", str(data), "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr
    assert "pairs.jsonl:7: rejected: missing" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# -- they learn ----------------------------------------------------------------------------------------------------

def test_dpo_learns_the_preferred_answer(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(64, seed=0))
    held_out = preference_pairs(16, seed=99)
    spy = TrainerSpy()
    cfg = preference_config(tiny_model_dir, data, tmp_path / "out", "dpo")
    cfg["data"]["eval_datasets"] = [str(write_jsonl(tmp_path / "held-out.jsonl", held_out))]
    result = ftcore.run(cfg, plugins=[spy], **QUIET)
    # TRL's own trainer and loss; the reference is the base with the adapter disabled, no copy of anything
    from trl import DPOTrainer

    assert isinstance(spy.trainer, DPOTrainer) and spy.trainer.loss_types == ["sigmoid"]
    assert spy.trainer.ref_model is None and list(spy.trainer.model.peft_config) == ["default"]
    m = result.metrics
    assert m["eval_rewards/accuracies"] >= 0.8
    assert m["eval_rewards/margins"] > m["eval_rewards/margins_start"]
    assert held_out_reward_accuracy(tiny_model_dir, result.model_dir, held_out) >= 0.8
    logged = rows(result.output_dir)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert any(key in r for r in logged) and any(f"eval_{key}" in r for r in logged)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["metrics"]["eval_rewards/accuracies"] == m["eval_rewards/accuracies"]
    page = (result.output_dir / "report.html").read_text()
    assert 'id="plot-rewards"' in page and 'id="plot-reward_accuracy"' in page
    assert (result.output_dir / "plots" / "rewards.png").stat().st_size > 1000
    assert sorted(p.name for p in result.model_dir.iterdir() if p.is_dir()) == []   # the trained adapter alone
    assert "identical_pairs" in result.data_stats["preference"]
    card = (result.model_dir / "README.md").read_text()
    assert "preference training: DPO" in card and "held-out reward accuracy" in card and "- dpo" in card


def test_kto_learns_from_unpaired_judgements(tiny_model_dir, tmp_path):
    train = unpaired(preference_pairs(48, seed=0))
    held_out = preference_pairs(16, seed=99)
    data = write_jsonl(tmp_path / "kto.jsonl", train)
    spy = TrainerSpy()
    cfg = preference_config(tiny_model_dir, data, tmp_path / "out", "kto")
    cfg["data"]["eval_datasets"] = [str(write_jsonl(tmp_path / "held-out.jsonl", unpaired(held_out)))]
    cfg["kto"] = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    result = ftcore.run(cfg, plugins=[spy], **QUIET)
    from trl import KTOTrainer

    assert isinstance(spy.trainer, KTOTrainer) and spy.trainer.ref_model is None
    m = result.metrics
    assert m["eval_rewards/margins"] > m["eval_rewards/margins_start"]
    assert held_out_reward_accuracy(tiny_model_dir, result.model_dir, held_out) >= 0.8
    page = (result.output_dir / "report.html").read_text()
    assert 'id="plot-rewards"' in page


def test_full_fine_tuning_scores_against_a_frozen_copy(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(12, seed=5))
    spy = TrainerSpy()
    cfg = preference_config(tiny_model_dir, data, tmp_path / "out", "dpo", max_steps=2, learning_rate=1e-4)
    cfg["plugins"] = ["full", "dpo", "gguf-export"]   # and gguf-export works on a DPO run as on any
    cfg["dpo"] = {"loss_type": "ipo", "beta": 0.5}
    result = ftcore.run(cfg, plugins=[spy], **QUIET)
    assert any(p.suffix == ".gguf" for p in result.exports)
    assert result.export_details["gguf-export"]["passed"] is True   # llama.cpp generates as transformers does
    trainer = spy.trainer
    assert trainer.loss_types == ["ipo"] and trainer.beta == 0.5
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert ref is not trainer.model and not any(p.requires_grad for p in ref.parameters())
    assert result.model_dir.name == "model" and list(result.model_dir.glob("*.safetensors"))


def test_estimate_counts_the_frozen_reference_copy_of_full_fine_tuning(tiny_model_dir):
    def rows_of(plugins):
        table = ftcore.estimate(tiny_model_dir, plugins=plugins, precision="fp32", device="cpu", seq_len=64,
                                log=lambda m: None)
        return {r["method"]: r for r in table["methods"]}, table

    sft, _ = rows_of(["full"])
    dpo, table = rows_of(["full", "dpo"])
    assert table["objective"] == "dpo"
    assert dpo["full"]["weights"] - sft["full"]["weights"] == 4 * table["params"]   # fp32 copy of every weight
    assert dpo["lora"]["weights"] == sft["lora"]["weights"]                        # the adapter is disabled instead
    assert dpo["lora"]["activations"] > sft["lora"]["activations"]                 # chosen and rejected
    assert any("frozen reference copy" in n for n in dpo["full"]["notes"])
    precomputed = ftcore.estimate(tiny_model_dir, plugins=["full", "dpo"], precision="fp32", device="cpu",
                                  seq_len=64, settings={"dpo": {"reference": "precompute"}}, log=lambda m: None)
    assert {r["method"]: r for r in precomputed["methods"]}["full"]["weights"] == sft["full"]["weights"]


# -- SFT, then DPO -------------------------------------------------------------------------------------------------

class ModelSpy:
    """A plugin object that keeps where the model came from and its trainable weights as training starts."""

    name = "model-spy"

    def __init__(self) -> None:
        self.model_path = self.continue_adapter = None
        self.start: dict = {}

    @ftcore.hookimpl
    def ftcore_model_loaded(self, model, ctx):
        self.model_path, self.continue_adapter = ctx.model_path, ctx.continue_adapter
        self.start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_a_finished_sft_run_is_the_model_of_a_dpo_run_merged_or_continued(tiny_model_dir, alpaca_file, tmp_path):
    from safetensors.torch import load_file

    sft = ftcore.run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "sft", max_steps=3, learning_rate=5e-3),
                     **QUIET)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(12, seed=6))

    # merge: the SFT adapter folded into its base, a new adapter trained on it (the reference: the SFT model)
    spy, logged = ModelSpy(), []
    cfg = preference_config(sft.output_dir, pairs, tmp_path / "dpo-merged", "dpo", max_steps=2)
    result = ftcore.run(cfg, plugins=[spy], log=logged.append)
    assert any("merging" in line for line in logged) and spy.continue_adapter is None
    merged = Path(spy.model_path)
    assert merged != tiny_model_dir and (merged / "config.json").is_file()
    expected = ftcore.merge_peft_adapter(str(sft.model_dir), str(tiny_model_dir)).state_dict()
    got = load_file(str(merged / "model.safetensors"))
    assert got and set(got) <= set(expected) and all(expected[k].equal(v) for k, v in got.items())
    assert all("lora_B" not in k or v.abs().sum() == 0 for k, v in spy.start.items())   # a new adapter
    first_eval = next(r for r in rows(result.output_dir) if "eval_rewards/margins" in r)
    assert first_eval["eval_rewards/margins"] == 0.0   # scored against the model it starts from
    again = ftcore.run(dict(cfg, output_dir=str(tmp_path / "dpo-merged-2")), plugins=[ModelSpy()],
                       log=(seen := []).append)
    assert again.exit_code == 0 and any("from the cache" in line for line in seen)
    report = ftcore.prepare_data(dict(cfg, output_dir=str(tmp_path / "prep")), **QUIET)   # the run's tokenizer
    assert report.stats.preference["pairs"] == report.stats.train_examples > 0

    # continue: the SFT adapter itself keeps training on the SFT run's base
    spy = ModelSpy()
    cfg = preference_config(sft.output_dir, pairs, tmp_path / "dpo-continued", "dpo", max_steps=2)
    cfg["model"] = {"path": str(sft.output_dir), "from_run": "continue"}
    cfg["plugins"] = ["lora", "dpo", "merge"]   # and the merge exporter works on a DPO run as on any
    result = ftcore.run(cfg, plugins=[spy], **QUIET)
    assert (result.output_dir / "merged" / "config.json").is_file()
    assert Path(spy.model_path) == tiny_model_dir and spy.continue_adapter == sft.model_dir
    trained = load_file(str(sft.model_dir / "adapter_model.safetensors"))
    starts = {k.replace(".default", ""): v for k, v in spy.start.items()}
    assert trained and all(starts[k].equal(v) for k, v in trained.items())   # started from the SFT adapter
    first_eval = next(r for r in rows(result.output_dir) if "eval_rewards/margins" in r)
    assert first_eval["eval_rewards/margins"] == 0.0   # the reference: the SFT adapter as it started
    saved = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert saved["r"] == json.loads((sft.model_dir / "adapter_config.json").read_text())["r"]
    assert not [p for p in result.model_dir.iterdir() if p.is_dir()]   # the trained adapter alone, no "ref"


# -- padding-free preference batches -------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_packed_preference_batches_give_the_padded_runs_losses(tiny_model_dir, tmp_path, objective):
    """data.packing: the batch's real tokens in one row, per-example attention on plain SDPA: every step's loss,
    reward margin and gradient norm as TRL's padded batches give them, and no padding computed."""
    pairs = preference_pairs(16, seed=10)
    for i, p in enumerate(pairs):   # answers of different lengths, so padded batches really pad
        p["chosen"] += " Sure." * (i % 4)
    data = write_jsonl(tmp_path / "data.jsonl", pairs if objective == "dpo" else unpaired(pairs))
    results, spies = {}, {}
    for packing in (True, False):
        spies[packing] = TrainerSpy()
        cfg = preference_config(tiny_model_dir, data, tmp_path / f"packed-{packing}", objective, max_steps=4,
                                learning_rate=1e-3)
        cfg["data"]["packing"] = packing
        results[packing] = ftcore.run(cfg, plugins=[spies[packing]], **QUIET)
    assert spies[True].attention == "ftcore_packed_sdpa"   # ftcore's per-example attention, on SDPA
    packed, padded = (rows(results[k].output_dir) for k in (True, False))
    keys = ("loss", "grad_norm", "rewards/margins", "eval_loss", "eval_rewards/margins")
    compared = 0
    for a, b in zip(packed, padded):
        for key in keys:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
                compared += 1
    assert compared >= 10 and len(packed) == len(padded)
    assert results[True].metrics["packing_efficiency"] == 1.0 > results[False].metrics["packing_efficiency"]


def test_qlora_with_kto_scores_against_the_4bit_base_with_the_adapter_disabled(tiny_model_dir, tmp_path):
    """`--plugins qlora,kto`: TRL's KTOTrainer on the 4-bit base, no copy of the model for the reference."""
    data = write_jsonl(tmp_path / "kto.jsonl", unpaired(preference_pairs(8, seed=11)))
    spy = TrainerSpy()
    cfg = preference_config(tiny_model_dir, data, tmp_path / "out", "kto", max_steps=2)
    cfg["plugins"] = ["qlora", "kto"]
    result = ftcore.run(cfg, plugins=[spy], **QUIET)
    from trl import KTOTrainer

    assert isinstance(spy.trainer, KTOTrainer) and spy.trainer.ref_model is None
    assert getattr(spy.trainer.model.get_base_model(), "is_loaded_in_4bit", False)
    assert list(spy.trainer.model.peft_config) == ["default"]
    assert result.metrics["steps"] == 2 and (result.model_dir / "adapter_model.safetensors").is_file()
