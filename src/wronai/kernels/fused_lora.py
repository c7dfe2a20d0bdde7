"""LoRA layers computed in one autograd function: the frozen base matmul and the adapter, fused.

PEFT computes a LoRA layer as ``base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``: on a CPU, where
every operation is a separate pass over memory, the clone, the scaling, the add and (in the backward) the
scaling again and the sum of the two input gradients are five passes over a tokens × features tensor per
layer, next to one autograd node per operation. ``_LoraLinear`` gives the same numbers with none of them:

    forward   y  = x·Wᵀ  (+ bias);  a = drop(x)·Aᵀ;  y += s·a·Bᵀ          (addmm, in place)
    backward  gb = g·B;  dB = s·gᵀ·a;  dA = s·gbᵀ·drop(x);  dx = g·W + s·drop'(gb·A)   (addmm, in place)

Layers that read one input (q, k and v; gate and up) share one cast of it to the compute dtype, kept on
the input tensor, and B's gradient is computed as (aᵀ·g)ᵀ, the operand order oneDNN and MKL run faster.
It saves what PEFT's modules save (the dropped-out input, dropout's mask and ``a``); the frozen weight W comes from the
row sources of ``wronai.kernels.row_slices`` — 4-bit codes dequantized (in row slices where
``quantization.dequantize_chunk_mib`` asks for them; the block scales once per forward, where
bitsandbytes undoes the double quantization again in the backward), the weight a
``wronai.kernels.dequantized.DequantizedLinear4bit`` keeps dequantized, or a dense weight used as it is.

``fuse_lora_layers`` swaps ``FusedLoraLinear`` / ``FusedLora4bit`` — subclasses of PEFT's ``lora.Linear`` and
``lora.bnb.Linear4bit`` — in for PEFT's layers (``hardware.fused_lora``; in place, so PEFT's bookkeeping and
saved adapters are unchanged; they show in ``print(model)``), after checking the first layer's output and
gradients against PEFT's own forward: on a mismatch, or where that layer would not take the fused step at
all, every layer goes back to PEFT's class, with one note.
Under autocast (bf16 on CPUs with native bf16, CUDA) the matmuls run in autocast's dtype and so does the
output — what autocast gives any linear layer, and PEFT's for a dense base. bitsandbytes' 4-bit layer casts
its output back to the input's dtype (fp32: the residual stream after k-bit preparation), so with PEFT's
modules every projection's output is cast up and the next one's input down again, and the MLP's SwiGLU runs
on fp32 tensors 2.7x the hidden size; keeping autocast's dtype made a step of the speed benchmark (2-core
AMX-BF16 Xeon, 3 x 512 tokens) 1.35x faster, losses equal to 1e-5 over 30 steps. Gradients come back in the
dtypes of the input and the adapter. A call takes
PEFT's own forward whenever the fused one would not be the same computation: adapters disabled or merged,
several active adapters, DoRA and other variants, a trained bias, mixed dtypes outside autocast, or
parameters a sharding wrapper holds in pieces.
"""

from __future__ import annotations

import logging
from typing import Any

import peft
import torch
from peft.tuners.lora import Linear as PeftLoraLinear

from wronai.kernels.row_slices import DenseRows, RowSource, slice_rows, sliced_grad_input, sliced_matmul
from wronai.kernels.swap import restore_stock

logger = logging.getLogger(__name__)

# PEFT versions whose LoRA layer internals (lora_A/B, scaling, lora_dropout, lora_variant, active_adapters,
# merged, disable_adapters) the fused step reads; outside them PEFT's modules run
TESTED = ((0, 15), (1, 0))


def peft_version_supported() -> bool:
    major, minor = (int(p) if p.isdigit() else 0 for p in peft.__version__.split(".")[:2])
    low, high = TESTED
    return low <= (major, minor) < high


class _LoraLinear(torch.autograd.Function):
    """``x·Wᵀ + bias + scaling · drop(x)·Aᵀ·Bᵀ`` for a frozen W that ``source`` builds ``rows`` rows at a time.

    The matmuls and the result are in ``compute``: autocast's 16-bit dtype under autocast (what autocast's
    linear gives), else x's dtype (which is PEFT's output dtype where the fused step applies); gradients come back in the dtypes of x and of the adapter, as autocast's casts would give them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        x_compute: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bias: torch.Tensor | None,
        source: RowSource,
        rows: int,
        scaling: float,
        dropout: float,
        compute: torch.dtype,
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # explicit dtypes below
            flat = x.reshape(-1, source.in_features)
            mask = None
            dropped = flat
            # dropout: what nn.Dropout computes (same generator, same numbers), keeping its boolean mask
            if dropout > 0:
                dropped, mask = torch.native_dropout(flat, dropout, True)
            # x in ``compute``, cast once for every layer that reads x (``_in_compute``); where dropout is off
            # the matmul and the saved adapter input are that same tensor
            flat = x_compute.reshape(-1, source.in_features)
            dropped = flat if mask is None else dropped.to(compute)
            a, b = lora_a.to(compute), lora_b.to(compute)
            out = sliced_matmul(flat, source, tensors, rows)
            if bias is not None:
                out += bias.to(compute)
            low = dropped @ a.t()
            out.addmm_(low, b.t(), alpha=scaling)
        ctx.save_for_backward(dropped, low, a, b, mask, *tensors)
        ctx.source, ctx.rows, ctx.scaling, ctx.dropout, ctx.shape = source, rows, scaling, dropout, x.shape
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype)
        return out.reshape(*x.shape[:-1], source.out_features)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        dropped, low, lora_a, lora_b, mask, *tensors = ctx.saved_tensors
        scaling, source = ctx.scaling, ctx.source
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        grad = grad.reshape(-1, source.out_features).to(low.dtype)
        grad_low = grad @ lora_b
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[3]:  # (lowᵀ·g)ᵀ: oneDNN and MKL run this operand order faster than gᵀ·low
            grad_b = (low.t() @ grad).t().mul_(scaling).to(b_dtype)
        if ctx.needs_input_grad[2]:
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
        return (grad_x, None, grad_a, grad_b, *(None for _ in range(6)), *(None for _ in tensors))


def _base_rows(
    base: Any, x: torch.Tensor, compute: torch.dtype, autocast: bool
) -> tuple[RowSource, tuple[torch.Tensor, ...], int] | None:
    """The frozen base layer as a row source in ``compute`` (source, its tensors, rows per slice), if it is
    one. The fused output is in ``compute`` too: under autocast its dtype, as a linear layer's (bitsandbytes
    casts a 4-bit layer's back to x's dtype); outside it x's own (the dtype checks here)."""
    state = getattr(base.weight, "quant_state", None)  # a bitsandbytes 4-bit weight (Params4bit)
    if state is not None:  # bitsandbytes computes in its compute_dtype (autocast's, under autocast)
        from wronai.kernels.bnb import chunkable, four_bit_rows

        if not autocast and (getattr(base, "compute_dtype", None) or x.dtype) != x.dtype:
            return None
        kept = getattr(base, "dequantized", None)  # a kernels.dequantized.DequantizedLinear4bit
        weight = kept(compute) if kept is not None else None
        if weight is not None:
            return DenseRows(*weight.shape), (weight,), weight.shape[0]
        if not chunkable(state):
            return None
        source, tensors = four_bit_rows(base.weight.data, state)
        chunk = getattr(base, "chunk_bytes", 0)  # a kernels.bnb.RowSlicedLinear4bit
        return source, tensors, slice_rows(source, chunk, compute)
    if (
        type(base) is torch.nn.Linear
        and (autocast or base.weight.dtype == x.dtype)
        and not base.weight.requires_grad
    ):
        out_features, in_features = base.weight.shape
        return DenseRows(out_features, in_features), (base.weight,), out_features
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
    source, tensors, rows = found
    if lora_a.shape[1:] != (source.in_features,) or lora_b.shape[:1] != (source.out_features,):
        return None  # parameters held in pieces (ZeRO-3, FSDP) or an unexpected layout
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    scaling = float(layer.scaling[name])
    return _LoraLinear.apply(
        x, _in_compute(x, compute), lora_a, lora_b, bias, source, rows, scaling, p, compute, *tensors
    )


def _in_compute(x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """x cast to ``compute`` (no gradient: the fused step returns x's), made once per tensor and kept on it:
    q, k and v read the same hidden states, gate and up the same normed input, so a layer casts them once
    instead of three and two times (and keeps one copy for the backward instead of several). A tensor changed
    in place since is cast again."""
    if x.dtype == compute:
        return x.detach()
    key = (x._version, compute)
    kept = getattr(x, "_wronai_in_compute", None)
    if kept is not None and kept[0] == key:
        return kept[1]
    with torch.no_grad():
        cast = x.detach().to(compute)
    x._wronai_in_compute = (key, cast)  # type: ignore[attr-defined]
    return cast


class _Fused:
    """The fused forward, mixed into PEFT's LoRA layer classes (PEFT's own wherever it would differ)."""

    stock: type  # the PEFT class this one was swapped in for
    fused_calls: int = 0  # calls that took the fused step (what the plan says is what runs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = None if args or kwargs else _fused_call(self, x)
        if out is None:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        self.fused_calls += 1
        return out


class FusedLoraLinear(_Fused, PeftLoraLinear):
    """PEFT's ``lora.Linear`` computed by ``_LoraLinear``."""

    stock = PeftLoraLinear


SWAPS: dict[type, type] = {PeftLoraLinear: FusedLoraLinear}
try:  # PEFT defines its bitsandbytes layers only when bitsandbytes is installed
    from peft.tuners.lora.bnb import Linear4bit as PeftLora4bit

    class FusedLora4bit(_Fused, PeftLora4bit):
        """PEFT's ``lora.bnb.Linear4bit`` computed by ``_LoraLinear``."""

        stock = PeftLora4bit

    SWAPS[PeftLora4bit] = FusedLora4bit
except ImportError:
    pass


def stock_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """PEFT's own forward of a (possibly swapped) LoRA layer."""
    return getattr(type(layer), "stock", type(layer)).forward(layer, x)


def _self_check(layer: Any, autocast: torch.dtype | None) -> str | None:
    """Fused vs PEFT's forward on the first swapped layer: output and gradients (input, A, B) on a sample
    input in the adapter's dtype, dropout off, under the run's autocast. None when they agree; else why not."""
    name = layer.active_adapters[0] if layer.active_adapters else None
    if name is None or name not in layer.lora_A:
        return "no active adapter"
    params = (layer.lora_A[name].weight, layer.lora_B[name].weight)
    dropout = layer.lora_dropout[name]
    was_training = dropout.training
    generator = torch.Generator().manual_seed(0)
    try:
        dropout.eval()
        device = params[0].device.type
        with (
            torch.random.fork_rng(devices=[]),
            torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None),
        ):
            x = torch.randn(2, 3, layer.in_features, generator=generator, dtype=params[0].dtype)
            x = x.to(params[0].device).requires_grad_(True)
            fused = _fused_call(layer, x)
            if fused is None:
                return "the fused step declines this layer (dtypes or layout differ from PEFT's)"
            reference = stock_forward(layer, x)
            grad = torch.randn(reference.shape, generator=generator).to(reference.device, reference.dtype)
            ours = torch.autograd.grad(fused, (x, *params), grad.to(fused.dtype), allow_unused=True)
            theirs = torch.autograd.grad(reference, (x, *params), grad, allow_unused=True)
    finally:
        dropout.train(was_training)
    tol = 1e-4 if autocast is None and fused.dtype == torch.float32 else 3e-2
    pairs = [("output", fused, reference), *zip(("input grad", "A grad", "B grad"), ours, theirs)]
    for what, a, b in pairs:
        if a is None or b is None or not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
            return f"{what} differs from PEFT's"
    return None


def fuse_lora_layers(
    model: torch.nn.Module, *, check: bool = True, autocast: torch.dtype | None = None
) -> int:
    """Swap the fused subclasses in for PEFT's LoRA linear layers (dense and 4-bit bases).

    Returns how many layers were swapped (0 when the start-up check against PEFT's forward failed: then
    every layer is PEFT's again, with a note). Their parameters and saved adapters stay PEFT's.
    ``autocast``: the run's mixed-precision dtype (None = none), under which the check runs.
    """
    if not peft_version_supported():
        logger.warning(
            "LoRA: fused layers off — PEFT %s is outside the versions they were checked with %s; using PEFT's modules",
            peft.__version__,
            TESTED,
        )
        return 0
    swapped = [m for m in model.modules() if type(m) in SWAPS]
    for module in swapped:
        module.__class__ = SWAPS[type(module)]
    problem = _self_check(swapped[0], autocast) if swapped and check else None
    if problem is not None:
        unfuse_lora_layers(model)
        logger.warning("LoRA: fused layers off — %s; using PEFT's modules (hardware.fused_lora)", problem)
        return 0
    if swapped:
        logger.info(
            "LoRA: %d layers compute base and adapter in one fused step (hardware.fused_lora)", len(swapped)
        )
    return len(swapped)


def unfuse_lora_layers(model: torch.nn.Module) -> int:
    """PEFT's own classes back for every fused layer; returns how many."""
    return restore_stock(model, _Fused)


def fused_call_count(model: torch.nn.Module) -> int:
    """Calls that took the fused step so far, over all layers."""
    return sum(m.fused_calls for m in model.modules() if isinstance(m, _Fused))
