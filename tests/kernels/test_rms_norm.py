"""The fused RMSNorm: transformers' numbers (output, input and weight gradients), the swap and the plan."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from conftest import (
    make_config_dict,
    plan_with_gpu,
    same_training_off_and_auto,
)
from wronai.config import load_config
from wronai.errors import WronAIError
from wronai.kernels import rms_norm
from wronai.kernels.rms_norm import FusedRMSNorm, fuse_rms_norms, is_llama_norm, unfuse_rms_norms


def _norm(width: int, dtype: torch.dtype, eps: float = 1e-6) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(width, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(1))
    return norm


def _grads(norm: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    norm.weight.grad = None
    out = norm(x)
    out.backward(grad)
    return out.detach(), x.grad, norm.weight.grad


@pytest.mark.parametrize(
    ("dtype", "shape", "tol"),
    [
        (torch.float32, (3, 17, 96), 1e-5),
        (torch.float32, (5, 64), 1e-5),
        (torch.bfloat16, (2, 9, 64), 1e-2),  # the stock norm rounds in bf16 at the same two places
    ],
)
def test_fused_norm_gives_the_stock_output_and_gradients(dtype, shape, tol):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 3 + 0.5).to(dtype)
    grad = torch.randn(shape, generator=generator).to(dtype)
    norm = _norm(shape[-1], dtype, eps=1e-5)
    theirs = _grads(norm, x, grad)
    assert fuse_rms_norms(norm) == 1 and isinstance(norm, FusedRMSNorm)
    ours = _grads(norm, x, grad)
    assert norm.fused_calls == 1
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_a_frozen_weight_gets_no_gradient_and_the_input_still_does():
    norm = _norm(32, torch.float32)
    norm.weight.requires_grad_(False)
    x = torch.randn(4, 32)
    grad = torch.randn(4, 32)
    theirs = _grads(norm, x, grad)
    fuse_rms_norms(norm)
    ours = _grads(norm, x, grad)
    assert ours[2] is None and theirs[2] is None
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_take_the_stock_forward():
    norm = _norm(16, torch.float32)
    fuse_rms_norms(norm)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    out = norm(x)
    assert norm.fused_calls == 0
    torch.testing.assert_close(out, LlamaRMSNorm.forward(norm, x))


class _GemmaStyleNorm(torch.nn.Module):
    """A norm with another formula ((1 + weight) scaling): never swapped."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return (1 + self.weight) * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


def test_only_norms_with_llamas_forward_are_swapped():
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    model = torch.nn.ModuleList(
        [MistralRMSNorm(8), Qwen2RMSNorm(8), _GemmaStyleNorm(8), torch.nn.LayerNorm(8)]
    )
    assert [is_llama_norm(m) for m in model] == [True, True, False, False]
    assert fuse_rms_norms(model) == 2
    assert fuse_rms_norms(model) == 0  # fused norms are not swapped again
    assert type(model[0]).__name__ == "FusedMistralRMSNorm" and isinstance(model[0], MistralRMSNorm)
    assert isinstance(model[1], Qwen2RMSNorm) and type(model[2]) is _GemmaStyleNorm
    assert "FusedMistralRMSNorm" in str(model)  # what runs shows in print(model)
    fused_mistral = type(model[0])
    assert unfuse_rms_norms(model) == 2
    assert type(model[0]) is MistralRMSNorm and type(model[1]) is Qwen2RMSNorm
    other = MistralRMSNorm(8)
    fuse_rms_norms(other)
    assert type(other) is fused_mistral  # one fused class per stock class, whenever the swap happens


def test_a_norm_that_differs_from_the_stock_one_is_put_back(monkeypatch, caplog):
    model = torch.nn.ModuleList([_norm(16, torch.float32), _norm(16, torch.float32)])
    wrong = rms_norm._RMSNorm.forward
    monkeypatch.setattr(
        rms_norm._RMSNorm, "forward", staticmethod(lambda ctx, x, w, eps: wrong(ctx, x, w, eps * 1e5))
    )
    assert fuse_rms_norms(model) == 0
    assert all(type(m) is LlamaRMSNorm for m in model)
    assert "output differs from LlamaRMSNorm's" in caplog.text


def test_a_wrong_gradient_is_caught_by_the_start_up_check(monkeypatch, caplog):
    norm = _norm(16, torch.float32)
    backward = rms_norm._RMSNorm.backward

    def no_mean_term(ctx, grad):  # the input gradient without the normalisation's own term
        _, grad_w, _ = backward(ctx, grad)
        _, rstd, weight = ctx.saved_tensors
        return grad * weight * rstd.view(*grad.shape[:-1], 1), grad_w, None

    monkeypatch.setattr(rms_norm._RMSNorm, "backward", staticmethod(no_mean_term))
    assert fuse_rms_norms(norm) == 0 and type(norm) is LlamaRMSNorm
    assert "input grad differs" in caplog.text


@pytest.mark.parametrize("fused_lora", ["auto", "off"])
def test_the_tiny_model_trains_the_same_with_fused_norms(tiny_model_dir, alpaca_file, tmp_path, fused_lora):
    """The tiny 4-bit Llama through the pipeline's builders, with and without fused norms (fused LoRA
    layers and PEFT's): the same loss and gradients over two steps."""
    raw = make_config_dict(
        tiny_model_dir, alpaca_file, tmp_path / "out", hardware={"device": "cpu", "fused_lora": fused_lora}
    )
    runs = same_training_off_and_auto(
        raw,
        "fused_rms_norm",
        lambda m: sum(n.fused_calls for n in m.modules() if isinstance(n, FusedRMSNorm)),
    )
    for setting, (model, calls) in runs.items():
        norms = [m for m in model.modules() if isinstance(m, FusedRMSNorm)]
        assert len(norms) == (5 if setting == "auto" else 0)  # 2 per decoder layer + the final one
        assert calls == (10 if norms else 0)


@pytest.mark.parametrize(
    ("written", "device", "distributed", "expected"),
    [
        ("auto", "cpu", "none", True),
        ("off", "cpu", "none", False),
        ("on", "cpu", "none", True),
        ("auto", "cuda", "none", False),  # a GPU keeps transformers' norms unless asked
        ("on", "cuda", "none", True),
        ("on", "cpu", "fsdp", False),  # sharded weights: never
    ],
)
def test_plan_fuses_norms_on_cpu_runs(monkeypatch, written, device, distributed, expected):
    plan = plan_with_gpu(
        monkeypatch, hardware={"device": device, "fused_rms_norm": written, "distributed": distributed}
    )
    assert plan.fused_rms_norm is expected
    assert ("RMSNorm: fused step" in plan.describe()) is expected
    assert any("fused_rms_norm needs whole parameters" in n for n in plan.notes) is (distributed == "fsdp")


def test_a_bad_setting_is_one_line_naming_the_key():
    with pytest.raises(WronAIError, match="fused_rms_norm"):
        load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"},
                          "hardware": {"fused_rms_norm": "fast"}})  # fmt: skip
