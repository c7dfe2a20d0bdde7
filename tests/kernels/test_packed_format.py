"""bitsandbytes' packed CPU inference format: one rule, checked on any CPU.

On AVX512-BF16 CPUs bitsandbytes 0.50 packs a ``Linear4bit``'s weight in place at its first eval-mode,
no-grad forward and never converts back (training then silently loses the gradient through the base). The
``packed_path`` fixture forces the library's flag on (the conversion is plain torch and runs anywhere) or
off, before the layers are built, so every invariant below is checked on both kinds of CPU.
"""

from __future__ import annotations

import contextlib

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from conftest import loss_and_gradients, make_config_dict, polish_batch, quantized_linear
from wronai.config import load_config
from wronai.kernels import bnb as kernels_bnb
from wronai.model import loading
from wronai.model.lora import apply_lora
from wronai.model.tokenizer import load_tokenizer
from wronai.runtime import hardware


@pytest.fixture(params=[True, False], ids=["packed-path-on", "packed-path-off"])
def packed_path(request, monkeypatch):
    """bitsandbytes believes the CPU has AVX512-BF16 (its packed path armed) or not."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: request.param)
    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: request.param)
    return request.param


def _model(tiny_model_dir, tmp_path, alpaca_file, **quantization):
    raw = make_config_dict(
        tiny_model_dir, alpaca_file, tmp_path / "out", quantization={"load_in_4bit": True, **quantization}
    )
    cfg = load_config(data=raw)
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    tok, _ = load_tokenizer(cfg.model, cfg.polish)
    torch.manual_seed(0)
    base = loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan)
    model = apply_lora(
        base, cfg.lora, [], gradient_checkpointing=0, keep_embeddings=plan.keep_embeddings,
        dequantize_chunk_bytes=plan.dequantize_chunk_bytes, fused_lora=plan.fused_lora,
    )  # fmt: skip
    return model, polish_batch(tok)


def _bytes(state_dict) -> dict[str, bytes]:
    return {
        k: v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        for k, v in state_dict.items()
        if torch.is_tensor(v)
    }


@pytest.mark.parametrize("chunk_mib", [2, 0])  # row-sliced layers, and bitsandbytes' own forward for all
def test_an_eval_forward_changes_nothing_a_training_model_computes(
    packed_path, tiny_model_dir, tmp_path, alpaca_file, chunk_mib
):
    model, batch = _model(tiny_model_dir, tmp_path, alpaca_file, dequantize_chunk_mib=chunk_mib)
    layers = kernels_bnb.four_bit_layers(model)
    assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers)
    before_state = _bytes(model.state_dict())
    model.train()
    torch.manual_seed(5)
    before = loss_and_gradients(model, batch)
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        model(**batch)  # what the Trainer's evaluation does between training steps
    assert kernels_bnb.packed_layers(model) == []
    assert _bytes(model.state_dict()) == before_state  # byte-identical: nothing packed or re-quantized
    model.train()
    torch.manual_seed(5)
    after = loss_and_gradients(model, batch)
    assert torch.equal(after[0], before[0])
    assert after[1].keys() == before[1].keys()
    for name, grad in before[1].items():
        assert torch.equal(after[1][name], grad), name  # bit-identical in fp32


def test_a_layer_bitsandbytes_packed_is_converted_back_and_kept_out(monkeypatch):
    """The library's own behaviour with its flag on: one eval forward packs the weight in place;
    ``forbid_packed_format`` converts it back and switches the flag off."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    layer = quantized_linear(64, 128, "nf4", True, False)
    layer.support_avx512bf16_for_cpu = True  # bitsandbytes' own state, as without WronAI
    layer.eval()
    # no packed kernel on a CPU without AVX512-BF16: the conversion has happened all the same
    with torch.no_grad(), contextlib.suppress(Exception):
        layer(torch.randn(2, 128))
    assert kernels_bnb.is_packed(layer.weight.quant_state)
    assert kernels_bnb.forbid_packed_format(layer) == 1  # converted back, flag off
    assert not kernels_bnb.is_packed(layer.weight.quant_state) and not layer.support_avx512bf16_for_cpu


@pytest.mark.parametrize(
    ("rows", "cols"), [(128, 352), (64, 128), (48, 64)]
)  # 352 wide: the demo's down_proj
def test_inference_packs_only_checked_layers_and_every_layer_evaluates(packed_path, rows, cols):
    layer = quantized_linear(rows, cols, "nf4", True, False)
    line = kernels_bnb.allow_checked_packed_format(torch.nn.Sequential(layer))
    packable = rows % 32 == 0 and cols % 64 == 0
    if packed_path:
        works = kernels_bnb.packed_matches_reference(layer) is None if packable else False
        assert layer.support_avx512bf16_for_cpu is works
        assert f"{int(works)} of 1 layers" in line
    else:
        assert not layer.support_avx512bf16_for_cpu and "not available" in line
    layer.eval()
    x = torch.randn(3, cols)
    reference = x @ bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().t()
    with torch.no_grad():
        out = layer(x)  # packs here where allowed
    packed = kernels_bnb.is_packed(layer.weight.quant_state)
    assert packed is (packed_path and layer.support_avx512bf16_for_cpu)
    error = float((out - reference).norm() / reference.norm())
    assert error < (2e-2 if packed else 1e-5)  # the packed kernel computes in bf16


def test_a_failed_check_keeps_the_stock_path(monkeypatch):
    """A packed kernel whose output differs from the dequantized weight (a broken build) is never used."""
    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: True)
    layer = quantized_linear(64, 128, "nf4", True, False)
    real = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: real(*a, **k) * 1.5)
    line = kernels_bnb.allow_checked_packed_format(torch.nn.Sequential(layer))
    assert not layer.support_avx512bf16_for_cpu and "0 of 1 layers" in line and "relative error" in line


def test_training_with_evaluation_has_the_losses_of_training_without(
    packed_path, tiny_model_dir, tmp_path, alpaca_file
):
    """Evaluation every 2 steps, checkpoints every 3: the per-step training losses are those of a run that
    never evaluates (bit-identical in fp32), and nothing is packed at the end."""
    from wronai.recipe import Pipeline

    losses = []
    for name, strategy in (("eval", "steps"), ("no-eval", "no")):
        # PEFT's modules over bitsandbytes' own forward: where the packed path would enter
        raw = make_config_dict(
            tiny_model_dir, alpaca_file, tmp_path / name,
            hardware={"fused_lora": "off"}, quantization={"dequantize_chunk_mib": 0},
        )  # fmt: skip
        raw["training"].update({"eval_strategy": strategy, "eval_steps": 2, "max_steps": 6})
        pipeline = Pipeline(load_config(data=raw))
        pipeline.train()
        history = pipeline.trainer.state.log_history
        losses.append([(e["step"], e["loss"]) for e in history if "loss" in e])
        assert kernels_bnb.packed_layers(pipeline.model) == []
        if strategy == "steps":
            assert sum("eval_loss" in e for e in history) == 3
    assert len(losses[0]) == 6 and losses[0] == losses[1]
