"""LoRA layers computed in one autograd function: the frozen base matmul and the adapter, fused.

PEFT computes a LoRA layer as ``base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``: on a CPU, where
every operation is a separate pass over memory, the clone, the scaling, the add and (in the backward) the
scaling again and the sum of the two input gradients are five passes over a tokens × features tensor per
layer, next to one autograd node per operation. ``_LoraLinear`` gives the same numbers with none of them:

    forward   y  = x·Wᵀ  (+ bias);  a = drop(x)·Aᵀ;  y += s·a·Bᵀ          (addmm, in place)
    backward  gb = g·B;  dB = s·gᵀ·a;  dA = s·gbᵀ·drop(x);  dx = g·W + s·drop'(gb·A)   (addmm, in place)

It saves what PEFT's modules save (the dropped-out input, dropout's mask and ``a``); the frozen weight W comes from the
row sources of ``wronai.kbit_chunks`` — 4-bit codes dequantized (in row slices where
``quantization.dequantize_chunk_mib`` asks for them; the block scales once per forward, where
bitsandbytes undoes the double quantization again in the backward) or a dense weight used as it is.

``fuse_lora_layers`` switches PEFT's ``lora.Linear`` and ``lora.bnb.Linear4bit`` layers (``hardware.fused_lora``).
Under autocast (bf16 on CPUs with native bf16, CUDA) the matmuls run in autocast's dtype and the output
has the dtype PEFT's would (a 4-bit base casts back to the input's, as bitsandbytes does). A call takes
PEFT's own forward whenever the fused one would not be the same computation: adapters disabled or merged,
several active adapters, DoRA and other variants, a trained bias, mixed dtypes outside autocast, or
parameters a sharding wrapper holds in pieces.
"""

from __future__ import annotations

import logging
from types import MethodType
from typing import Any

import torch

from wronai.kbit_chunks import (
    DenseRows,
    RowSource,
    chunkable,
    four_bit_rows,
    slice_rows,
    sliced_grad_input,
    sliced_matmul,
)

logger = logging.getLogger(__name__)


class _LoraLinear(torch.autograd.Function):
    """``x·Wᵀ + bias + scaling · drop(x)·Aᵀ·Bᵀ`` for a frozen W that ``source`` builds ``rows`` rows at a time.

    The matmuls run in ``compute`` (x's dtype, or autocast's 16-bit dtype) and the result is ``out_dtype``;
    gradients come back in the dtypes of x and of the adapter, as autocast's casts would give them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bias: torch.Tensor | None,
        source: RowSource,
        rows: int,
        scaling: float,
        dropout: float,
        compute: torch.dtype,
        out_dtype: torch.dtype,
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # explicit dtypes below
            flat = x.reshape(-1, source.in_features)
            mask = None
            dropped = flat
            # dropout: what nn.Dropout computes (same generator, same numbers), keeping its boolean mask
            if dropout > 0:
                dropped, mask = torch.native_dropout(flat, dropout, True)
            flat, dropped = flat.to(compute), dropped.to(compute)
            a, b = lora_a.to(compute), lora_b.to(compute)
            out = sliced_matmul(flat, source, tensors, rows)
            if bias is not None:
                out += bias.to(compute)
            low = dropped @ a.t()
            out.addmm_(low, b.t(), alpha=scaling)
        ctx.save_for_backward(dropped, low, a, b, mask, *tensors)
        ctx.source, ctx.rows, ctx.scaling, ctx.dropout, ctx.shape = source, rows, scaling, dropout, x.shape
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype)
        return out.reshape(*x.shape[:-1], source.out_features).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        dropped, low, lora_a, lora_b, mask, *tensors = ctx.saved_tensors
        scaling, source = ctx.scaling, ctx.source
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        grad = grad.reshape(-1, source.out_features).to(low.dtype)
        grad_low = grad @ lora_b
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_b = (grad.t() @ low).mul_(scaling).to(b_dtype)
        if ctx.needs_input_grad[1]:
            grad_a = (grad_low.t() @ dropped).mul_(scaling).to(a_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = sliced_grad_input(grad, source, tuple(tensors), ctx.rows)
            if mask is None:
                grad_x.addmm_(grad_low, lora_a, alpha=scaling)
            else:
                through = torch.ops.aten.native_dropout_backward(
                    grad_low @ lora_a, mask, 1 / (1 - ctx.dropout)
                )
                grad_x.add_(through, alpha=scaling)
            grad_x = grad_x.reshape(ctx.shape).to(x_dtype)
        return (grad_x, grad_a, grad_b, *(None for _ in range(7)), *(None for _ in tensors))


def _base_rows(
    base: Any, x: torch.Tensor, compute: torch.dtype, autocast: bool
) -> tuple[RowSource, tuple[torch.Tensor, ...], int, torch.dtype] | None:
    """The frozen base layer as a row source in ``compute`` (source, its tensors, rows per slice, the dtype
    of its output), if it is one."""
    state = getattr(base.weight, "quant_state", None)  # a bitsandbytes 4-bit weight (Params4bit)
    if state is not None:  # bitsandbytes computes in its compute_dtype (autocast's, under autocast)
        if not chunkable(state) or (
            not autocast and (getattr(base, "compute_dtype", None) or x.dtype) != x.dtype
        ):
            return None
        source, tensors = four_bit_rows(base.weight.data, state)
        chunk = getattr(base, "wronai_chunk_bytes", 0)  # set by kbit_chunks.chunk_4bit_layers
        return source, tensors, slice_rows(source, chunk, compute), x.dtype  # cast back to x's dtype
    if (
        type(base) is torch.nn.Linear
        and (autocast or base.weight.dtype == x.dtype)
        and not base.weight.requires_grad
    ):
        out_features, in_features = base.weight.shape
        return DenseRows(out_features, in_features), (base.weight,), out_features, compute
    return None


def _fused_call(layer: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The fused computation of this PEFT LoRA layer for x, or None where it would not equal PEFT's."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if (
        name not in layer.lora_A
        or name in getattr(layer, "lora_variant", {})
        or getattr(layer, "fan_in_fan_out", False)
    ):
        return None
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if layer.lora_B[name].bias is not None:
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (torch.nn.Identity, torch.nn.Dropout)):
        return None
    base = layer.get_base_layer()
    bias = getattr(base, "bias", None)
    autocast = torch.is_autocast_enabled(x.device.type)
    if (bias is not None and bias.requires_grad) or not (autocast or x.dtype == lora_a.dtype == lora_b.dtype):
        return None
    compute = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    found = _base_rows(base, x, compute, autocast)
    if found is None:
        return None
    source, tensors, rows, out_dtype = found
    if lora_a.shape[1:] != (source.in_features,) or lora_b.shape[:1] != (source.out_features,):
        return None  # parameters held in pieces (ZeRO-3, FSDP) or an unexpected layout
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    scaling = float(layer.scaling[name])
    return _LoraLinear.apply(x, lora_a, lora_b, bias, source, rows, scaling, p, compute, out_dtype, *tensors)


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's LoRA forward computed by ``_LoraLinear`` (PEFT's own where that would differ)."""
    out = None if args or kwargs else _fused_call(self, x)
    return type(self).forward(self, x, *args, **kwargs) if out is None else out


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Make PEFT's LoRA linear layers (dense and 4-bit bases) compute through ``_LoraLinear``.

    Returns how many layers were switched; their modules, parameters and saved adapters stay PEFT's.
    """
    from peft.tuners.lora import Linear as LoraDense

    kinds: tuple[type, ...] = (LoraDense,)
    try:
        from peft.tuners.lora.bnb import Linear4bit as Lora4bit

        kinds = (LoraDense, Lora4bit)
    except ImportError:  # PEFT defines it only when bitsandbytes is installed
        pass
    switched = 0
    for module in model.modules():
        if type(module) in kinds:
            module.forward = MethodType(_fused_forward, module)  # type: ignore[method-assign]
            switched += 1
    if switched:
        logger.info(
            "LoRA: %d layers compute base and adapter in one fused step (hardware.fused_lora)", switched
        )
    return switched
