"""The CPU matrix: {native bf16 or not} × {mixed precision fp32 or bf16} × {4-bit, 8-bit, 16-bit}.

Native bf16 is forced either way in the plan (``hardware.cpu_supports_bf16``), so both kinds of CPU are
checked on whichever this suite runs on (bf16 is emulated, slowly but correctly, where it is not native).
For each combination the plan's compute dtype, autocast, fused LoRA, row slicing and embedding dtype agree,
and what the plan says is what runs: every LoRA layer takes the fused step, the residual stream starts in
float32 as PEFT's does, and loss and gradients equal PEFT's own modules' within the precision's tolerance.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import loss_and_gradients, make_config_dict, polish_batch
from wronai.config import load_config
from wronai.kernels import fused_lora
from wronai.model import loading
from wronai.model.lora import apply_lora
from wronai.model.tokenizer import load_tokenizer
from wronai.runtime import hardware

QUANT = {"4bit": {"load_in_4bit": True}, "8bit": {"load_in_4bit": False, "load_in_8bit": True},
         "16bit": {"load_in_4bit": False}}  # fmt: skip
MATRIX = [(n, p, q) for n in (True, False) for p in ("fp32", "bf16") for q in QUANT]


def _config(tiny_model_dir, tmp_path, alpaca_file, precision, quant):
    raw = make_config_dict(
        tiny_model_dir, alpaca_file, tmp_path / "out", quantization=QUANT[quant], hardware={"device": "cpu"}
    )
    raw["training"]["bf16"] = precision == "bf16"
    raw["lora"]["lora_dropout"] = 0.1
    return load_config(data=raw)


@pytest.mark.parametrize(("native", "precision", "quant"), MATRIX)
def test_plan_is_consistent(monkeypatch, tiny_model_dir, tmp_path, alpaca_file, native, precision, quant):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: native)
    cfg = _config(tiny_model_dir, tmp_path, alpaca_file, precision, quant)
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    bf16 = precision == "bf16" and native
    assert plan.precision == ("bf16" if bf16 else "fp32")
    assert plan.autocast_dtype == (torch.bfloat16 if bf16 else None)
    assert plan.quantization == ("4bit-nf4" if quant == "4bit" else "none")  # 8-bit training needs CUDA
    assert plan.compute_dtype == (torch.bfloat16 if bf16 else torch.float32)  # follows the mixed precision
    assert plan.model_dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert plan.fused_lora
    assert plan.keep_embeddings is (quant == "4bit")
    assert bool(plan.dequantize_chunk_bytes) is (quant == "4bit")
    assert plan.cpu is not None and plan.cpu.native_bf16 is native
    assert f"native bf16 {'yes' if native else 'no'}" in "\n".join(plan.describe())
    if quant == "8bit":
        assert any("8-bit" in n for n in plan.notes)


def _build(cfg, plan, fused: bool):
    torch.manual_seed(0)
    base = loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan)
    model = apply_lora(
        base, cfg.lora, [], gradient_checkpointing=0, keep_embeddings=plan.keep_embeddings,
        dequantize_chunk_bytes=plan.dequantize_chunk_bytes and 16 * 64 * 4,  # several slices per layer
        fused_lora=fused, autocast=plan.autocast_dtype,
    ).train()  # fmt: skip
    return with_trained_adapter(model)


def with_trained_adapter(model):
    """lora_B as after some training (PEFT starts it at zero, where A's gradient is zero either way)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@pytest.mark.slow
@pytest.mark.parametrize(("native", "precision", "quant"), [m for m in MATRIX if m[2] != "8bit"])
def test_what_the_plan_says_is_what_runs(
    monkeypatch, tiny_model_dir, tmp_path, alpaca_file, native, precision, quant
):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: native)
    cfg = _config(tiny_model_dir, tmp_path, alpaca_file, precision, quant)
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    batch = polish_batch(load_tokenizer(cfg.model, cfg.polish)[0])
    autocast = (
        torch.autocast("cpu", dtype=plan.autocast_dtype) if plan.autocast_dtype else contextlib.nullcontext()
    )
    results = []
    for fused in (True, False):
        model = _build(cfg, plan, fused)
        lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert len(lora_layers) == 14
        residual_dtypes = []
        first_layer = model.get_base_model().model.layers[0]
        hook = first_layer.register_forward_pre_hook(
            lambda m, args, kw, seen=residual_dtypes: seen.append((args or (kw["hidden_states"],))[0].dtype),
            with_kwargs=True,
        )
        torch.manual_seed(5)
        with autocast:
            results.append(loss_and_gradients(model, batch))
        hook.remove()
        # 4-bit: float32, as PEFT's k-bit preparation gives (the kept 16-bit embedding's output upcast);
        # 16-bit LoRA: the weights' dtype, as PEFT's modules give
        assert residual_dtypes == [torch.float32 if quant == "4bit" else plan.model_dtype]
        if fused:  # the plan says fused: every layer took the fused step
            assert all(isinstance(m, tuple(fused_lora.SWAPS.values())) for m in lora_layers)
            assert fused_lora.fused_call_count(model) == 14
    (loss, grads), (ref_loss, ref_grads) = results
    tol = 2e-2 if plan.autocast_dtype else 1e-4  # bf16 rounding in another order vs fp32 reassociation
    assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
    assert grads.keys() == ref_grads.keys() and ref_grads
    for name, want in ref_grads.items():
        assert grads[name].dtype == want.dtype == torch.float32
        assert (grads[name] - want).norm() <= tol * want.norm() + 1e-7, name


def test_fused_layers_that_would_decline_are_not_installed(
    monkeypatch, tiny_model_dir, tmp_path, alpaca_file
):
    """A 4-bit compute dtype the fused step cannot take outside autocast (bf16 base, fp32 adapter: the plan
    bug this matrix guards against) makes the start-up check put PEFT's modules back, with a note."""
    cfg = _config(tiny_model_dir, tmp_path, alpaca_file, "fp32", "4bit")
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    import dataclasses

    wrong = dataclasses.replace(plan, compute_dtype=torch.bfloat16)
    model = _build(cfg, wrong, fused=True)
    assert not any(isinstance(m, tuple(fused_lora.SWAPS.values())) for m in model.modules())
