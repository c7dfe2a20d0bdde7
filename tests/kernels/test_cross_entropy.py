"""The fused head + cross-entropy: the stock loss and gradients, no logits kept, the start-up check, the plan."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import make_config_dict, plan_with_gpu, run_outcome, tiny_llama
from wronai.config import load_config
from wronai.errors import WronAIError
from wronai.kernels import cross_entropy, row_slices
from wronai.kernels.cross_entropy import linear_cross_entropy, usable_head
from wronai.model.kbit import UpcastLinear
from wronai.runtime import hardware

VOCAB, WIDTH, POSITIONS = 500, 48, 300


def _case(bias: bool = False, trained: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(WIDTH, VOCAB, bias=bias)
    with torch.no_grad():
        head.weight.normal_(0, 0.3, generator=generator)
        if bias:
            head.bias.normal_(0, 0.3, generator=generator)
    head.requires_grad_(trained)
    hidden = torch.randn(POSITIONS, WIDTH, generator=generator).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (POSITIONS,), generator=generator)
    targets[::4] = cross_entropy.IGNORE
    return head, hidden, targets


def _loss_and_grads(loss_fn, head, hidden, targets, autocast):
    params = [hidden, *(p for p in head.parameters() if p.requires_grad)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(hidden, head, targets) / 37  # a scale, as num_items_in_batch gives
        grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def _stock(hidden, head, targets):
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize(("bias", "trained"), [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize(
    "chunk_bytes", [cross_entropy.CHUNK_BYTES, 4 * VOCAB * 64], ids=["whole", "chunks-of-64"]
)
def test_fused_loss_gives_the_stock_loss_and_gradients(monkeypatch, autocast, bias, trained, chunk_bytes):
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", chunk_bytes)
    head, hidden, targets = _case(bias, trained)
    stock, stock_grads = _loss_and_grads(_stock, head, hidden, targets, autocast)
    ours, our_grads = _loss_and_grads(linear_cross_entropy, head, hidden, targets, autocast)
    tol = 1e-2 if autocast else 1e-5  # bf16: the logits and gradients are rounded where autocast rounds them
    torch.testing.assert_close(ours, stock, rtol=1e-4 if autocast else 1e-6, atol=1e-5)
    assert len(our_grads) == len(stock_grads) == 1 + trained + bias
    for a, b in zip(our_grads, stock_grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


def test_chunks_are_positions_a_multiple_of_64_within_the_budget():
    assert cross_entropy.chunk_rows(4000) == 4160  # the benchmark's whole selection in one chunk
    assert cross_entropy.chunk_rows(152_064) == 64  # never fewer
    rows = cross_entropy.chunk_rows(32_000)
    assert rows % 64 == 0 and rows * 32_000 * 4 <= cross_entropy.CHUNK_BYTES < (rows + 64) * 32_000 * 4


def test_no_logits_are_kept_for_the_backward():
    """What the backward keeps: the stock loss keeps positions × vocabulary tensors, the fused one only
    positions × hidden (and nothing of the vocabulary's size for a frozen head)."""
    head, hidden, targets = _case(trained=False)

    def saved_shapes(loss_fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t
        ):
            loss_fn(hidden, head, targets)
        return shapes

    assert (POSITIONS, VOCAB) in saved_shapes(_stock)
    ours = saved_shapes(linear_cross_entropy)
    assert ours and all(VOCAB not in shape for shape in ours)


def test_without_grad_only_the_loss_is_computed(monkeypatch):
    head, hidden, targets = _case()
    expected = _stock(hidden, head, targets).detach()

    def no_backward_work(*args):
        raise AssertionError("a gradient was computed under no_grad")

    monkeypatch.setattr(cross_entropy, "sliced_grad_input", no_backward_work)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, head, targets), expected)


def test_a_16bit_head_computed_in_fp32_is_built_from_row_slices(monkeypatch):
    """The kept 16-bit head (UpcastLinear): the stock head's numbers, its weight never upcast whole."""
    head, hidden, targets = _case(trained=False)
    head.weight.data = head.weight.data.to(torch.bfloat16)
    UpcastLinear.from_linear(head)
    monkeypatch.setattr(UpcastLinear, "slice_bytes", 128 * WIDTH * 4)  # 128 rows of the 500 at a time
    stock, stock_grads = _loss_and_grads(_stock, head, hidden, targets, autocast=False)
    built = []
    rows = row_slices.DenseRows.rows

    def spy(self, tensors, start, stop, dtype):
        built.append(stop - start)
        return rows(self, tensors, start, stop, dtype)

    monkeypatch.setattr(row_slices.DenseRows, "rows", spy)
    ours, our_grads = _loss_and_grads(linear_cross_entropy, head, hidden, targets, autocast=False)
    assert built and max(built) == 128
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_grads[0], stock_grads[0], rtol=1e-5, atol=1e-6)


def test_only_heads_it_can_compute_are_usable():
    from peft.utils.other import ModulesToSaveWrapper

    plain = torch.nn.Linear(8, 16)
    assert usable_head(plain)
    upcast = UpcastLinear.from_linear(torch.nn.Linear(8, 16).to(torch.bfloat16).requires_grad_(False))
    assert usable_head(upcast)
    assert not usable_head(UpcastLinear.from_linear(torch.nn.Linear(8, 16)))  # a trained weight: not sliced
    assert not usable_head(ModulesToSaveWrapper(torch.nn.Linear(8, 16), "default"))
    sharded = torch.nn.Linear(8, 16)
    sharded.weight = torch.nn.Parameter(torch.zeros(64))  # a piece of a flattened weight (FSDP, ZeRO-3)
    assert not usable_head(sharded)
    with pytest.raises(TypeError, match="ModulesToSaveWrapper"):
        linear_cross_entropy(torch.zeros(2, 8), ModulesToSaveWrapper(plain, "default"), torch.zeros(2).long())


# --- the model, the start-up check, the trainer --------------------------------------------------------------


def _count_fused_calls(monkeypatch) -> list[int]:
    """Counts the fused loss's calls from wronai.train.loss (the wiring took the fused path, not only the plan)."""
    from wronai.train import loss

    calls: list[int] = []
    real = loss.linear_cross_entropy

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loss, "linear_cross_entropy", counted)
    return calls


def _llama(tiny_model_dir):
    return tiny_llama(tiny_model_dir)


def _scaled_logits_model():
    """A model whose forward divides the head's logits (Granite's logits_scaling): the fused loss must not
    be used for it."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, logits_scaling=4.0, use_cache=False,
    )  # fmt: skip
    return GraniteForCausalLM(config).train()


def _batch(vocab: int = 300):
    ids = torch.randint(5, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :15] = cross_entropy.IGNORE
    return {"input_ids": ids, "labels": labels}


def test_the_start_up_check_passes_a_llama_and_catches_scaled_logits(tiny_model_dir):
    from wronai.train.loss import fused_loss_problem

    model = _llama(tiny_model_dir)
    state = torch.random.get_rng_state()
    assert fused_loss_problem(model, _batch()) is None
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random numbers are untouched
    assert all(p.grad is None for p in model.parameters())
    assert fused_loss_problem(_scaled_logits_model(), _batch()) == "loss differs from the stock loss's"


@pytest.mark.parametrize(("model", "fused_after"), [("llama", True), ("granite", False)])
def test_the_trainer_checks_once_and_keeps_the_stock_loss_on_a_mismatch(
    monkeypatch, tmp_path, tiny_model_dir, tiny_tokenizer, caplog, model, fused_after
):
    from transformers import TrainingArguments

    from wronai.train.trainer import GuardedTrainer

    net = _llama(tiny_model_dir) if model == "llama" else _scaled_logits_model()
    trainer = GuardedTrainer(
        model=net, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    )
    trainer.trained_logits_only = trainer.fused_cross_entropy = True
    batch = _batch()
    calls = _count_fused_calls(monkeypatch)
    with caplog.at_level(logging.INFO, logger="wronai.train.trainer"):
        first = trainer.compute_loss(net, batch)
        second = trainer.compute_loss(net, batch)
    assert trainer.fused_cross_entropy is fused_after
    assert len(calls) == (3 if fused_after else 1)  # the check's fused pass, then each step's where it passed
    assert caplog.text.count("cross-entropy:") == 1  # checked once
    assert ("fused loss off — loss differs" in caplog.text) is not fused_after
    stock = net(**batch).loss  # transformers' own loss (mean over trained tokens)
    torch.testing.assert_close(first, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained_head", [False, True])
def test_the_trainer_takes_the_fused_loss_only_for_a_head_it_computes(
    tmp_path, tiny_model_dir, tiny_tokenizer, caplog, trained_head
):
    """A head in lora.modules_to_save (PEFT's ModulesToSaveWrapper) keeps the stock loss, with a note."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from wronai.train.trainer import build_trainer

    lora = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"] if trained_head else None)
    model = get_peft_model(_llama(tiny_model_dir), lora)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False
    )
    prepared = SimpleNamespace(
        packed=False, train=[{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}] * 2, eval=None
    )
    with caplog.at_level(logging.INFO, logger="wronai.train.trainer"):
        trainer = build_trainer(model, tiny_tokenizer, args, prepared, [], fused_cross_entropy=True)
    assert trainer.fused_cross_entropy is not trained_head
    assert ("ModulesToSaveWrapper, which the fused loss does not compute" in caplog.text) is trained_head
    assert (
        build_trainer(model, tiny_tokenizer, args, prepared, []).fused_cross_entropy is False
    )  # the plan's off


@pytest.mark.parametrize(
    "native_bf16", [False, True], ids=["fp32-plan", "native-bf16-plan-packed-path-armed"]
)
def test_training_is_the_same_with_and_without_the_fused_loss(
    monkeypatch, tmp_path, tiny_model_dir, native_bf16
):
    """Three optimizer steps of the 4-bit pipeline: the same per-step losses and adapters. Also on the plan of
    a CPU with native bf16 (forced: bf16 autocast, heads of a multiple of 64 positions), with bitsandbytes'
    packed CPU path armed and its own 4-bit forward running (PEFT's modules, weights not kept dequantized):
    the start-up check's extra forward must not pack a weight, or the base's gradient would be lost."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from conftest import train_via_cli

    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: native_bf16)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: native_bf16)
    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: native_bf16)
    calls = _count_fused_calls(monkeypatch)
    runs = {}
    for setting in ("auto", "off"):
        hw = {
            "device": "cpu",
            "fused_cross_entropy": setting,
            **({"fused_lora": "off"} if native_bf16 else {}),
        }
        out = train_via_cli(
            tmp_path / setting, tiny_model_dir, rows=40, hardware=hw,
            quantization={"load_in_4bit": True, **({"keep_dequantized_mib": 0} if native_bf16 else {})},
            training={"max_steps": 3, "gradient_accumulation_steps": 2, "save_strategy": "no", "eval_strategy": "no",
                      "per_device_train_batch_size": 2, "bf16": native_bf16,
                      **({"optim": "sgd", "learning_rate": 0.5} if native_bf16 else {})},
        )  # fmt: skip
        runs[setting] = (*run_outcome(out), len(calls))
        calls.clear()
    (losses_on, adapter_on, plan_on, calls_on), (losses_off, adapter_off, plan_off, calls_off) = runs.values()
    assert "loss: output head + cross-entropy in one fused step" in plan_on
    assert "loss: output head + cross-entropy in one fused step" not in plan_off
    assert any(
        ("mixed precision: bf16" in line) is native_bf16 for line in plan_on if "mixed precision" in line
    )
    assert (calls_on, calls_off) == (1 + 3 * 2, 0)  # the check, then every micro-batch of 3 steps × 2
    assert len(losses_on) == 3
    if native_bf16:  # bf16 rounds the head's gradient in another order: the same losses to bf16's precision
        assert losses_on == pytest.approx(losses_off, rel=2e-3)
        for key in adapter_off:  # SGD: the update is the gradient (Adam's is ±lr where one is near zero)
            gap = float((adapter_on[key] - adapter_off[key]).norm() / adapter_off[key].norm())
            assert gap <= 2e-2, key  # 0.35% at most, measured
    else:
        assert losses_on == pytest.approx(losses_off, rel=1e-5)
        for key in adapter_off:
            torch.testing.assert_close(
                adapter_on[key], adapter_off[key], rtol=1e-3, atol=1e-5
            )  # Adam: sums in another order


@pytest.mark.parametrize(
    ("written", "device", "distributed", "logits_only", "expected"),
    [
        ("auto", "cpu", "none", True, True),
        ("off", "cpu", "none", True, False),
        ("auto", "cuda", "none", True, False),  # a GPU keeps the stock loss unless asked
        ("on", "cuda", "none", True, True),
        ("on", "cpu", "fsdp", True, False),  # sharded weights: never
        ("on", "cpu", "none", False, False),  # it is the loss at trained positions
        ("auto", "cpu", "none", False, False),
    ],
)
def test_plan_fuses_the_loss_on_cpu_runs(monkeypatch, written, device, distributed, logits_only, expected):
    plan = plan_with_gpu(
        monkeypatch, training={"trained_logits_only": logits_only},
        hardware={"device": device, "fused_cross_entropy": written, "distributed": distributed},
    )  # fmt: skip
    assert plan.fused_cross_entropy is expected
    assert ("loss: output head + cross-entropy in one fused step" in plan.describe()) is expected
    assert any("trained_logits_only=false" in n for n in plan.notes) is (written == "on" and not logits_only)


def test_a_bad_setting_is_one_line_naming_the_key(tiny_model_dir, alpaca_file, tmp_path):
    raw = make_config_dict(
        tiny_model_dir, alpaca_file, tmp_path / "out", hardware={"fused_cross_entropy": "yes"}
    )
    with pytest.raises(WronAIError, match="fused_cross_entropy"):
        load_config(data=raw)


def test_a_forward_that_bypasses_its_head_is_a_one_line_error_naming_the_key(tiny_model_dir):
    """Logits made from the head's weight without calling the head: the hook never sees the positions."""
    from wronai.train.loss import trained_positions_loss

    model = _llama(tiny_model_dir)
    head = model.lm_head
    model.lm_head = torch.nn.Identity()  # the forward's "head" call no longer reaches the real head
    model.get_output_embeddings = lambda: head
    for fused in (False, True):
        with pytest.raises(WronAIError, match="training.trained_logits_only=false"):
            trained_positions_loss(model, _batch(), fused=fused)
