"""Causal attention over every example of a packed batch in one compiled call, forward and backward (CPU).

Per-example attention (``wronai.model.attention``) runs PyTorch's CPU flash attention once per example and
layer. On the short examples instruction data is made of that kernel is slow: it cuts each example into
32-query blocks with a BLAS call per block, 25-40 GFLOP/s on examples of ~100 tokens against a matmul peak
of ~190 (fp32, 2 cores), and its backward is 2.5x its forward. ``native/attention.c`` takes all examples
of a layer in one call: one task per (example, kv head) on PyTorch's own OpenMP threads (or threads of its
own where PyTorch does not run libgomp), register-blocked products that skip the causally masked blocks, a
vectorized exp, q/k/v/out/dq read and written at their strides (no split, cat or transpose copies), and
the probabilities kept for the backward when they take at most ``KEEP_PROBS_FACTOR`` times the queries'
memory (else recomputed from the log-sum-exp). A real batch of the speed benchmark (1472 tokens, 12
examples, 6 heads of 64, GQA 2): forward + backward 8.9 ms against 21.7 ms by sdpa per example; a
training step 1.15x (fp32) and 1.2x (bf16 autocast) faster (docs/benchmarks.md).

Numbers are float32 throughout; the softmax's exp has ~1e-7 relative error. Before first use
``attention_kernel`` checks forward and backward against per-example sdpa on random data (plain examples,
a shared prompt start, grouped queries); a kernel that disagrees is not used.

``hardware.native_attention`` (auto = CPU runs, where a C compiler is found) switches it on;
``wronai.kernels.native`` builds it (about half a second, once per machine and WronAI version).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from wronai.kernels.native import NativeBuildError, NativeKernel, load

logger = logging.getLogger(__name__)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
# q, k, v, out, lse (each a pointer and its strides), H, KH, D, scale, examples, E, probs, poffs, threads
_FORWARD_ARGS: list[Any] = [_P] * 10 + [_I64, _I64, _I64, ctypes.c_float, _P, _I64, _P, _P, ctypes.c_int]
# the same, with dout, dq, dk, dv (and their strides) after lse
_BACKWARD_ARGS: list[Any] = [_P] * 18 + [_I64, _I64, _I64, ctypes.c_float, _P, _I64, _P, _P, ctypes.c_int]
# P is kept for the backward when it takes at most this many times the queries' memory (else recomputed)
KEEP_PROBS_FACTOR = 4
# the self-check's tolerance: float32 sums in another order than sdpa's
CHECK_TOLERANCE = 2e-4


def _strides(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


FIELDS = 5  # int64 values per example in the kernel's table


def examples_tensor(
    lengths: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int] | None]
) -> torch.Tensor:
    """The kernel's example table: per example (row, start, own length, visible row prefix, shared), shared
    being how many of its first tokens other examples see as their prefix (the first example of a row laid
    out with a shared prompt start; their key/value gradients are summed across examples).

    ``lengths``: per row, its examples' lengths (they cover the row); ``prefixes``: per row, each example's
    first position id (an example starting above 0 continues the row's first tokens), or None."""
    table: list[int] = []
    for row, (sizes, firsts) in enumerate(zip(lengths, prefixes, strict=True)):
        start = 0
        for i, size in enumerate(sizes):
            prefix = int(firsts[i]) if firsts and i > 0 else 0
            shared = max(int(p) for p in firsts) if firsts and i == 0 else 0
            table += [row, start, int(size), prefix, shared]
            start += int(size)
    return torch.tensor(table, dtype=torch.int64)


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the kernel computes this call: float32 CPU tensors (batch, heads, positions, dim), dim a
    multiple of 16, queries and keys over the same positions, whole groups of query heads."""
    return (
        query.device.type == "cpu"
        and query.dtype == key.dtype == value.dtype == torch.float32
        and query.dim() == 4
        and query.shape[-1] % 16 == 0
        and query.shape[2] == key.shape[2] == value.shape[2]
        and key.shape[1] == value.shape[1]
        and query.shape[1] % key.shape[1] == 0
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def kept_probs_layout(examples: torch.Tensor, heads: int, limit: int) -> torch.Tensor | None:
    """Where each (example, head) block of probabilities starts in one buffer (``examples`` × ``heads``
    offsets, then the total), or None when they would take more than ``limit`` floats: the backward then
    recomputes them. A block is the example's queries × its visible keys rounded up to 16."""
    table = examples.view(-1, FIELDS)
    own, prefix = table[:, 2], table[:, 3]
    sizes = (own * ((prefix + own + 15) // 16 * 16)).repeat_interleave(heads)
    if int(sizes.sum()) > limit:
        return None
    return torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])


def _forward(kernel: NativeKernel, q, k, v, examples: torch.Tensor, scale: float, keep: bool = False):
    """(out, lse, kept probabilities or None, their offsets or None)."""
    batch, heads, length, dim = q.shape
    out = torch.empty(batch, length, heads, dim, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(batch, heads, length, dtype=torch.float32)
    offsets = kept_probs_layout(examples, heads, KEEP_PROBS_FACTOR * q.numel()) if keep else None
    probs = torch.empty(int(offsets[-1])) if offsets is not None else None
    code = kernel.library.wronai_attention_forward(
        _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v), _ptr(out), _strides(out),
        _ptr(lse), _strides(lse), heads, k.shape[1], dim, scale, _ptr(examples), examples.numel() // FIELDS,
        _ptr_or_null(probs), _ptr_or_null(offsets), torch.get_num_threads(),
    )  # fmt: skip
    if code:
        raise MemoryError("native attention: out of memory for its work buffers")
    return out, lse, probs, offsets


def _ptr_or_null(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, q, k, v, examples, scale):  # noqa: ANN001, ANN205
        out, lse, probs, offsets = _forward(kernel, q, k, v, examples, scale, keep=True)
        ctx.save_for_backward(q, k, v, out, lse, examples, probs, offsets)
        ctx.kernel, ctx.scale = kernel, scale
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        q, k, v, out, lse, examples, probs, offsets = ctx.saved_tensors
        grad = _last_dim_contiguous(grad)
        batch, heads, length, dim = q.shape
        kv = k.shape[1]
        dq = torch.empty(batch, length, heads, dim).transpose(1, 2)
        dk = torch.zeros(batch, length, kv, dim).transpose(1, 2)
        dv = torch.zeros(batch, length, kv, dim).transpose(1, 2)
        code = ctx.kernel.library.wronai_attention_backward(
            _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v), _ptr(out), _strides(out),
            _ptr(lse), _strides(lse), _ptr(grad), _strides(grad), _ptr(dq), _strides(dq), _ptr(dk), _strides(dk),
            _ptr(dv), _strides(dv), heads, kv, dim, ctx.scale, _ptr(examples), examples.numel() // FIELDS,
            _ptr_or_null(probs), _ptr_or_null(offsets), torch.get_num_threads(),
        )  # fmt: skip
        if code:
            raise MemoryError("native attention: out of memory for its work buffers")
        return None, dq, dk, dv, None, None


def attention(
    kernel: NativeKernel,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    examples: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of every example in ``examples`` (``examples_tensor``); q (batch, heads, positions,
    dim), k and v (batch, kv heads, positions, dim). Returns (batch, positions, heads, dim), contiguous —
    the layout the output projection reads. ``examples`` must cover every row exactly (``ValueError``
    otherwise: the kernel reads and writes where the table points)."""
    check_table(examples, query.shape[0], query.shape[2])
    q, k, v = (_last_dim_contiguous(t) for t in (query, key, value))
    scale = float(scale if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out = _Attention.apply(kernel, q, k, v, examples, scale)
    else:
        out = _forward(kernel, q, k, v, examples, scale)[0]
    return out.transpose(1, 2)


def check_table(examples: torch.Tensor, batch: int, length: int) -> None:
    """Every row of ``batch`` rows of ``length`` positions covered by its examples' own tokens, in order,
    exactly once; a prefix only of the row's first example's tokens (``ValueError`` otherwise)."""
    flat = examples.tolist()
    ends = [0] * batch
    for i in range(0, len(flat), FIELDS):
        row, start, own, prefix, shared = flat[i : i + FIELDS]
        if not (0 <= row < batch and start == ends[row] and own > 0 and 0 <= prefix <= start and shared >= 0):
            raise ValueError(
                f"attention: example {i // FIELDS} {flat[i : i + FIELDS]} does not fit the batch"
            )
        ends[row] = start + own
    if ends != [length] * batch:
        raise ValueError(f"attention: the examples cover {ends} positions of rows of {length}")


def reference(query, key, value, lengths, prefixes, scale=None) -> torch.Tensor:  # noqa: ANN001
    """The same attention by PyTorch's sdpa, one example at a time (the self-check's reference)."""
    import torch.nn.functional as F

    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, sizes in enumerate(lengths):
        firsts = prefixes[b] or [0] * len(sizes)
        pieces, start = [], 0
        for size, first in zip(sizes, firsts, strict=True):
            own = slice(start, start + size)
            if first and start:
                q = query[b, :, own]
                k = torch.cat([key[b, :, :first], key[b, :, own]], 1)
                v = torch.cat([value[b, :, :first], value[b, :, own]], 1)
                out = F.scaled_dot_product_attention(
                    torch.cat([query[b, :, :first], q], 1)[None], k[None], v[None], is_causal=True,
                    scale=scale, enable_gqa=gqa,
                )[0, :, first:]  # fmt: skip
            else:
                q, k, v = query[b, :, own], key[b, :, own], value[b, :, own]
                out = F.scaled_dot_product_attention(
                    q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=gqa
                )[0]
            pieces.append(out)
            start += size
        rows.append(torch.cat(pieces, 1))
    return torch.stack(rows).transpose(1, 2)


def self_check(kernel: NativeKernel) -> float:
    """Largest difference of the kernel's output and q/k/v gradients from ``reference`` on random data:
    two rows (one with a shared prompt start), grouped queries, lengths that are and are not multiples of
    the kernel's blocks."""
    gen = torch.Generator().manual_seed(0)
    lengths = [[37, 5, 70, 16], [80, 1, 47]]
    prefixes: list[list[int] | None] = [
        None,
        [0, 9, 9],
    ]  # row 1: examples 2 and 3 continue its first 9 tokens
    worst = 0.0
    for heads, kv, dim in ((4, 2, 32), (2, 2, 64)):
        q = torch.randn(2, 128, heads, dim, generator=gen).transpose(1, 2).requires_grad_()
        k = torch.randn(2, 128, kv, dim, generator=gen).transpose(1, 2).requires_grad_()
        v = torch.randn(2, 128, kv, dim, generator=gen).transpose(1, 2).requires_grad_()
        grad = torch.randn(2, 128, heads, dim, generator=gen)
        got = attention(kernel, q, k, v, examples_tensor(lengths, prefixes))
        grads = torch.autograd.grad(got, (q, k, v), grad)
        want = reference(q, k, v, lengths, prefixes)
        wanted = torch.autograd.grad(want, (q, k, v), grad)
        for a, b in zip((got, *grads), (want, *wanted), strict=True):
            worst = max(worst, float(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).detach()))
    return worst


def torch_runs_libgomp() -> bool:
    """Whether PyTorch's threads are GNU OpenMP's, loaded as ``libgomp.so.1`` (pip's Linux wheels): a kernel
    built with ``-fopenmp`` then links to that same loaded library and runs its tasks on PyTorch's threads.
    Elsewhere (Intel or LLVM OpenMP, macOS) the kernel starts its own threads."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in maps)
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def attention_kernel() -> NativeKernel:
    """The compiled kernel, built (or found in the cache), loaded and checked once per process; raises
    ``NativeBuildError`` with the reason when it cannot be used."""
    library, built = load("attention", openmp=torch_runs_libgomp())
    library.wronai_attention_forward.argtypes = _FORWARD_ARGS
    library.wronai_attention_forward.restype = ctypes.c_int
    library.wronai_attention_backward.argtypes = _BACKWARD_ARGS
    library.wronai_attention_backward.restype = ctypes.c_int
    kernel = NativeKernel(library, built)
    with torch.autocast("cpu", enabled=False):
        error = self_check(kernel)
    if not error <= CHECK_TOLERANCE:
        raise NativeBuildError(
            f"the compiled attention kernel differs from sdpa by {error:.1e} (relative) on the self-check"
        )
    return kernel
