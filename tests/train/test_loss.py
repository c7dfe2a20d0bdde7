"""Logits only where tokens are trained: the same loss and gradients as the stock forward, and the same training."""

from __future__ import annotations

import pytest
import torch

from conftest import collate_as, run_outcome, tiny_llama
from wronai.data.collate import PaddingCollator
from wronai.data.tokenize import IGNORE_INDEX
from wronai.train import loss as loss_module
from wronai.train.loss import (
    bucketed,
    output_head,
    trained_mask,
    trained_positions_loss,
)

X = IGNORE_INDEX


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        pytest.param([[X, X, 5, 6]], [[0, 1, 1, 0]], id="answer-at-the-end"),
        pytest.param([[1, 2, 3]], [[1, 1, 0]], id="all-trained"),
        pytest.param([[X, 5, X, 6, X]], [[1, 0, 1, 0, 0]], id="gaps"),
        pytest.param([[X, X, 5], [X, 4, X]], [[0, 1, 0], [1, 0, 0]], id="per-row"),
        pytest.param([[X, X, X]], [[1, 0, 0]], id="nothing-trained-keeps-one"),
        pytest.param([[7, X, X]], [[1, 0, 0]], id="first-label-is-never-a-target"),
    ],
)
def test_trained_mask(labels, expected):
    assert trained_mask(torch.tensor(labels)).int().tolist() == expected


def _model(tiny_model_dir):
    return tiny_llama(tiny_model_dir)


def _examples():
    gen = torch.Generator().manual_seed(3)
    out = []
    for n in (9, 31, 4, 17, 25):
        ids = torch.randint(5, 400, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [X] * (2 * n // 3) + ids[2 * n // 3 :]})
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["head-then-loss", "fused-head-and-loss"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_gradients_equal_the_stock_forward(monkeypatch, tiny_model_dir, layout, num_items, fused):
    batch = collate_as(layout, _examples())
    stock_model, model = _model(tiny_model_dir), _model(tiny_model_dir)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    stock = stock_model(**batch, **extra).loss
    calls = []
    real = loss_module.linear_cross_entropy
    monkeypatch.setattr(loss_module, "linear_cross_entropy", lambda *a: calls.append(1) or real(*a))
    ours = trained_positions_loss(model, batch, extra.get("num_items_in_batch"), fused=fused)
    assert len(calls) == int(fused)  # the fused path ran where asked, and only there
    torch.testing.assert_close(ours, stock, rtol=1e-6, atol=1e-6)
    stock.backward()
    ours.backward()
    for (name, p), q in zip(stock_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_fewer_logits_are_computed(tiny_model_dir):
    model = _model(tiny_model_dir)
    seen = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[0] * out.shape[1]))
    batch = PaddingCollator(pad_token_id=0)(_examples())
    trained_positions_loss(model, batch)
    trained = int((batch["labels"][:, 1:] != X).sum())
    assert seen == [trained] and trained < batch["input_ids"].numel() / 2
    trained_positions_loss(model, batch, multiple=64)
    assert seen[1] == -(-trained // 64) * 64 < batch["input_ids"].numel()  # rounded up to a bucket


@pytest.mark.parametrize(("rows", "length"), [(3, 100), (2, 20), (1, 64)])
def test_trained_positions_are_padded_to_a_bucket_with_untrained_ones(rows, length):
    """Few head shapes per run (a new bf16 matmul shape stays cached on a CPU); added positions add no loss."""
    gen = torch.Generator().manual_seed(rows * length)
    labels = torch.randint(5, 400, (rows, length), generator=gen)
    labels[torch.rand(rows, length, generator=gen) < 0.6] = X
    mask = trained_mask(labels)
    padded = bucketed(mask, 64)
    count = int(padded.sum())
    assert count % 64 == 0 or count == labels.numel()
    assert count >= int(mask.sum()) and bool(padded[mask].all())  # every trained position kept
    added = padded & ~mask
    targets = torch.full_like(labels, X)
    targets[:, :-1] = labels[:, 1:]
    assert bool((targets[added] == X).all())
    assert int(bucketed(padded, 64).sum()) == count  # already a bucket: unchanged


def test_output_head_found_through_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    assert output_head(model) is model.get_base_model().lm_head
    assert output_head(torch.nn.Linear(2, 2)) is None


def test_training_is_the_same_with_and_without(tmp_path, tiny_model_dir):
    """Three optimizer steps with gradient accumulation: identical per-step losses and adapters (the fused
    head + loss off: tests/kernels/test_cross_entropy.py compares it with this path)."""

    from conftest import train_via_cli

    runs = {}
    for flag in (True, False):
        out = train_via_cli(
            tmp_path / str(flag), tiny_model_dir, rows=40, hardware={"fused_cross_entropy": "off"},
            training={"trained_logits_only": flag, "max_steps": 3, "gradient_accumulation_steps": 2, "save_strategy": "no",
                      "eval_strategy": "no", "per_device_train_batch_size": 2},
        )  # fmt: skip
        runs[flag] = run_outcome(out)[:2]
    (losses_on, adapter_on), (losses_off, adapter_off) = runs[True], runs[False]
    assert len(losses_on) == 3
    assert losses_on == pytest.approx(losses_off, rel=1e-5)
    for key in adapter_off:
        torch.testing.assert_close(adapter_on[key], adapter_off[key], rtol=1e-4, atol=1e-6)


def _moe(router_logits: bool):
    """A tiny Mixtral (4 experts, 2 per token) that adds its load-balancing loss to its loss."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        output_router_logits=router_logits, router_aux_loss_coef=0.5, use_cache=False,
    )  # fmt: skip
    return MixtralForCausalLM(config).train()


@pytest.mark.parametrize("fused", [False, True], ids=["head-then-loss", "fused-head-and-loss"])
@pytest.mark.parametrize("num_items", [None, 37])
def test_a_mixture_of_experts_keeps_its_router_loss(fused, num_items):
    """The forward runs without labels, so the model does not add its router loss itself: the trained
    positions' loss adds it back, equal to transformers' loss with it."""
    from wronai.train.loss import router_loss

    batch = PaddingCollator(pad_token_id=0)(_examples())
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    model = _moe(router_logits=True)
    outputs = model(**batch, **extra)
    assert (
        outputs.aux_loss is not None and float(0.5 * outputs.aux_loss.detach()) > 0.1
    )  # not lost in the tolerance
    ours = trained_positions_loss(model, batch, extra.get("num_items_in_batch"), fused=fused)
    torch.testing.assert_close(ours, outputs.loss, rtol=1e-6, atol=1e-6)
    plain = _moe(router_logits=False)
    assert router_loss(plain, plain(input_ids=batch["input_ids"])) is None
    torch.testing.assert_close(trained_positions_loss(plain, batch, fused=fused), plain(**batch).loss)


def test_a_router_loss_without_its_coefficient_is_a_one_line_error_naming_the_key():
    from types import SimpleNamespace

    from wronai.errors import WronAIError
    from wronai.train.loss import router_loss

    model = SimpleNamespace(config=SimpleNamespace())
    with pytest.raises(WronAIError, match="training.trained_logits_only=false"):
        router_loss(model, SimpleNamespace(aux_loss=torch.tensor(1.0)))
