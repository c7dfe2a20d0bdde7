"""bitsandbytes internals, in one place: 4-bit row sources, the row-sliced layer, the packed CPU format.

**The packed CPU format.** On CPUs with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` rewrites
its weight and quant state *in place* into a packed inference layout the first time it runs in eval mode on
an input that needs no grad (read from the instance flag ``support_avx512bf16_for_cpu``). Nothing converts
back on ``train()``: packed weights then go through ``gemv_4bit``, which has no autograd kernel, so the
gradient through the frozen base is silently dropped; ``state_dict()`` unpacks by re-quantizing from
bf16-rounded scales. WronAI's one rule:

- every 4-bit model WronAI loads starts with the flag off (``forbid_packed_format``): a model that is being
  trained never enters the format — evaluation during training included — and what is saved, merged or
  exported is never read from a packed weight;
- inference commands (``wronai eval/generate/chat``) turn it on (``allow_checked_packed_format``) only for
  layers whose shape the conversion takes (out_features % 32, in_features % 64) and only after the packed
  kernel's output on a sample input matched the dequantized reference.

**Row sources.** ``FourBitRows`` dequantizes rows ``[r0, r1)`` of a 4-bit weight on their own (see
``wronai.kernels.row_slices``); ``RowSlicedLinear4bit`` is the ``Linear4bit`` subclass swapped in for layers
that compute that way (``quantization.dequantize_chunk_mib``).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import bitsandbytes as _bnb
import torch

from wronai.kernels.row_slices import row_sliced_linear

logger = logging.getLogger(__name__)

# the range this module was written and checked against (quant-state fields, the packed format, the ops)
TESTED = ((0, 45), (1, 0))
PACK_BLOCK_N = 32  # rows per block of the packed layout (bitsandbytes' block_n)
PACK_MIN_K = 64


@functools.lru_cache(maxsize=1)
def version() -> tuple[int, int]:
    major, minor = (int(p) if p.isdigit() else 0 for p in _bnb.__version__.split(".")[:2])
    return major, minor


def version_supported() -> bool:
    """WronAI's kernels reach into quant-state fields of these versions only; outside, the stock path runs."""
    low, high = TESTED
    return low <= version() < high


def native_avx512bf16() -> str:
    """What bitsandbytes' native library says of this CPU ("yes"/"no"), plus which packed kernel it has."""
    import bitsandbytes.functional as bnbf

    if not bnbf.has_avx512bf16():
        return "no"
    try:
        from bitsandbytes.backends.cpu import ops
    except ImportError:
        return "yes"
    fetched = getattr(ops, "gemm_4bit_forward_kernel", None) is not None
    return "yes (" + ("kernels-community gemm" if fetched else "built-in gemv kernel") + ")"


# ------------------------------------------------------------------------------------------ row sources


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


def block_scales(state: Any) -> torch.Tensor:
    """The float32 scale of every block of a 4-bit weight (double quantization undone)."""
    import bitsandbytes.functional as bnbf

    if not state.nested:
        return state.absmax.float()
    return (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def is_packed(state: Any) -> bool:
    """The weight is in bitsandbytes' packed CPU inference format."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def chunkable(state: Any) -> bool:
    """Row slices of this weight dequantize on their own: 2-D, rows a whole number of blocks, not packed."""
    shape = getattr(state, "shape", None)
    return (
        shape is not None
        and len(shape) == 2
        and shape[1] % state.blocksize == 0
        and state.quant_type in ("nf4", "fp4")
        and not is_packed(state)
        and version_supported()
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


# --------------------------------------------------------------------------------- the row-sliced layer


class RowSlicedLinear4bit(_bnb.nn.Linear4bit):
    """A ``Linear4bit`` whose weight is dequantized ``chunk_bytes`` of rows at a time in its matmuls.

    Swapped in with ``from_linear4bit`` (in place: PEFT's LoRA layer and the weight's ``module`` keep
    pointing at it); bitsandbytes' own forward runs wherever the sliced one cannot (not on a CPU, a weight
    that does not slice).
    """

    chunk_bytes: int = 0

    @classmethod
    def from_linear4bit(cls, module: Any, chunk_bytes: int) -> RowSlicedLinear4bit:
        module.__class__ = cls
        module.chunk_bytes = chunk_bytes
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = getattr(self.weight, "quant_state", None)  # a Params4bit's
        if x.device.type != "cpu" or state is None or not chunkable(state):
            return super().forward(x)
        compute = self.compute_dtype or x.dtype
        out = chunked_4bit_linear(x.to(compute), self.weight.data, state, self.chunk_bytes, self.bias)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows of {self.chunk_bytes / 2**20:g} MiB at a time"


def chunk_4bit_layers(model: torch.nn.Module, chunk_bytes: int) -> int:
    """Swap ``RowSlicedLinear4bit`` in for the 4-bit layers whose dequantized weight exceeds ``chunk_bytes``.

    Returns how many layers were swapped. Layers that fit in one chunk stay bitsandbytes' ``Linear4bit``.
    """
    if not version_supported():
        logger.info("bitsandbytes %d.%d is outside %s: 4-bit weights dequantize whole", *version(), TESTED)
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is not _bnb.nn.Linear4bit:
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is None or not chunkable(state):
            continue
        dtype = module.compute_dtype or torch.float32
        if state.shape[0] * state.shape[1] * dtype.itemsize <= chunk_bytes:
            continue
        RowSlicedLinear4bit.from_linear4bit(module, chunk_bytes)
        swapped += 1
    if swapped:
        logger.info(
            "4-bit: %d layers dequantize %.0f MiB of weight rows at a time (quantization.dequantize_chunk_mib)",
            swapped,
            chunk_bytes / 2**20,
        )
    return swapped


# -------------------------------------------------------------------------------- the packed CPU format


def four_bit_layers(model: torch.nn.Module) -> list[Any]:
    return [m for m in model.modules() if isinstance(m, _bnb.nn.Linear4bit)]


def packed_layers(model: torch.nn.Module) -> list[str]:
    """Names of the 4-bit layers whose weight is in the packed CPU format."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, _bnb.nn.Linear4bit) and is_packed(getattr(m.weight, "quant_state", None))
    ]


def forbid_packed_format(model: torch.nn.Module) -> int:
    """Keep every 4-bit layer out of the packed CPU format (the state a model is trained in); returns how many
    layers there are. A layer already packed is converted back (bitsandbytes' inverse)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    layers = four_bit_layers(model)
    for module in layers:
        module.support_avx512bf16_for_cpu = False
        state: Any = getattr(module.weight, "quant_state", None)
        if is_packed(state):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
    return len(layers)


def packable(module: Any) -> bool:
    """The conversion takes this layer's shape (rows in blocks of 32, row length a multiple of 64)."""
    state = getattr(module.weight, "quant_state", None)
    if state is None or is_packed(state) or len(getattr(state, "shape", ())) != 2:
        return False
    n, k = state.shape
    return n % PACK_BLOCK_N == 0 and k % max(PACK_MIN_K, state.blocksize) == 0


def packed_matches_reference(module: Any, tolerance: float = 2e-2) -> str | None:
    """Run the packed kernel on a copy of this layer's weight and compare with the dequantized reference.

    Returns None when they agree (relative error of the output below ``tolerance``: the kernel computes in
    bf16), else why not. The layer itself is not changed.
    """
    import bitsandbytes.functional as bnbf

    state = module.weight.quant_state
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, state.shape[1], generator=generator)
    with torch.no_grad():
        reference = x @ bnbf.dequantize_4bit(module.weight.data, state).float().t()
        try:
            packed, packed_state = bnbf._convert_weight_packed_for_cpu(
                module.weight.data.clone(), copy.copy(state)
            )
            out = _bnb.matmul_4bit(x, packed, quant_state=packed_state).float()
        except Exception as err:  # the kernel missing or failing on this CPU: the stock path stays
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if out.shape != reference.shape:
        return f"output shape {tuple(out.shape)} instead of {tuple(reference.shape)}"
    error = float((out - reference).norm() / reference.norm().clamp_min(1e-12))
    if not error < tolerance:  # NaN fails too
        return f"relative error {error:.2g} against the dequantized weight"
    return None


def allow_checked_packed_format(model: torch.nn.Module) -> str:
    """For inference only: let bitsandbytes pack the layers whose shape allows it, once the packed kernel's
    output matched the dequantized reference for each distinct shape. Returns one line saying what was done."""
    import bitsandbytes.functional as bnbf

    layers = four_bit_layers(model)
    if not layers:
        return ""
    if not bnbf.has_avx512bf16():
        return "4-bit: bitsandbytes' packed CPU format not available on this CPU — dequantizing kernels"
    checked: dict[tuple[Any, ...], str | None] = {}
    chosen = []
    for module in layers:
        if not packable(module):
            continue
        state = module.weight.quant_state
        key = (*state.shape, state.blocksize, state.quant_type)
        if key not in checked:
            checked[key] = packed_matches_reference(module)
        if checked[key] is None:
            chosen.append(module)
    failed = [why for why in checked.values() if why is not None]
    for module in chosen:
        module.support_avx512bf16_for_cpu = True
    line = f"4-bit: {len(chosen)} of {len(layers)} layers use bitsandbytes' packed CPU kernel"
    if failed:
        line += (
            f" (a shape failed its check against the dequantized weight: {failed[0]}; those stay unpacked)"
        )
    elif len(chosen) < len(layers):
        line += " (the others' shapes do not pack)"
    return line


# Layers built for timing (runtime.autotune): the shapes of a model's projections, no checkpoint needed
_NF4_BLOCK = 64  # NF4 block size
_NESTED_BLOCK = 256  # block size of the double-quantized block scales


def synthetic_linear4bit(in_features: int, out_features: int, generator: torch.Generator) -> Any:
    """An NF4, double-quantized ``Linear4bit`` (float32 compute) out of packed-format reach, with random
    weights; a large one is a few quantized rows repeated (quantizing a whole 11008 × 4096 matrix takes
    seconds), which dequantizes as the repeated rows (runtime.autotune times layers built this way)."""
    layer = _bnb.nn.Linear4bit(
        in_features, out_features, bias=False, quant_type="nf4", compress_statistics=True, device="meta"
    )
    layer.compute_dtype, layer.compute_type_is_set = torch.float32, True
    # rows whose scales fill whole blocks of the double quantization: repeating them keeps the blocks aligned
    rows = out_features
    if in_features % _NF4_BLOCK == 0:
        rows = min(
            out_features, _NF4_BLOCK * _NESTED_BLOCK // math.gcd(in_features, _NF4_BLOCK * _NESTED_BLOCK)
        )
    template = torch.randn(rows, in_features, generator=generator).mul_(0.02)
    weight: Any = _bnb.nn.Params4bit(
        template, requires_grad=False, quant_type="nf4", compress_statistics=True, module=layer
    )
    weight = weight.to("cpu")  # quantizes
    layer.weight = _repeated_4bit(weight, out_features, layer) if rows < out_features else weight
    forbid_packed_format(layer)
    return layer


def _repeated_4bit(weight: Any, out_features: int, module: Any) -> Any:
    """A 4-bit weight of ``out_features`` rows: the codes and block scales of ``weight``'s rows repeated."""
    from bitsandbytes.functional import QuantState

    state = weight.quant_state
    rows, in_features = state.shape
    repeats = -(-out_features // rows)
    blocks = out_features * in_features // state.blocksize
    inner = state.state2
    nested = QuantState(
        absmax=inner.absmax.repeat(repeats)[: -(-blocks // inner.blocksize)],
        code=inner.code,
        blocksize=inner.blocksize,
        dtype=inner.dtype,
    )
    full = QuantState(
        absmax=state.absmax.repeat(repeats)[:blocks],
        shape=torch.Size([out_features, in_features]),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
        offset=state.offset,
        state2=nested,
    )
    codes = weight.data.reshape(-1).repeat(repeats)[: out_features * in_features // 2].reshape(-1, 1)
    return _bnb.nn.Params4bit(
        codes,
        requires_grad=False,
        quant_state=full,
        blocksize=state.blocksize,
        compress_statistics=True,
        quant_type=state.quant_type,
        module=module,
        bnb_quantized=True,
    )


def set_row_slices(base: Any, chunk_bytes: int, dtype: torch.dtype, rows: int) -> int:
    """A 4-bit base as ``wronai.model.lora`` leaves it (for a layer that may be sliced already): compute dtype, and row slices when the model's weight
    (``rows`` rows) in that dtype exceeds ``chunk_bytes`` (``chunk_4bit_layers``' rule); 1 when
    sliced."""
    base.compute_dtype, base.compute_type_is_set = dtype, True
    base.__class__ = _bnb.nn.Linear4bit
    base.__dict__.pop("chunk_bytes", None)
    base.__dict__.pop("_kept", None)  # a kernels.dequantized.DequantizedLinear4bit's
    state = base.weight.quant_state
    if chunk_bytes and chunkable(state) and rows * state.shape[1] * dtype.itemsize > chunk_bytes:
        RowSlicedLinear4bit.from_linear4bit(base, chunk_bytes)
        return 1
    return 0
