"""The fused rotary embedding: transformers' numbers (outputs, q and k gradients), the swap and the plan."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from conftest import (
    assert_same_loss_and_gradients,
    loss_and_gradients,
    make_config_dict,
    plan_with_gpu,
    same_training_off_and_auto,
    tiny_llama,
)
from wronai.config import load_config
from wronai.errors import WronAIError
from wronai.kernels import rotary
from wronai.kernels.rotary import (
    FusedRotaryAttention,
    fuse_rotary,
    fused_rotary_calls,
    fused_rotary_function,
    unfuse_rotary,
)


def _inputs(batch=3, heads=(4, 2), positions=7, d=16, cos_batch=None, dtype=torch.float32):
    """q and k as transformers hands them over (heads transposed out of the projection's layout: not
    contiguous), cos and sin of a real rotary table."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, positions, heads[0], d, generator=generator).to(dtype).transpose(1, 2)
    k = torch.randn(batch, positions, heads[1], d, generator=generator).to(dtype).transpose(1, 2)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(positions).float() + 3, inv)
    table = torch.cat([angles, angles], -1)
    rows = batch if cos_batch is None else cos_batch
    return q, k, table.cos().expand(rows, -1, -1), table.sin().expand(rows, -1, -1)


def _run(fn, q, k, cos, sin, *extra):
    q, k = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    out_q, out_k = fn(q, k, cos, sin, *extra)
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=generator).to(t.dtype) for t in (out_q, out_k)]
    torch.autograd.backward((out_q, out_k), grads)
    return out_q.detach(), out_k.detach(), q.grad, k.grad


@pytest.mark.parametrize("cos_batch", [None, 1])
def test_fused_rotary_equals_transformers_in_float32(cos_batch):
    """Outputs and both gradients equal Llama's function (per-row and broadcast cos/sin)."""
    inputs = _inputs(cos_batch=cos_batch)
    fused = fused_rotary_function(apply_rotary_pos_emb)
    ours, theirs = _run(fused, *inputs), _run(apply_rotary_pos_emb, *inputs)
    assert fused.fused_calls == 1
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_rotary_keeps_the_dtypes_of_half_precision_queries():
    """bf16 q and k with float32 cos/sin (a bf16-autocast run): float32 outputs as transformers' (type
    promotion), gradients in bf16, the same numbers to bf16 rounding."""
    inputs = _inputs(dtype=torch.bfloat16)
    ours, theirs = (
        _run(fused_rotary_function(apply_rotary_pos_emb), *inputs),
        _run(apply_rotary_pos_emb, *inputs),
    )
    assert [t.dtype for t in ours] == [t.dtype for t in theirs] == [torch.float32] * 2 + [torch.bfloat16] * 2
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_inputs_outside_the_standard_layout_take_the_stock_function():
    """A partial rotary dimension and another unsqueeze dimension go to the function it wraps."""
    calls = []

    def stock(*args):
        calls.append(args)
        return "stock"

    fused = fused_rotary_function(stock)
    q, k, cos, sin = _inputs()
    assert fused(q, k, cos[..., :8], sin[..., :8], 1) == "stock"  # rotary on half of each head
    assert fused(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2) == "stock"  # heads in dimension 2
    assert len(calls) == 2 and fused.fused_calls == 0
    fused(q, k, cos, sin)
    assert len(calls) == 2 and fused.fused_calls == 1


def test_the_swap_computes_the_same_model_without_patching_transformers(tiny_model_dir):
    """The tiny Llama's loss and gradients are the stock ones; every attention module was swapped (still a
    LlamaAttention, shown by name) and took the fused step once per forward; transformers' module-level
    function is untouched; unfusing restores the classes."""
    stock = tiny_llama(tiny_model_dir)
    model = copy.deepcopy(stock)
    layers = len(model.model.layers)
    assert fuse_rotary(model) == layers
    attentions = [m for m in model.modules() if isinstance(m, LlamaAttention)]
    assert len(attentions) == layers and all(isinstance(m, FusedRotaryAttention) for m in attentions)
    assert "RotaryFusedLlamaAttention" in repr(model)
    assert modeling_llama.apply_rotary_pos_emb is apply_rotary_pos_emb
    batch = {"input_ids": torch.randint(5, 400, (2, 9), generator=torch.Generator().manual_seed(2))}
    calls = fused_rotary_calls(model)
    assert_same_loss_and_gradients(loss_and_gradients(model, batch), loss_and_gradients(stock, batch))
    assert fused_rotary_calls(model) - calls == layers
    assert unfuse_rotary(model) == layers
    assert all(type(m) is LlamaAttention for m in model.modules() if isinstance(m, LlamaAttention))


def test_a_wrong_gradient_is_caught_by_the_start_up_check(tiny_model_dir, monkeypatch, caplog):
    model = tiny_llama(tiny_model_dir)
    backward = rotary._Rotary.backward

    def no_sine_term(ctx, grad_q, grad_k):  # the k gradient without the rotated half's term
        dq, dk, *_ = backward(ctx, grad_q, grad_k)
        cos, _ = ctx.saved_tensors
        return dq, (grad_k * cos).to(dk.dtype), None, None

    monkeypatch.setattr(rotary._Rotary, "backward", staticmethod(no_sine_term))
    assert fuse_rotary(model) == 0
    assert all(type(m) is LlamaAttention for m in model.modules() if isinstance(m, LlamaAttention))
    assert "k grad (float32) differs" in caplog.text


def test_an_attention_with_another_rotary_function_is_left_alone():
    """A module whose forward calls an ``apply_rotary_pos_emb`` of other code (here: no rotate_half) is not
    swapped; neither is one that calls none."""
    namespace: dict = {"torch": torch}
    exec(  # a module of its own, as a model file would be
        "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):\n"
        "    return q * cos, k * cos\n"
        "class Attention(torch.nn.Module):\n"
        "    def forward(self, q, k, cos, sin):\n"
        "        return apply_rotary_pos_emb(q, k, cos, sin)\n",
        namespace,
    )
    model = torch.nn.ModuleDict({"attention": namespace["Attention"](), "linear": torch.nn.Linear(2, 2)})
    assert fuse_rotary(model) == 0
    assert type(model["attention"]) is namespace["Attention"]


@pytest.mark.parametrize("fused_lora", ["auto", "off"])
def test_the_tiny_model_trains_the_same_with_fused_rotary(tiny_model_dir, alpaca_file, tmp_path, fused_lora):
    """The tiny 4-bit Llama through the pipeline's builders with and without the fused rotary embedding:
    the same loss and gradients over two steps."""
    raw = make_config_dict(
        tiny_model_dir, alpaca_file, tmp_path / "out", hardware={"device": "cpu", "fused_lora": fused_lora}
    )
    # calls are counted per attention class in this process: the helper takes the difference
    runs = same_training_off_and_auto(raw, "fused_rotary", fused_rotary_calls)
    for setting, (model, calls) in runs.items():
        swapped = [m for m in model.modules() if isinstance(m, FusedRotaryAttention)]
        assert len(swapped) == (2 if setting == "auto" else 0)
        assert calls == (4 if swapped else 0)


@pytest.mark.parametrize(
    ("written", "device", "distributed", "expected"),
    [
        ("auto", "cpu", "none", True),
        ("off", "cpu", "none", False),
        ("auto", "cuda", "none", False),  # a GPU keeps transformers' function unless asked
        ("on", "cuda", "none", True),
        ("auto", "cpu", "fsdp", True),  # no parameters: sharding changes nothing
    ],
)
def test_plan_fuses_rotary_on_cpu_runs(monkeypatch, written, device, distributed, expected):
    plan = plan_with_gpu(
        monkeypatch, hardware={"device": device, "fused_rotary": written, "distributed": distributed}
    )
    assert plan.fused_rotary is expected
    assert ("rotary embedding: fused step" in plan.describe()) is expected


def test_a_bad_setting_is_one_line_naming_the_key():
    with pytest.raises(WronAIError, match="fused_rotary"):
        load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"},
                          "hardware": {"fused_rotary": "fast"}})  # fmt: skip
