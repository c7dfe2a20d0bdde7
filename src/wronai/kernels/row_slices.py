"""Frozen linear layers computed from row slices of their weight, never the whole weight at once.

bitsandbytes computes a 4-bit layer on a CPU by dequantizing the whole weight to the compute dtype and
multiplying — in the forward and again in the backward (for the input's gradient). On a 1B model the
largest weight (5632 × 2048) is 46 MB in float32, held next to everything else at the training peak, and a
7B model's is 235 MB. ``row_sliced_linear`` gives the same product from row slices that a source builds one
at a time: ``FourBitRows`` dequantizes them (the packed 4-bit codes of rows ``[r0, r1)`` are the contiguous
bytes ``[r0·K/2, r1·K/2)`` and their scales the blocks ``[r0·K/b, r1·K/b)`` when the row length K is a
multiple of the block size b — true of every public model —, so each slice dequantizes on its own to
exactly what the whole-weight dequantization gives for those rows); ``DenseRows`` casts a weight held in full
(the kept 16-bit output head, ``wronai.model.kbit``; a non-quantized base layer, ``wronai.kernels.fused_lora``). Nothing
but the stored weight is kept for backward. ``wronai.kernels.fused_lora`` computes LoRA layers from the same sources.

``wronai.kernels.bnb`` holds the 4-bit source (``FourBitRows``) and ``chunk_4bit_layers``, which swaps its
``RowSlicedLinear4bit`` in for a model's large 4-bit layers (``quantization.dequantize_chunk_mib``; CPU runs,
where bitsandbytes has no fused kernel for training).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

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


class RowSource(Protocol):
    """Builds rows ``[start, stop)`` of a frozen weight in a dtype (``DenseRows``; ``kernels.bnb.FourBitRows``)."""

    @property
    def out_features(self) -> int: ...

    @property
    def in_features(self) -> int: ...

    def rows(
        self, tensors: tuple[torch.Tensor, ...], start: int, stop: int, dtype: torch.dtype
    ) -> torch.Tensor: ...


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
    """``grad @ W`` (grad: tokens × out_features) with W built ``rows`` rows at a time in grad's dtype.

    The slices' products are summed in float32 (a 16-bit sum over slices would round at every slice:
    relative error 1e-2 instead of one matmul's 3e-3 in bf16) and the result is returned in grad's dtype.
    """
    if rows >= source.out_features:
        return grad @ source.rows(tensors, 0, source.out_features, grad.dtype)
    out = grad.new_zeros(grad.shape[0], source.in_features, dtype=torch.float32)
    for start in range(0, source.out_features, rows):
        stop = min(start + rows, source.out_features)
        weight = source.rows(tensors, start, stop, grad.dtype)
        if grad.dtype == torch.float32:
            out.addmm_(grad[:, start:stop], weight)
        else:
            out.add_(grad[:, start:stop] @ weight)
    return out.to(grad.dtype)


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
