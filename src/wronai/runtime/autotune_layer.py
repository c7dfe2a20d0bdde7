"""The decoder layer that ``wronai.runtime.autotune`` times: a model's seven projections, each with LoRA.

``build_layer`` makes, in-process and from the shapes of the model's config.json, the linear projections of
one decoder layer (q, k, v, o, gate, up, down) — bitsandbytes ``Linear4bit`` NF4 with double quantization
for 4-bit runs, else dense — wrapped by ``peft.get_peft_model`` with a LoRA adapter of the run's rank, so
that what is timed is what a run computes: PEFT's ``lora.Linear``/``lora.bnb.Linear4bit``, the fused
classes of ``wronai.kernels.fused_lora`` swapped in for them, bitsandbytes' ``Linear4bit`` or
``wronai.kernels.bnb.RowSlicedLinear4bit`` as the frozen base. ``TimedLayer.step_ms`` times forward and
backward (gradients for the adapter and the layer inputs, none for the frozen weights) of one candidate.

Large 4-bit weights are not quantized from a full float32 matrix (seconds for a 7B model's 11008 × 4096):
a few rows are quantized and their codes and block scales repeated to the full shape — the dequantization
and matmul cost of a 4-bit weight does not depend on its values.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerShapes:
    """The feature sizes of one decoder layer (``attention``/``kv``: heads × head_dim)."""

    hidden: int
    intermediate: int
    attention: int
    kv: int
    layers: int = 1  # decoder layers of the model (for what all its weights take)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LayerShapes | None:
        """From a config.json dict, read as `wronai plan` reads it (``memory.ModelShape``); None when it lacks
        the sizes of a decoder layer."""
        from wronai.errors import WronAIError
        from wronai.runtime.memory import ModelShape

        try:  # one layer's sizes: the layer count and vocabulary do not matter here
            shape = ModelShape.from_config({"num_hidden_layers": 1, "vocab_size": 1, **config})
        except (WronAIError, ZeroDivisionError):
            return None
        if min(shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim) <= 0:
            return None
        linears = shape.linears()
        return cls(shape.hidden, shape.intermediate, linears["q_proj"][1], linears["k_proj"][1], shape.layers)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection."""
        h, i, a, kv = self.hidden, self.intermediate, self.attention, self.kv
        return {"q_proj": (h, a), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (a, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    def largest_weight(self) -> int:
        """Elements of the largest projection weight."""
        return max(a * b for a, b in self.projections().values())

    def parameters(self) -> int:
        """Elements of all projection weights."""
        return sum(a * b for a, b in self.projections().values())

    def kept(self, dtype: torch.dtype, budget_bytes: int) -> bool:
        """The model's 4-bit weights, dequantized to ``dtype``, fit ``budget_bytes`` (``keep_dequantized_layers``' rule)."""
        return 0 < self.layers * self.parameters() * dtype.itemsize <= budget_bytes


@dataclass(frozen=True)
class Candidate:
    """One way to compute the layer: mixed precision, fused LoRA or PEFT's, row-slice size (0 = whole), and
    the budget under which the model's 4-bit weights are kept dequantized (``LayerShapes.kept``)."""

    precision: str  # bf16 | fp32
    fused_lora: bool
    chunk_bytes: int
    keep_bytes: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def label(self) -> str:
        slices = f"{size_name(self.chunk_bytes)} slices" if self.chunk_bytes else "whole weights"
        return f"{self.precision}, {'fused' if self.fused_lora else 'PEFT'} LoRA, {slices}"


def size_name(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:g} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:g} KiB"


class _Projections(torch.nn.Module):
    """The projections of one decoder layer, each fed an input of its width (attention itself not run)."""

    def __init__(self, layers: dict[str, torch.nn.Module], four_bit: bool) -> None:
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.is_loaded_in_4bit = four_bit  # what PEFT reads to wrap Linear4bit bases

    def forward(self, hidden: torch.Tensor, attention: torch.Tensor, mlp: torch.Tensor) -> list[torch.Tensor]:
        source = {"o_proj": attention, "down_proj": mlp}
        return [getattr(self, name)(source.get(name, hidden)) for name in PROJECTIONS]


def _dense(in_features: int, out_features: int, generator: torch.Generator) -> torch.nn.Linear:
    layer = torch.nn.utils.skip_init(torch.nn.Linear, in_features, out_features, bias=False)
    layer.weight.requires_grad_(False)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02, generator=generator)
    return layer


class TimedLayer:
    """The PEFT-wrapped projections of one decoder layer, configured per candidate and timed.

    ``fraction``: each projection keeps this share of its rows (output features; at least 16), for models
    whose layer step would not fit the budget whole — the input widths, and with them the per-row cost of
    the matmuls, of dequantization and of row slices, stay the model's."""

    def __init__(self, shapes: LayerShapes, four_bit: bool, lora_r: int, fraction: float = 1.0) -> None:
        from peft import LoraConfig, get_peft_model

        self.shapes, self.four_bit = shapes, four_bit
        self.generator = torch.Generator().manual_seed(0)
        from wronai.kernels.bnb import synthetic_linear4bit  # bitsandbytes: only when a layer is built

        build = synthetic_linear4bit if four_bit else _dense
        sizes = shapes.projections()
        layers = {
            name: build(i, max(min(o, 16), round(o * fraction)), self.generator)
            for name, (i, o) in sizes.items()
        }
        self.rows = {id(layers[name]): o for name, (i, o) in sizes.items()}  # the model's rows per base
        config = LoraConfig(
            r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=list(PROJECTIONS)
        )
        self.model = get_peft_model(_Projections(layers, four_bit), config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._cache: dict[tuple[Any, ...], list[torch.Tensor]] = {}  # inputs and output gradients

    def lora_layers(self) -> list[Any]:
        from wronai.kernels.fused_lora import SWAPS

        swapped = set(SWAPS.values())
        return [m for m in self.model.modules() if type(m) in SWAPS or type(m) in swapped]

    def configure(self, candidate: Candidate) -> int:
        """Set the layer up as ``candidate`` computes it; returns how many bases dequantize in row slices."""
        from wronai.kernels.bnb import set_row_slices
        from wronai.kernels.fused_lora import SWAPS, unfuse_lora_layers

        unfuse_lora_layers(self.model)
        sliced = 0
        kept = self.four_bit and self.shapes.kept(candidate.dtype, candidate.keep_bytes)
        for layer in self.lora_layers():
            base = layer.get_base_layer()
            if kept:
                from wronai.kernels.dequantized import DequantizedLinear4bit

                set_row_slices(base, 0, candidate.dtype, self.rows[id(base)])
                DequantizedLinear4bit.from_linear4bit(base)
            elif self.four_bit:
                sliced += set_row_slices(base, candidate.chunk_bytes, candidate.dtype, self.rows[id(base)])
            else:
                base.weight.data = base.weight.data.to(
                    candidate.dtype
                )  # weights dtype auto follows precision
            if candidate.fused_lora:
                layer.__class__ = SWAPS[type(layer)]
        return sliced

    def step_ms(self, candidate: Candidate, tokens: int, seconds: float) -> float:
        """Forward + backward of ``tokens`` tokens as ``candidate``: the fastest of the calls made in
        ``seconds`` (at least one; the first call of a shape also sets up its kernels)."""
        self.configure(candidate)
        inputs = self._inputs(tokens, candidate.dtype)
        times: list[float] = []
        begin = time.perf_counter()
        while not times or time.perf_counter() - begin < seconds:
            tick = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=candidate.precision == "bf16"):
                outputs = self.model(*inputs)
            torch.autograd.backward(outputs, self._grads(outputs))
            times.append(time.perf_counter() - tick)
            for tensor in (*self.params, *inputs):
                tensor.grad = None
        return 1000 * min(times)

    def _inputs(self, tokens: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """The layer inputs (hidden, attention, MLP widths), made once per size and dtype."""
        key = (tokens, dtype)
        if key not in self._cache:
            widths = (self.shapes.hidden, self.shapes.attention, self.shapes.intermediate)
            self._cache[key] = [
                torch.randn(tokens, w, generator=self.generator).to(dtype).requires_grad_(True)
                for w in widths
            ]
        return self._cache[key]

    def _grads(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        key = (outputs[0].shape[0], *(o.dtype for o in outputs))
        if key not in self._cache:
            self._cache[key] = [torch.randn(o.shape, generator=self.generator).to(o.dtype) for o in outputs]
        return self._cache[key]
