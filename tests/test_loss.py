"""The chunked loss: the same loss and gradients as transformers' causal-LM loss, without all logits at once."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers.trainer_pt_utils import LabelSmoother

import ftcore
from ftcore.cli import main
from ftcore.training import loss as loss_mod
from ftcore.training.loss import LossPlan, causal_lm_loss, chunked_cross_entropy
from tests.conftest import tiny_config, write_jsonl
from tests.test_perf_equivalence import packed_batch, padded_batch

CHUNK = 7          # small, so that every batch below spans several chunks


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           lora_dropout=0.0, init_lora_weights=False)).eval()


@pytest.fixture(scope="module")
def tied_full_model(tmp_path_factory, tiny_tokenizer):
    """A full fine-tune (every weight trained) of a model whose output layer is its embedding."""
    from transformers import AutoModelForCausalLM

    from ftcore.testing import build_model

    folder = build_model(tmp_path_factory.mktemp("tied"), tiny_tokenizer, tie_word_embeddings=True, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def batch_for(model, kind):
    vocab = model.config.vocab_size
    return (packed_batch([9, 30, 5, 17], vocab) if kind == "packed"
            else padded_batch([9, 30, 5, 17], vocab, model.config.pad_token_id or 0))


def trained_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


class HeadCalls:
    """The number of positions (rows) each call of the output layer computed logits for."""

    def __init__(self, model):
        self.rows: list[int] = []
        head = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_output_embeddings()
        self.handle = head.register_forward_hook(lambda m, a, out: self.rows.append(out[..., 0].numel()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def plain_and_chunked(model, batch, plan, num_items=None, autocast=False):
    """(plain loss, its gradients), (chunked loss, its gradients, the rows of each output-layer call)."""
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.enable_grad
    model.zero_grad()
    with ctx():
        plain = model(**batch, num_items_in_batch=num_items).loss
    plain.backward()
    plain_grads = trained_grads(model)
    model.zero_grad()
    with HeadCalls(model) as calls, ctx():
        chunked, _ = causal_lm_loss(model, batch, plan, num_items)
    chunked.backward()
    return (plain, plain_grads), (chunked, trained_grads(model), calls.rows)


@pytest.mark.parametrize("kind", ["packed", "padded"])
@pytest.mark.parametrize("num_items", [None, 37])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "every-position"])
def test_chunked_loss_and_grads_equal_the_plain_loss_with_lora(lora_model, kind, num_items, sparse):
    batch = batch_for(lora_model, kind)
    (plain, plain_grads), (chunked, grads, rows) = plain_and_chunked(
        lora_model, batch, LossPlan("chunked", sparse=sparse, chunk_size=CHUNK), num_items)
    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads, plain_grads, rtol=1e-4, atol=1e-7)
    # the model's own call of the output layer computed nothing; then chunks of at most CHUNK positions
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert rows[0] == 0 and max(rows[1:]) <= CHUNK
    assert sum(rows[1:]) == (supervised if sparse else batch["input_ids"].numel())


@pytest.mark.parametrize("kind", ["packed", "padded"])
def test_chunked_loss_trains_a_tied_output_layer_like_the_plain_loss(tied_full_model, kind):
    """Full fine-tuning of a tied-embedding model: the embedding's gradient sums the output layer's (from the
    chunks) and the input embedding's."""
    batch = batch_for(tied_full_model, kind)
    (plain, plain_grads), (chunked, grads, _) = plain_and_chunked(
        tied_full_model, batch, LossPlan("chunked", sparse=True, chunk_size=CHUNK), 23)
    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads, plain_grads, rtol=1e-4, atol=1e-7)
    assert tied_full_model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("model_name", ["lora_model", "tied_full_model"])
def test_chunked_loss_in_bf16_matches_the_plain_loss_in_bf16(request, model_name):
    """Under bf16 autocast both paths compute the logits in bf16 and the cross-entropy in fp32; only the order
    of bf16 sums differs (the output layer's gradient is summed over chunks)."""
    model = request.getfixturevalue(model_name)
    batch = batch_for(model, "packed")
    (plain, plain_grads), (chunked, grads, _) = plain_and_chunked(
        model, batch, LossPlan("chunked", sparse=True, chunk_size=CHUNK), 41, autocast=True)
    assert torch.allclose(chunked, plain, rtol=1e-3)
    scale = plain_grads.abs().max()
    assert (grads - plain_grads).abs().max() <= 2e-2 * scale
    assert torch.nn.functional.cosine_similarity(grads, plain_grads, dim=0) > 0.9999


@pytest.mark.parametrize("num_items", [None, 37])
def test_label_smoothing_equals_transformers_label_smoother(lora_model, num_items):
    batch = batch_for(lora_model, "padded")
    smoother = LabelSmoother(epsilon=0.1)
    lora_model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = smoother(lora_model(**inputs), batch["labels"], shift_labels=True, num_items_in_batch=num_items)
    plain.backward()
    plain_grads = trained_grads(lora_model)
    for plan in (LossPlan("chunked", sparse=True, chunk_size=CHUNK), LossPlan("sparse", sparse=True)):
        lora_model.zero_grad()
        got, _ = causal_lm_loss(lora_model, batch, plan, num_items, label_smoothing=0.1)
        got.backward()
        assert torch.allclose(got, plain, rtol=1e-5), plan
        assert torch.allclose(trained_grads(lora_model), plain_grads, rtol=1e-4, atol=1e-7), plan


def test_a_batch_with_nothing_supervised_gives_a_zero_loss_with_a_graph(lora_model):
    batch = batch_for(lora_model, "packed")
    batch["labels"] = torch.full_like(batch["labels"], -100)
    got, _ = causal_lm_loss(lora_model, batch, LossPlan("chunked", sparse=True, chunk_size=CHUNK), None)
    got.backward()
    assert got.item() == 0.0


def test_auto_chooses_chunked_and_says_why_when_it_cannot(lora_model, tied_full_model):
    training = ftcore.RunConfig.model_validate({"model": {"path": "m"}}).training
    plan = loss_mod.choose(lora_model, training)
    assert (plan.path, plan.sparse, plan.chunk_size) == ("chunked", True, 2**24 // lora_model.config.vocab_size)
    assert loss_mod.auto_chunk_size(128_256) == 130 and loss_mod.auto_chunk_size(1024) == 16384
    plain = ftcore.RunConfig.model_validate({"model": {"path": "m"},
                                             "training": {"loss": "plain", "sparse_logits": False}}).training
    assert loss_mod.choose(lora_model, plain).path == "plain"
    fused = ftcore.RunConfig.model_validate({"model": {"path": "m"}, "training": {"loss": "fused",
                                                                                 "loss_chunk_size": 32}}).training
    plan = loss_mod.choose(tied_full_model, fused)
    assert (plan.path, plan.chunk_size) == ("chunked", 32) and "fused loss not possible" in plan.reason
    tied_full_model.config.final_logit_softcapping = 30.0      # a model whose logits change after the head
    try:
        plan = loss_mod.choose(tied_full_model, training)
    finally:
        del tied_full_model.config.final_logit_softcapping
    assert plan.path == "sparse" and "final_logit_softcapping" in plan.reason


def test_a_bad_loss_setting_is_a_clear_error_exit_2(tiny_model_dir):
    for setting, expected in (("training.loss=fast", "training.loss"), ("training.loss_chunk_size=0",
                                                                        "training.loss_chunk_size")):
        result = CliRunner().invoke(main, ["run", "--model", str(tiny_model_dir), "--set", setting, "--dry-run"])
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output


RECORDS = [{"instruction": f"Count from {a} to {a + n}.", "input": "", "output": " ".join(str(a + k) for k in range(n + 1))}
           for a, n in [(i, (i * 7) % 23 + 1) for i in range(24)]]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_a_run_with_the_chunked_loss_has_the_same_losses_as_the_plain_loss(tiny_model_dir, tmp_path, method):
    """Packed rows, every method; the plain side is transformers' own loss (no sparse logits either)."""
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    runs = {}
    for name, training in (("chunked", {"loss": "chunked", "loss_chunk_size": 16}),
                           ("plain", {"loss": "plain", "sparse_logits": False})):
        cfg = tiny_config(tiny_model_dir, data, tmp_path / name, max_steps=4, eval_strategy="no", **training)
        cfg["plugins"] = [method, "alpaca"]
        cfg["data"]["val_size"] = 0
        runs[name] = ftcore.run(cfg, log=lambda m: None)
    chunked, plain = runs["chunked"], runs["plain"]
    assert losses(chunked.output_dir) == pytest.approx(losses(plain.output_dir), rel=1e-4)
    recorded = json.loads((chunked.output_dir / "summary.json").read_text())["metrics"]["loss"]
    assert recorded["path"] == "chunked" and recorded["chunk_size"] == 16 and recorded["sparse"]
    assert json.loads((plain.output_dir / "summary.json").read_text())["metrics"]["loss"]["path"] == "plain"
    assert "chunked (16 positions per chunk" in (chunked.output_dir / "report.html").read_text()


# A stand-in for liger-kernel's fused linear cross-entropy (a Triton kernel: it needs a CUDA GPU, which this
# machine lacks), with its class name and forward signature, computed with plain torch.
LIGER_STAND_IN = '''
import torch
import torch.nn.functional as F

CALLS = []


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None):
        super().__init__()
        self.ignore_index, self.label_smoothing, self.reduction = ignore_index, label_smoothing, reduction

    def forward(self, lin_weight, _input, target, bias=None):
        CALLS.append((tuple(_input.shape), self.reduction, self.label_smoothing))
        return F.cross_entropy(F.linear(_input, lin_weight, bias).float(), target, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)
'''


def test_auto_uses_an_installed_fused_kernel_on_a_gpu_and_records_it(lora_model, tmp_path, monkeypatch):
    """What ftcore hands the kernel (the supervised rows, the output layer's weight, a sum to divide as
    transformers does) gives the plain loss; where the kernel cannot run (no GPU) auto stays chunked."""
    import sys

    package = tmp_path / "site" / "liger_kernel"
    (package / "transformers").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "transformers" / "__init__.py").write_text(LIGER_STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    training = ftcore.RunConfig.model_validate({"model": {"path": "m"}}).training
    assert loss_mod.choose(lora_model, training).path == "chunked"          # installed, but no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = loss_mod.choose(lora_model, training)
    assert (plan.path, plan.kernel) == ("fused", "liger") and "fused (liger" in plan.describe()
    batch = batch_for(lora_model, "padded")
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    for num_items in (None, 37):
        (plain, plain_grads), (fused, grads, rows) = plain_and_chunked(lora_model, batch, plan, num_items)
        assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grads, plain_grads, rtol=1e-4, atol=1e-7)
        assert rows == [0]                                          # the output layer itself computed nothing
    calls = sys.modules["liger_kernel.transformers"].CALLS
    assert calls[-1] == ((supervised, lora_model.config.hidden_size), "sum", 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_plain_linear_layers_chunks_computed_directly_equal_autograd(dtype):
    """The direct path for a plain linear output layer (one buffer turned into the softmax and then the logits'
    gradient) against autograd's cross-entropy: loss and gradients for the hidden states, a trained weight and
    bias, with ignored targets, in fp32 and with bf16 weights."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=True).to(dtype)
    hidden = torch.randn(23, 16, dtype=dtype)
    targets = torch.randint(0, 300, (23,))
    targets[[0, 5, 22]] = -100
    x = hidden.clone().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(head(x).float(), targets, ignore_index=-100, reduction="sum")
    want.backward()
    want_grads = [x.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    head.zero_grad()
    y = hidden.clone().requires_grad_(True)
    got = chunked_cross_entropy(y, targets, head, 5)
    got.backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert torch.allclose(got, want, **tol)
    for g, w in zip([y.grad, head.weight.grad, head.bias.grad], want_grads):
        assert torch.allclose(g.float(), w.float(), **tol)
