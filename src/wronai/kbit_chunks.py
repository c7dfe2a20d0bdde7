"""4-bit linear layers that dequantize their frozen weight a slice of rows at a time.

bitsandbytes computes a 4-bit layer on a CPU by dequantizing the whole weight to the compute dtype and
multiplying — in the forward and again in the backward (for the input's gradient). On a 1B model the
largest weight (5632 × 2048) is 46 MB in float32, held next to everything else at the training peak, and a
7B model's is 235 MB. ``chunked_4bit_linear`` gives the same product from row slices of the weight: the
packed 4-bit codes of rows ``[r0, r1)`` are the contiguous bytes ``[r0·K/2, r1·K/2)`` and their scales the
blocks ``[r0·K/b, r1·K/b)`` when the row length K is a multiple of the block size b (true of every public
model), so each slice dequantizes on its own to exactly what the whole-weight dequantization gives for those
rows. Nothing but the packed weight is kept for backward.

``chunk_4bit_layers`` switches a model's 4-bit layers to it (``quantization.dequantize_chunk_mib``; CPU runs,
where bitsandbytes has no fused kernel for training).
"""

from __future__ import annotations

import logging
from types import MethodType
from typing import Any

import torch

logger = logging.getLogger(__name__)


class _Chunked4bitLinear(torch.autograd.Function):
    """``x @ W.T`` for a frozen 4-bit W given as packed codes + per-block float32 scales, in row slices."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        spec: tuple[int, int, int, str, int],
    ) -> torch.Tensor:
        rows_out, cols, _, _, rows = spec
        ctx.save_for_backward(packed, absmax)
        ctx.spec = spec
        flat = x.reshape(-1, cols)
        out = flat.new_empty(flat.shape[0], rows_out)
        for start in range(0, rows_out, rows):
            weight = _dequantize_rows(packed, absmax, spec, start, x.dtype)
            out[:, start : start + rows] = flat @ weight.t()
        return out.reshape(*x.shape[:-1], rows_out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        packed, absmax = ctx.saved_tensors
        rows_out, cols, _, _, rows = ctx.spec
        grad_x = None
        if ctx.needs_input_grad[0]:
            flat = grad.reshape(-1, rows_out)
            grad_x = flat.new_zeros(flat.shape[0], cols)
            for start in range(0, rows_out, rows):
                weight = _dequantize_rows(packed, absmax, ctx.spec, start, grad.dtype)
                grad_x.addmm_(flat[:, start : start + rows], weight)
            grad_x = grad_x.reshape(*grad.shape[:-1], cols)
        return grad_x, None, None, None


def _dequantize_rows(
    packed: torch.Tensor, absmax: torch.Tensor, spec: tuple[int, int, int, str, int], start: int, dtype
) -> torch.Tensor:
    """Rows ``[start, start + rows)`` of the weight, dequantized to ``dtype``."""
    rows_out, cols, blocksize, quant_type, rows = spec
    stop = min(start + rows, rows_out)
    codes = packed[start * cols // 2 : stop * cols // 2]
    scales = absmax[start * cols // blocksize : stop * cols // blocksize]
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        codes, scales, blocksize, quant_type, [stop - start, cols], dtype
    )


def block_scales(state: Any) -> torch.Tensor:
    """The float32 scale of every block of a 4-bit weight (double quantization undone)."""
    import bitsandbytes.functional as bnbf

    if not state.nested:
        return state.absmax.float()
    return (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def chunkable(state: Any) -> bool:
    """Row slices of this weight dequantize on their own: 2-D, rows a whole number of blocks."""
    shape = getattr(state, "shape", None)
    return (
        shape is not None
        and len(shape) == 2
        and shape[1] % state.blocksize == 0
        and state.quant_type in ("nf4", "fp4")
        and not getattr(state, "packing_format_for_cpu", False)
    )


def chunked_4bit_linear(
    x: torch.Tensor, packed: torch.Tensor, state: Any, chunk_bytes: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A frozen 4-bit linear layer, its weight dequantized ``chunk_bytes`` (in x's dtype) of rows at a time."""
    rows_out, cols = state.shape
    rows = max(1, min(rows_out, chunk_bytes // (cols * x.element_size())))
    spec = (rows_out, cols, state.blocksize, state.quant_type, rows)
    out = _Chunked4bitLinear.apply(x, packed.reshape(-1), block_scales(state), spec)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


def _chunked_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward computed by ``chunked_4bit_linear`` (bitsandbytes' own where it cannot be)."""
    state = self.weight.quant_state
    if x.device.type != "cpu" or state is None or not chunkable(state):
        return type(self).forward(self, x)
    compute = self.compute_dtype or x.dtype
    out = chunked_4bit_linear(x.to(compute), self.weight.data, state, self.wronai_chunk_bytes, self.bias)
    return out.to(x.dtype)


def chunk_4bit_layers(model: torch.nn.Module, chunk_bytes: int) -> int:
    """Make the 4-bit layers whose dequantized weight exceeds ``chunk_bytes`` dequantize in row slices.

    Returns how many layers were switched. Layers that fit in one chunk keep bitsandbytes' forward.
    """
    import bitsandbytes as bnb

    switched = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is None or not chunkable(state):
            continue
        dtype = module.compute_dtype or torch.float32
        if state.shape[0] * state.shape[1] * dtype.itemsize <= chunk_bytes:
            continue
        setattr(module, "wronai_chunk_bytes", chunk_bytes)  # noqa: B010 (read by _chunked_forward)
        module.forward = MethodType(_chunked_forward, module)  # type: ignore[method-assign]
        switched += 1
    if switched:
        logger.info(
            "4-bit: %d layers dequantize %.0f MiB of weight rows at a time (quantization.dequantize_chunk_mib)",
            switched,
            chunk_bytes / 2**20,
        )
    return switched
