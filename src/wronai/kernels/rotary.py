"""Rotary position embedding (RoPE) in one autograd function: fewer passes over memory than transformers'.

transformers' ``apply_rotary_pos_emb`` (Llama's, and the same code in Mistral, Qwen2/3, Granite, …) is

    q' = q·cos + rotate_half(q)·sin,   rotate_half(x) = cat(−x[…, d/2:], x[…, :d/2])      (and k' alike)

as six operations per tensor — two slices, a negation, a concatenation, two products and a sum — and
autograd runs their backwards (the slices' backwards fill a zero tensor of the whole size each). On a CPU
every one is a pass over memory. ``_Rotary`` gives the same numbers from one product and two in-place
half-width ``addcmul`` per tensor, forward and backward alike:

    forward   q'[:h] = q[:h]·cos[:h] − q[h:]·sin[:h];   q'[h:] = q[h:]·cos[h:] + q[:h]·sin[h:]
    backward  dq[:h] = g[:h]·cos[:h] + g[h:]·sin[h:];   dq[h:] = g[h:]·cos[h:] − g[:h]·sin[:h]

Forward + backward of one layer's q and k (3 × 512 positions, 6 and 3 heads of 64, float32, AVX2): 4.1 ms
→ 1.8 ms, ~14 ms of a ~600 ms step of the speed benchmark; outputs and gradients equal to ~5e-7.

The function is a module-level name that transformers' attention forward looks up in its module's
globals; there is no module to swap for it. ``fuse_rotary`` swaps, for each attention class whose forward
calls an ``apply_rotary_pos_emb`` with the bytecode of Llama's, a subclass whose ``forward`` is the stock
forward's own code object (no source copied) bound to a copy of its module's globals in which
``apply_rotary_pos_emb`` is ours — nothing is patched process-wide, the swapped modules show in
``print(model)`` and are still instances of their class. Decorators around the forward (transformers'
``deprecate_kwarg``) are rebuilt around the new function. Before swapping, the fused function is checked
against the module's own on a sample in float32 (and in the run's autocast dtype); a call takes the stock
function wherever its inputs are not the standard layout (a partial rotary dimension, other unsqueeze
dimensions, a cos/sin that needs a gradient). ``hardware.fused_rotary`` (auto = CPU runs).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import torch

from wronai.kernels.swap import restore_stock

logger = logging.getLogger(__name__)

ROTARY_NAME = "apply_rotary_pos_emb"  # the module-level function transformers' attention forwards call


class _Rotary(torch.autograd.Function):
    """``x·cos + rotate_half(x)·sin`` for q and k of shape (batch, heads, positions, d), cos and sin of
    shape (batch or 1, positions, d); the output in the promoted dtype (as transformers'), gradients in the
    inputs' dtypes."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):  # type: ignore[override]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = cos.shape[-1] // 2
        outs = []
        for x in (q, k):
            out = torch.mul(x, cos)
            out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
            out[..., half:].addcmul_(x[..., :half], sin[..., half:])
            outs.append(out)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return outs[0], outs[1]

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor | None, grad_k: torch.Tensor | None):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        half = cos.shape[-1] // 2
        grads: list[torch.Tensor | None] = []
        for grad, dtype, needed in zip((grad_q, grad_k), ctx.dtypes, ctx.needs_input_grad[:2], strict=True):
            if grad is None or not needed:
                grads.append(None)
                continue
            out = torch.mul(grad, cos)
            out[..., :half].addcmul_(grad[..., half:], sin[..., half:])
            out[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
            grads.append(out.to(dtype))
        return grads[0], grads[1], None, None


def standard_layout(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int) -> bool:
    """Whether ``_Rotary`` computes exactly what Llama's function does for these inputs."""
    tensors = (q, k, cos, sin)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or unsqueeze_dim != 1:
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    d = cos.shape[-1]
    return (
        d % 2 == 0
        and q.shape[-1] == k.shape[-1] == d
        and q.shape[0] == k.shape[0]
        and q.shape[2] == k.shape[2] == cos.shape[1]
        and cos.shape[0] in (1, q.shape[0])
        and not (cos.requires_grad or sin.requires_grad)
        and len({t.device for t in tensors}) == 1
    )


def fused_rotary_function(stock: Callable[..., Any]) -> Callable[..., Any]:
    """Llama's ``apply_rotary_pos_emb`` signature, computed by ``_Rotary``; ``stock`` where the layout differs.
    ``.fused_calls`` counts the calls that took the fused step."""

    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> Any:
        if not standard_layout(q, k, cos, sin, unsqueeze_dim):
            return stock(q, k, cos, sin, unsqueeze_dim)
        apply_rotary_pos_emb.fused_calls += 1  # type: ignore[attr-defined]
        return _Rotary.apply(q, k, cos, sin)

    apply_rotary_pos_emb.fused_calls = 0  # type: ignore[attr-defined]
    apply_rotary_pos_emb.stock = stock  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _code_key(fn: Any) -> tuple | None:
    code = getattr(fn, "__code__", None)
    return None if code is None else (code.co_code, code.co_consts, code.co_names)


def is_llama_rotary(fn: Any) -> bool:
    """Whether ``fn`` is Llama's ``apply_rotary_pos_emb`` (the same bytecode), and the ``rotate_half`` it
    calls is Llama's too."""
    from transformers.models.llama import modeling_llama as llama

    if _code_key(fn) != _code_key(llama.apply_rotary_pos_emb):
        return False
    return _code_key(fn.__globals__.get("rotate_half")) == _code_key(llama.rotate_half)


def _wrapper_chain(forward: Any) -> list[Any] | None:
    """``forward`` and the functions it wraps (``__wrapped__``), outermost first; None where a wrapper does
    not hold the next function in a closure cell (it could not be rebuilt around a new one)."""
    chain = [forward]
    while hasattr(chain[-1], "__wrapped__"):
        inner = chain[-1].__wrapped__
        cells = chain[-1].__closure__ or ()
        if not isinstance(chain[-1], types.FunctionType) or not any(_cell_holds(c, inner) for c in cells):
            return None
        chain.append(inner)
    return chain if isinstance(chain[-1], types.FunctionType) else None


def _cell_holds(cell: Any, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _rebuilt(fn: types.FunctionType, globals_: dict[str, Any], closure: tuple | None) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return new


def fused_forward(forward: Any) -> Any | None:
    """The attention ``forward`` with our ``apply_rotary_pos_emb`` in its globals, its decorators rebuilt
    around it; None where it does not call Llama's function through its module's globals."""
    chain = _wrapper_chain(forward)
    if chain is None:
        return None
    inner = chain[-1]
    stock = inner.__globals__.get(ROTARY_NAME)
    if ROTARY_NAME not in inner.__code__.co_names or not is_llama_rotary(stock):
        return None
    globals_ = dict(inner.__globals__)
    globals_[ROTARY_NAME] = fused_rotary_function(stock)
    new = _rebuilt(inner, globals_, inner.__closure__)
    for wrapper, wrapped in zip(reversed(chain[:-1]), reversed(chain[1:]), strict=True):
        cells = tuple(
            types.CellType(new) if _cell_holds(c, wrapped) else c for c in wrapper.__closure__ or ()
        )
        rebuilt = _rebuilt(wrapper, wrapper.__globals__, cells)
        rebuilt.__wrapped__ = new  # type: ignore[attr-defined]
        new = rebuilt
    return new


class FusedRotaryAttention(torch.nn.Module):
    """Marks an attention class whose forward computes RoPE with ``_Rotary`` (``stock``: its own class)."""

    stock: type[torch.nn.Module]


_FUSED_CLASSES: dict[type, type | None] = {}  # one subclass per stock class and process (None: cannot)


def fused_class(stock: type) -> type | None:
    """The subclass of attention class ``stock`` whose forward uses ``_Rotary`` (made once), or None."""
    if stock not in _FUSED_CLASSES:
        forward = fused_forward(getattr(stock, "forward", None))
        _FUSED_CLASSES[stock] = (
            None
            if forward is None
            else type(
                f"RotaryFused{stock.__name__}",
                (FusedRotaryAttention, stock),
                {
                    "forward": forward,
                    "stock": stock,
                    "__module__": __name__,
                    "__doc__": f"transformers' {stock.__name__} with RoPE computed by _Rotary.",
                },
            )
        )
    return _FUSED_CLASSES[stock]


def rotary_function(module: torch.nn.Module) -> Any:
    """The ``apply_rotary_pos_emb`` a (swapped) attention module's forward calls."""
    chain = _wrapper_chain(type(module).forward)
    return None if chain is None else chain[-1].__globals__.get(ROTARY_NAME)


def _self_check(fused: Any, head_dim: int, autocast: torch.dtype | None) -> str | None:
    """``fused`` against the stock function it wraps: outputs and the gradients of q and k, on a sample in
    float32 and (under autocast) with q and k in the autocast dtype. None when they agree."""
    generator = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, *([autocast] if autocast not in (None, torch.float32) else [])]
    for dtype in dtypes:
        q = torch.randn(2, 3, 5, head_dim, generator=generator).to(dtype).requires_grad_(True)
        k = torch.randn(2, 1, 5, head_dim, generator=generator).to(dtype).requires_grad_(True)
        cos, sin = torch.randn(2, 2, 5, head_dim, generator=generator).unbind(0)
        ours = fused(q, k, cos, sin)
        theirs = fused.stock(q, k, cos, sin)
        grads = [torch.randn(t.shape, generator=generator).to(t.dtype) for t in theirs]
        ours_grads = torch.autograd.grad(ours, (q, k), grads)
        their_grads = torch.autograd.grad(theirs, (q, k), grads)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        pairs = [*zip(("q", "k"), ours, theirs), *zip(("q grad", "k grad"), ours_grads, their_grads)]
        for what, a, b in pairs:
            if a.dtype != b.dtype or not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
                return f"{what} ({str(dtype).removeprefix('torch.')}) differs from transformers'"
    return None


def fuse_rotary(model: torch.nn.Module, *, autocast: torch.dtype | None = None) -> int:
    """Swap the fused subclasses in for the model's attention modules that compute Llama's RoPE; returns
    how many (0 when the start-up check failed: then every module is its own class again, with a note)."""
    found = [(m, fused_class(type(m))) for m in model.modules() if not isinstance(m, FusedRotaryAttention)]
    swaps = [(m, cls) for m, cls in found if cls is not None]
    if not swaps:
        return 0
    checked: set[type] = set()
    for module, cls in swaps:
        module.__class__ = cls
        if cls in checked:
            continue
        checked.add(cls)
        head_dim = int(getattr(module, "head_dim", 0) or 0)
        fused = rotary_function(module)
        problem = "no head_dim on the attention module" if head_dim < 2 or head_dim % 2 else None
        problem = problem or _self_check(fused, head_dim, autocast)
        if problem is not None:
            unfuse_rotary(model)
            logger.warning("RoPE: fused rotary embedding off — %s (hardware.fused_rotary)", problem)
            return 0
    logger.info(
        "RoPE: %d attention layers compute the rotary embedding in one fused step (hardware.fused_rotary)",
        len(swaps),
    )
    return len(swaps)


def unfuse_rotary(model: torch.nn.Module) -> int:
    """Every swapped attention module back to its own class; returns how many."""
    return restore_stock(model, FusedRotaryAttention)


def fused_rotary_calls(model: torch.nn.Module) -> int:
    """Calls that took the fused step so far, over the model's swapped attention classes (counted per class
    in this process, for every model of it: take differences)."""
    functions = {
        id(f): f for m in model.modules() if isinstance(m, FusedRotaryAttention) if (f := rotary_function(m))
    }
    return sum(getattr(f, "fused_calls", 0) for f in functions.values())
