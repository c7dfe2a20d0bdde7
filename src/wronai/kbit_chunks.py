"""Frozen linear layers computed from row slices of their weight, never the whole weight at once.

bitsandbytes computes a 4-bit layer on a CPU by dequantizing the whole weight to the compute dtype and
multiplying — in the forward and again in the backward (for the input's gradient). On a 1B model the
largest weight (5632 × 2048) is 46 MB in float32, held next to everything else at the training peak, and a
7B model's is 235 MB. ``row_sliced_linear`` gives the same product from row slices that a source builds one
at a time: ``FourBitRows`` dequantizes them (the packed 4-bit codes of rows ``[r0, r1)`` are the contiguous
bytes ``[r0·K/2, r1·K/2)`` and their scales the blocks ``[r0·K/b, r1·K/b)`` when the row length K is a
multiple of the block size b — true of every public model —, so each slice dequantizes on its own to
exactly what the whole-weight dequantization gives for those rows); ``DenseRows`` casts a weight held in full
(the kept 16-bit output head, ``wronai.kbit``; a non-quantized base layer, ``wronai.lora_fused``). Nothing
but the stored weight is kept for backward. ``wronai.lora_fused`` computes LoRA layers from the same sources.

``chunk_4bit_layers`` switches a model's 4-bit layers to it (``quantization.dequantize_chunk_mib``; CPU runs,
where bitsandbytes has no fused kernel for training).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseRows:
    """Rows of a frozen weight held in full, ``tensors = (weight,)``, cast to the compute dtype (a 16-bit
    weight is upcast; one already in it is a view)."""

    out_features: int
    in_features: int

    def rows(
        self, tensors: tuple[torch.Tensor, ...], start: int, stop: int, dtype: torch.dtype
    ) -> torch.Tensor:
        return tensors[0][start:stop].to(dtype)


@dataclass(frozen=True)
class FourBitRows:
    """Rows of a frozen 4-bit weight ``tensors = (packed codes, float32 block scales)``, dequantized.

    Rows ``[r0, r1)`` are the bytes ``[r0·K/2, r1·K/2)`` of the codes and the blocks ``[r0·K/b, r1·K/b)`` of
    the scales (K = ``in_features``, a multiple of the block size b: see ``chunkable``).
    """

    out_features: int
    in_features: int
    blocksize: int
    quant_type: str

    def rows(
        self, tensors: tuple[torch.Tensor, ...], start: int, stop: int, dtype: torch.dtype
    ) -> torch.Tensor:
        packed, scales = tensors
        k = self.in_features
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            packed[start * k // 2 : stop * k // 2],
            scales[start * k // self.blocksize : stop * k // self.blocksize],
            self.blocksize,
            self.quant_type,
            [stop - start, k],
            dtype,
        )


RowSource = DenseRows | FourBitRows


def sliced_matmul(
    flat: torch.Tensor, source: RowSource, tensors: tuple[torch.Tensor, ...], rows: int
) -> torch.Tensor:
    """``flat @ W.T`` (flat: tokens × in_features) with W built ``rows`` rows at a time in flat's dtype."""
    if rows >= source.out_features:
        return flat @ source.rows(tensors, 0, source.out_features, flat.dtype).t()
    out = flat.new_empty(flat.shape[0], source.out_features)
    for start in range(0, source.out_features, rows):
        stop = min(start + rows, source.out_features)
        out[:, start:stop] = flat @ source.rows(tensors, start, stop, flat.dtype).t()
    return out


def sliced_grad_input(
    grad: torch.Tensor, source: RowSource, tensors: tuple[torch.Tensor, ...], rows: int
) -> torch.Tensor:
    """``grad @ W`` (grad: tokens × out_features) with W built ``rows`` rows at a time in grad's dtype."""
    if rows >= source.out_features:
        return grad @ source.rows(tensors, 0, source.out_features, grad.dtype)
    out = grad.new_zeros(grad.shape[0], source.in_features)
    for start in range(0, source.out_features, rows):
        stop = min(start + rows, source.out_features)
        out.addmm_(grad[:, start:stop], source.rows(tensors, start, stop, grad.dtype))
    return out


class _RowSlicedLinear(torch.autograd.Function):
    """``x @ W.T`` for a frozen W that ``source`` materializes ``rows`` rows at a time in x's dtype.

    Only the stored tensors are saved for backward (through ``save_for_backward``, so gradient
    checkpointing can drop them); the backward materializes the same slices again for ``grad @ W``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, source: Any, rows: int, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(*tensors)
        ctx.source, ctx.rows = source, rows
        out = sliced_matmul(x.reshape(-1, source.in_features), source, tensors, rows)
        return out.reshape(*x.shape[:-1], source.out_features)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        tensors, source = ctx.saved_tensors, ctx.source
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = sliced_grad_input(grad.reshape(-1, source.out_features), source, tensors, ctx.rows)
            grad_x = grad_x.reshape(*grad.shape[:-1], source.in_features)
        return (grad_x, None, None, *(None for _ in tensors))


def slice_rows(source: RowSource, chunk_bytes: int, dtype: torch.dtype) -> int:
    """Rows per slice so that one slice in ``dtype`` takes at most ``chunk_bytes`` (0 = the whole weight)."""
    if not chunk_bytes:
        return source.out_features
    return max(1, min(source.out_features, chunk_bytes // (source.in_features * dtype.itemsize)))


def row_sliced_linear(
    x: torch.Tensor,
    source: RowSource,
    tensors: tuple[torch.Tensor, ...],
    chunk_bytes: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A frozen linear layer whose weight ``source`` builds ``chunk_bytes`` (in x's dtype) of rows at a time."""
    out = _RowSlicedLinear.apply(x, source, slice_rows(source, chunk_bytes, x.dtype), *tensors)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


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


def four_bit_rows(packed: torch.Tensor, state: Any) -> tuple[FourBitRows, tuple[torch.Tensor, ...]]:
    """The row source of a (``chunkable``) 4-bit weight and its tensors: flat packed codes, float32 scales."""
    rows_out, cols = state.shape
    source = FourBitRows(rows_out, cols, state.blocksize, state.quant_type)
    return source, (packed.reshape(-1), block_scales(state))


def chunked_4bit_linear(
    x: torch.Tensor, packed: torch.Tensor, state: Any, chunk_bytes: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A frozen 4-bit linear layer, its weight dequantized ``chunk_bytes`` (in x's dtype) of rows at a time."""
    source, tensors = four_bit_rows(packed, state)
    return row_sliced_linear(x, source, tensors, chunk_bytes, bias)


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
