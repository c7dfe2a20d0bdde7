"""4-bit layers that keep their weight dequantized for the whole run (``quantization.keep_dequantized_mib``).

bitsandbytes computes a 4-bit layer on a CPU by dequantizing its whole weight to the compute dtype in every
forward and again in every backward (for the input's gradient), and undoing the double quantization of the
block scales each time: on the speed benchmark's model (6 layers, hidden 384; 2-core AMX-BF16 Xeon) that
is 81 dequantizations a step. When all the 4-bit weights of a model, dequantized, take little memory — a
small model's do: 19 MiB in bf16 for that one —, ``DequantizedLinear4bit`` dequantizes each once and keeps
it: the same numbers (it is the same dequantization), ~7% less time per step there (652 vs 696 ms,
alternating every 2 steps in one run).

The 4-bit codes stay the layer's weight: ``state_dict``, saving, merging and export see bitsandbytes'
``Params4bit`` as before; the kept copy is a plain attribute, rebuilt whenever the codes, the dtype or the
device change (a merge re-quantizes the codes; ``model.to`` moves them). ``keep_dequantized_layers`` swaps
the class in for every 4-bit layer of a model, or for none when they would take more than the budget.
``wronai.kernels.fused_lora`` computes a LoRA layer over such a base from the kept weight. At the swap the
first layer's kept weight is checked against bitsandbytes' own ``dequantize_4bit``: on a mismatch every layer
goes back to bitsandbytes' class, with one warning.
"""

from __future__ import annotations

import logging
from typing import Any

import bitsandbytes as _bnb
import torch

from wronai.kernels.bnb import chunkable, four_bit_rows
from wronai.kernels.row_slices import DenseRows, row_sliced_linear

logger = logging.getLogger(__name__)


class DequantizedLinear4bit(_bnb.nn.Linear4bit):
    """A ``Linear4bit`` that dequantizes its weight once per dtype and device and keeps it.

    Swapped in with ``from_linear4bit`` (in place: PEFT's LoRA layer and the weight's ``module`` keep pointing
    at it). bitsandbytes' own forward runs wherever the kept weight cannot stand for it (not on a CPU, a
    weight in the packed format or of another layout).
    """

    _kept: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @classmethod
    def from_linear4bit(cls, module: Any) -> DequantizedLinear4bit:
        module.__class__ = cls
        module._kept = None
        return module

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The weight dequantized to ``dtype`` (kept; made on the first call and whenever the codes, the dtype
        or the device changed); None where it does not dequantize on its own (``kernels.bnb.chunkable``)."""
        state = getattr(self.weight, "quant_state", None)
        codes = self.weight.data
        key = (codes.data_ptr(), codes._version, codes.device, dtype, id(state))
        if self._kept is not None and self._kept[0] == key:  # every call but the first: nothing else checked
            return self._kept[1]
        if state is None or not chunkable(state):
            return None
        source, tensors = four_bit_rows(codes, state)
        with torch.no_grad():
            self._kept = (key, source.rows(tensors, 0, source.out_features, dtype))
        return self._kept[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute_dtype or x.dtype
        weight = self.dequantized(compute) if x.device.type == "cpu" else None
        if weight is None:
            return super().forward(x)
        out_features, in_features = weight.shape
        out = row_sliced_linear(x.to(compute), DenseRows(out_features, in_features), (weight,), 0, self.bias)
        return out.to(x.dtype)  # bitsandbytes' output dtype: the input's

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight kept dequantized"


def dequantized_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes the model's 4-bit layers take dequantized to ``dtype``."""
    states = [
        getattr(m.weight, "quant_state", None) for m in model.modules() if isinstance(m, _bnb.nn.Linear4bit)
    ]
    return sum(s.shape.numel() * dtype.itemsize for s in states if s is not None)


def keep_dequantized_layers(model: torch.nn.Module, budget_bytes: int, dtype: torch.dtype) -> int:
    """Swap ``DequantizedLinear4bit`` in for every 4-bit layer when all of them, dequantized to ``dtype``, take
    at most ``budget_bytes``; returns how many were swapped (0: over the budget, or a weight that does not
    dequantize on its own — then every layer stays bitsandbytes' and is computed as before)."""
    layers = [m for m in model.modules() if type(m) is _bnb.nn.Linear4bit]
    states = [getattr(m.weight, "quant_state", None) for m in layers]
    if not layers or not budget_bytes or any(s is None or not chunkable(s) for s in states):
        return 0
    total = dequantized_bytes(model, dtype)  # every 4-bit layer, kept or sliced ones too
    if total > budget_bytes:
        logger.info(
            "4-bit: weights dequantized per call (%.0f MiB dequantized > quantization.keep_dequantized_mib %g)",
            total / 2**20,
            budget_bytes / 2**20,
        )
        return 0
    for module in layers:
        DequantizedLinear4bit.from_linear4bit(module)
    problem = _self_check(layers[0], dtype)
    if problem is not None:
        for module in layers:
            module.__class__ = _bnb.nn.Linear4bit
            module.__dict__.pop("_kept", None)
        logger.warning(
            "4-bit: weights not kept dequantized — %s (quantization.keep_dequantized_mib)", problem
        )
        return 0
    logger.info(
        "4-bit: %d layers keep their weights dequantized (%.1f MiB in %s; quantization.keep_dequantized_mib)",
        len(layers),
        total / 2**20,
        str(dtype).removeprefix("torch."),
    )
    return len(layers)


def _self_check(module: Any, dtype: torch.dtype) -> str | None:
    """The kept weight of ``module`` against bitsandbytes' own dequantization of it (None: they agree)."""
    import bitsandbytes.functional as bnbf

    ours = module.dequantized(dtype)
    if ours is None:
        return "the weight does not dequantize on its own"
    theirs = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    if ours.shape != theirs.shape or not torch.allclose(ours.float(), theirs.float(), rtol=tol, atol=tol):
        return "the kept weight differs from bitsandbytes' dequantization"
    return None
