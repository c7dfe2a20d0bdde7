"""4-bit layers that keep their weight dequantized: bitsandbytes' numbers, the budget, the plan and the config."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch

from conftest import (
    assert_same_loss_and_gradients,
    loss_and_gradients,
    make_config_dict,
    polish_batch,
    quantized_linear,
)
from wronai.config import load_config
from wronai.kernels import dequantized as kept_module
from wronai.kernels.dequantized import DequantizedLinear4bit, dequantized_bytes, keep_dequantized_layers
from wronai.model import loading
from wronai.model.lora import apply_lora
from wronai.model.tokenizer import load_tokenizer
from wronai.runtime import hardware


def _forward_backward(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad


@pytest.mark.parametrize(("quant_type", "nested", "bias"), [("nf4", True, False), ("fp4", False, True)])
def test_kept_layer_computes_what_bitsandbytes_computes(quant_type, nested, bias):
    stock = quantized_linear(96, 128, quant_type, nested, bias)
    kept = DequantizedLinear4bit.from_linear4bit(copy.deepcopy(stock))
    x = torch.randn(3, 5, 128)
    ours, theirs = _forward_backward(kept, x), _forward_backward(stock, x)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert kept._kept is not None  # the weight is kept after the first call ...
    weight = kept._kept[1]
    _forward_backward(kept, x)
    assert kept._kept[1] is weight  # ... and not dequantized again
    assert kept.state_dict().keys() == stock.state_dict().keys()  # the 4-bit codes stay what is saved
    assert "weight kept dequantized" in repr(kept)


def test_kept_weight_follows_new_codes_and_dtypes():
    kept = DequantizedLinear4bit.from_linear4bit(quantized_linear(64, 64, "nf4", True, False))
    first = kept.dequantized(torch.float32)
    assert kept.dequantized(torch.bfloat16).dtype == torch.bfloat16
    other = quantized_linear(64, 64, "nf4", True, False)
    with torch.no_grad():  # what a merge does: new codes and scales in the same layer
        kept.weight.data.copy_(other.weight.data.flip(0))
    assert not torch.equal(kept.dequantized(torch.float32), first)


def test_layers_are_kept_only_within_the_budget():
    small, large = quantized_linear(64, 64, "nf4", True, False), quantized_linear(256, 64, "nf4", True, False)
    model = torch.nn.Sequential(small, large)
    total = dequantized_bytes(model, torch.bfloat16)
    assert total == (64 + 256) * 64 * 2
    assert keep_dequantized_layers(model, total - 1, torch.bfloat16) == 0
    assert type(small) is bnb.nn.Linear4bit and type(large) is bnb.nn.Linear4bit
    assert keep_dequantized_layers(model, total, torch.bfloat16) == 2
    assert type(small) is DequantizedLinear4bit and type(large) is DequantizedLinear4bit


def test_a_kept_weight_unlike_bitsandbytes_keeps_nothing(monkeypatch, caplog):
    model = torch.nn.Sequential(quantized_linear(64, 64, "nf4", True, False))
    real = DequantizedLinear4bit.dequantized
    monkeypatch.setattr(DequantizedLinear4bit, "dequantized", lambda self, dtype: real(self, dtype) * 1.05)
    assert keep_dequantized_layers(model, 2**20, torch.float32) == 0
    assert type(model[0]) is bnb.nn.Linear4bit and "_kept" not in vars(model[0])
    assert "differs from bitsandbytes' dequantization" in caplog.text


def _tiny_4bit(tiny_model_dir, alpaca_file, tmp_path, **quantization):
    raw = make_config_dict(
        tiny_model_dir, alpaca_file, tmp_path / "out", quantization={"load_in_4bit": True, **quantization}
    )
    raw["hardware"] = {"device": "cpu"}
    cfg = load_config(data=raw)
    return cfg, hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)


@pytest.mark.parametrize("fused", [True, False])
def test_4bit_model_with_kept_weights_has_the_same_loss_and_gradients(
    tiny_model_dir, tmp_path, alpaca_file, monkeypatch, fused
):
    """The tiny 4-bit Llama through WronAI's builders, weights kept and not, fused LoRA layers and PEFT's."""
    calls: list[int] = []
    rows = kept_module.four_bit_rows
    monkeypatch.setattr(kept_module, "four_bit_rows", lambda *a: calls.append(1) or rows(*a))
    cfg, plan = _tiny_4bit(tiny_model_dir, alpaca_file, tmp_path)
    assert plan.keep_dequantized_bytes == 256 * 2**20
    tok, _ = load_tokenizer(cfg.model, cfg.polish)
    batch = polish_batch(tok)
    results = []
    for budget in (0, plan.keep_dequantized_bytes):
        torch.manual_seed(0)
        calls.clear()  # from here: the fused layers' start-up check computes the first one too
        base = loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan)
        model = apply_lora(
            base, cfg.lora.model_copy(update={"lora_dropout": 0.0}), [], gradient_checkpointing=False,
            keep_dequantized_bytes=budget, dequantize_chunk_bytes=16 * 64 * 4, fused_lora=fused,
        )  # fmt: skip
        kept = [m for m in model.modules() if isinstance(m, DequantizedLinear4bit)]
        four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(kept) == (len(four_bit) if budget else 0) and four_bit
        model.train()
        results.append(loss_and_gradients(model, batch))
        results.append(loss_and_gradients(model, batch))
        assert len(calls) == len(kept)  # each kept weight dequantized once over two steps
    assert_same_loss_and_gradients(results[2], results[0])
    assert_same_loss_and_gradients(results[3], results[1])


@pytest.mark.parametrize(
    ("quantization", "budget"),
    [
        ({}, 256 * 2**20),
        ({"keep_dequantized_mib": 0}, 0),
        ({"keep_dequantized_mib": 64}, 64 * 2**20),
        ({"dequantize_chunk_mib": 8}, 0),  # row slices written: the user asked for the smaller peak
        ({"dequantize_chunk_mib": 0}, 256 * 2**20),
        ({"dequantize_chunk_mib": 0, "keep_dequantized_mib": 32}, 32 * 2**20),
        (
            {"dequantize_chunk_mib": 8, "keep_dequantized_mib": 32},
            32 * 2**20,
        ),  # kept where it fits, else slices
        ({"load_in_4bit": False}, 0),
    ],
)
def test_plan_keeps_dequantized_weights_on_cpu(quantization, budget):
    data = {"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}, "hardware": {"device": "cpu"},
            "quantization": quantization}  # fmt: skip
    cfg = load_config(data=data)
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    assert plan.keep_dequantized_bytes == budget
    assert ("kept dequantized" in " ".join(plan.describe())) is bool(budget)


def test_plan_on_a_gpu_keeps_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "_device_name", lambda device: "a test GPU")
    monkeypatch.setattr(hardware, "_bf16_ok", lambda device: True)
    cfg = load_config(
        data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"}, "hardware": {"device": "cuda"}}
    )
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    assert plan.device == "cuda" and plan.keep_dequantized_bytes == 0


@pytest.mark.parametrize(
    ("written", "kept_mib"),
    [
        ({"dequantize_chunk_mib": 8}, 0),
        ({"dequantize_chunk_mib": 8, "keep_dequantized_mib": 64}, 64),
        ({}, 256),
    ],
)
def test_the_resolved_config_keeps_what_was_written(written, kept_mib):
    """Writing row slices alone turns keeping off, in the config itself: its dump (the run's saved config,
    read back on resume) plans the same."""
    import yaml

    from wronai.config import dump_config

    cfg = load_config(
        data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"}, "quantization": written}
    )
    again = load_config(data=yaml.safe_load(dump_config(cfg)))
    assert cfg.quantization.keep_dequantized_mib == again.quantization.keep_dequantized_mib == kept_mib
    assert again.quantization == cfg.quantization


def test_memory_plan_counts_the_kept_weights():
    from dataclasses import replace

    from wronai.runtime.memory import ModelShape, Settings, estimate

    shape = ModelShape.from_config(
        {"hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6, "num_key_value_heads": 3,
         "num_hidden_layers": 6, "vocab_size": 4000}
    )  # fmt: skip
    cfg = load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"},
                            "training": {"per_device_train_batch_size": 2}})  # fmt: skip
    settings = Settings.from_config(cfg)
    cpu = estimate(shape, settings, device="cpu").parts
    assert cpu["kept dequantized weights"] == shape.linear_params * settings.compute_bytes
    assert cpu["dequant buffer"] == 0
    gpu = estimate(shape, settings).parts
    assert "kept dequantized weights" not in gpu and gpu["dequant buffer"] > 0
    tight = estimate(shape, replace(settings, keep_dequantized_bytes=1), device="cpu").parts
    assert "kept dequantized weights" not in tight
