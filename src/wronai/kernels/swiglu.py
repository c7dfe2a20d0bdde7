"""SwiGLU's activation, ``silu(gate) · up``, by one compiled pass forward and one backward (CPU).

A Llama MLP is ``down(act(gate(x)) · up(x))`` with a SiLU. PyTorch computes the middle as ``silu`` and
``mul`` forward and ``mul``, ``mul`` and ``silu_backward`` backward, each a pass over a positions ×
intermediate tensor — the model's largest activations — and keeps three of them for the backward (silu's
input and output, and ``up``). ``native/swiglu.c`` reads each input once and writes each output once, all
intermediates in float32 registers, and keeps two. On the speed benchmark's MLP (1472 positions × 1024,
2-core AMD EPYC with AVX512-BF16) forward + backward take 1.3 ms against 2.0–3.5 ms by PyTorch, in bf16 and
float32 alike (docs/benchmarks.md).

Numbers: float32 results equal PyTorch's to ~1e-6 (the exp is a polynomial with ~2e-7 relative error);
bf16 results are rounded once (PyTorch rounds silu's output and then the product). ``swiglu_kernel``
checks the kernel against PyTorch's operations (both dtypes, forward and both gradients) before first use.

``fuse_swiglu`` swaps ``FusedSwiGLU`` subclasses in for every MLP whose class forward is the bytecode of
transformers' ``LlamaMLP.forward`` (Mistral's, Qwen2/3's, … are the same code) with a SiLU activation: in
place, so parameters, state dict and saved adapters are unchanged; they show in ``print(model)`` and are
still instances of their class. A call takes the stock forward where gate and up differ in dtype or shape,
are not float32/bf16 CPU tensors, or where the kernel is unavailable. ``hardware.native_swiglu`` (auto =
CPU runs where a C compiler builds the kernel).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import torch

from wronai.kernels.native import NativeBuildError, NativeKernel, load
from wronai.kernels.swap import restore_stock, same_code, swapped_class

logger = logging.getLogger(__name__)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
# the self-check's tolerance (relative to the largest value): float32 sums in another order, and bf16 rounded
# once instead of twice (half a bf16 ulp)
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


def usable(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the kernel computes ``silu(gate) · up``: CPU tensors of one shape and dtype, float32 or bf16."""
    return (
        gate.device.type == up.device.type == "cpu"
        and gate.dtype == up.dtype
        and gate.dtype in (torch.float32, torch.bfloat16)
        and gate.shape == up.shape
    )


def _call_forward(kernel: NativeKernel, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    code = kernel.library.wronai_swiglu_forward(
        gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), gate.dtype == torch.bfloat16,
        torch.get_num_threads(),
    )  # fmt: skip
    if code:
        raise MemoryError("native SwiGLU: out of memory for its threads")
    return out


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) · up`` for contiguous gate and up of one dtype; gradients in that dtype."""

    @staticmethod
    def forward(ctx: Any, kernel: NativeKernel, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        ctx.kernel = kernel
        return _call_forward(kernel, gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        grad = grad.to(gate.dtype).contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        code = ctx.kernel.library.wronai_swiglu_backward(
            gate.data_ptr(), up.data_ptr(), grad.data_ptr(), dgate.data_ptr(), dup.data_ptr(), gate.numel(),
            gate.dtype == torch.bfloat16, torch.get_num_threads(),
        )  # fmt: skip
        if code:
            raise MemoryError("native SwiGLU: out of memory for its threads")
        return None, dgate, dup


def swiglu(kernel: NativeKernel, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) · up`` by the kernel (``usable(gate, up)`` must hold); autograd as PyTorch's."""
    gate, up = gate.contiguous(), up.contiguous()
    with torch.autocast("cpu", enabled=False):  # the dtypes are the inputs' (autocast leaves silu and mul so)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return _SwiGLU.apply(kernel, gate, up)
        return _call_forward(kernel, gate, up)


def self_check(kernel: NativeKernel) -> dict[torch.dtype, float]:
    """Per dtype, the largest difference of the kernel's output and gradients from PyTorch's ``silu`` and
    ``mul``, relative to the largest value: sizes below and above the kernel's parallel threshold and chunk,
    values up to ±40 (where exp overflows a float32 in a naive sigmoid)."""
    gen = torch.Generator().manual_seed(0)
    worst: dict[torch.dtype, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        worst[dtype] = 0.0
        for n in (5, 4099, 70001):
            gate = (torch.randn(n, generator=gen) * 4).to(dtype)
            gate[:3] = torch.tensor([-40.0, 40.0, 0.0])
            up = torch.randn(n, generator=gen).to(dtype)
            grad = torch.randn(n, generator=gen).to(dtype)
            ours = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
            theirs = [gate.float().requires_grad_(), up.float().requires_grad_()]
            got = swiglu(kernel, *ours)
            want = torch.nn.functional.silu(theirs[0]) * theirs[1]
            got_grads = torch.autograd.grad(got, ours, grad)
            want_grads = torch.autograd.grad(want, theirs, grad.float())
            for a, b in zip((got, *got_grads), (want, *want_grads), strict=True):
                if a.dtype != dtype:
                    return {dtype: float("inf")}
                error = (a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)
                worst[dtype] = max(worst[dtype], float(error.detach()))
    return worst


@functools.lru_cache(maxsize=1)
def swiglu_kernel() -> NativeKernel:
    """The compiled kernel, built (or found in the cache), loaded and checked once per process; raises
    ``NativeBuildError`` with the reason when it cannot be used."""
    from wronai.kernels.cpu_attention import torch_runs_libgomp

    library, built = load("swiglu", openmp=torch_runs_libgomp())
    library.wronai_swiglu_forward.argtypes = [_P, _P, _P, _I64, _INT, _INT]
    library.wronai_swiglu_forward.restype = _INT
    library.wronai_swiglu_backward.argtypes = [_P, _P, _P, _P, _P, _I64, _INT, _INT]
    library.wronai_swiglu_backward.restype = _INT
    kernel = NativeKernel(library, built)
    for dtype, error in self_check(kernel).items():
        if not error <= CHECK_TOLERANCE[dtype]:
            raise NativeBuildError(
                f"the compiled SwiGLU kernel differs from PyTorch's silu and mul by {error:.1e} (relative, "
                f"{str(dtype).removeprefix('torch.')}) on the self-check"
            )
    return kernel


def _llama_forward_code() -> Any:
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP.forward.__code__


def _is_silu(act: Any) -> bool:
    from transformers.activations import SiLUActivation

    return type(act) in (torch.nn.SiLU, SiLUActivation) and not getattr(act, "inplace", False)


def is_llama_mlp(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes transformers' LlamaMLP with a SiLU: its class forward is that code (a
    fused MLP's forward is ``FusedSwiGLU``'s, so it never counts twice)."""
    code = getattr(getattr(type(module), "forward", None), "__code__", None)
    return (
        code is not None
        and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
        and _is_silu(getattr(module, "act_fn", None))
        and same_code(code, _llama_forward_code())
    )


class FusedSwiGLU(torch.nn.Module):
    """The MLP forward with the activation by the compiled kernel, mixed into a transformers MLP class (its
    own forward wherever the kernel does not apply)."""

    stock: type[torch.nn.Module]  # the class this one was swapped in for
    fused_calls: int = 0
    # the stock MLP's modules
    gate_proj: torch.nn.Module
    up_proj: torch.nn.Module
    down_proj: torch.nn.Module
    act_fn: torch.nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)  # the stock order: gate, then up (LoRA dropout draws in this order)
        up = self.up_proj(x)
        if not usable(gate, up):
            return self.down_proj(self.act_fn(gate) * up)
        self.fused_calls += 1
        return self.down_proj(swiglu(swiglu_kernel(), gate, up))  # built and checked at the swap


_FUSED_CLASSES: dict[type, type] = {}  # one fused subclass per stock class and process


def fused_class(stock: type) -> type:
    """The fused subclass of ``stock`` (made once, so that swaps made at different times share it)."""
    return swapped_class(
        _FUSED_CLASSES,
        FusedSwiGLU,
        stock,
        f"Fused{stock.__name__}",
        f"transformers' {stock.__name__} with its SiLU · up by WronAI's compiled kernel.",
    )


def fuse_swiglu(model: torch.nn.Module, setting: str = "auto") -> int:
    """Swap fused subclasses in for the model's Llama-style MLPs; returns how many. ``setting``
    (hardware.native_swiglu as the plan resolved it, auto | on): the kernel is built and checked here;
    when it cannot be, auto keeps every MLP stock (with a note) and on stops the run."""
    from wronai.kernels.native import kernel_ready

    mlps = [m for m in model.modules() if is_llama_mlp(m)]
    if not mlps:
        return 0
    kernel = kernel_ready(setting, "native_swiglu", swiglu_kernel, "SwiGLU", "PyTorch's silu and mul")
    if kernel is None:
        return 0
    for module in mlps:
        module.__class__ = fused_class(type(module))
    logger.info(
        "SwiGLU: %d MLPs compute silu(gate) · up by the compiled kernel (hardware.native_swiglu)", len(mlps)
    )
    return len(mlps)


def unfuse_swiglu(model: torch.nn.Module) -> int:
    """Every fused MLP back to its own class; returns how many."""
    return restore_stock(model, FusedSwiGLU)


def fused_swiglu_calls(model: torch.nn.Module) -> int:
    """Calls that took the kernel so far, over all MLPs."""
    return sum(m.fused_calls for m in model.modules() if isinstance(m, FusedSwiGLU))
