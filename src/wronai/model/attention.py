"""Attention for packed rows: each example attends only to itself, at the cost of its own length.

A packed row holds several examples. transformers isolates them by building a block-diagonal causal mask
from the position ids, but sdpa then still computes (and on CPU, with a dense mask, cannot skip) attention
over the whole row: a row of 512 tokens holding five examples of ~100 costs 512² instead of 5·100².

``packed_sdpa`` is registered with transformers' ``AttentionInterface`` under the name ``wronai_packed_sdpa``;
``native_packed_attention`` (``wronai_native_attention``) is the same with every example of a layer computed by
WronAI's compiled CPU kernel in one call (``wronai.kernels.cpu_attention``, ``hardware.native_attention``) where
it applies (float32 on the CPU, as all CPU attention here is, no dropout, head dim a multiple of 16).
When the batch carries the example lengths it runs causal sdpa on every example separately; without them
(generation, padded evaluation batches, models that do not forward the keyword arguments) it is plain sdpa
with transformers' own mask, so results never depend on which path ran. ``PackedCollator(with_boundaries=True)``
adds them; ``enable_packed_attention(model)`` switches an sdpa model over.

On a CPU, attention that sdpa would run in bf16/fp16 (half-precision queries, or CPU autocast) is computed
in fp32 and handed back in that dtype, on both paths: faster there, and without the per-length kernel
caches that bf16 leaves in the C heap (``cpu_half_attention``). A bf16/fp16 CPU run therefore switches to
``wronai_packed_sdpa`` even without packing. Other devices run exactly transformers' sdpa.

The lengths arrive as plain Python lists (``wronai_example_lengths``: per row, the lengths of the examples
it holds), computed once per batch by the collator on the CPU, so no attention call reads a GPU tensor back
to the host (a ``.tolist()`` of a CUDA tensor waits for the GPU: once per layer per step). The collator also
adds ``cu_seq_lens_q``/``cu_seq_lens_k`` (the boundaries as transformers' variable-length flash-attention
keyword arguments, counted over the flattened batch); ``packed_sdpa`` reads those only when they are on the
CPU and the lengths are missing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from wronai.errors import WronAIError

logger = logging.getLogger(__name__)

PACKED_SDPA = "wronai_packed_sdpa"
NATIVE_ATTENTION = "wronai_native_attention"
# per row, the lengths of the examples it holds: Python ints, from the collator
LENGTHS_KWARG = "wronai_example_lengths"
# per row, each example's first position id: an example starting above 0 continues the row's first tokens,
# a prompt start shared with the row's first example and computed only there (wronai.data.prefix)
PREFIX_KWARG = "wronai_example_prefixes"


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    native: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal sdpa per example when the boundaries are given; transformers' sdpa otherwise. ``native``:
    the examples by the compiled kernel where it applies.

    On a CPU, bf16/fp16 attention is computed in fp32 (see ``cpu_half_attention``).
    """
    half = cpu_half_attention(query)
    if half is None:
        return _attend(module, query, key, value, attention_mask, dropout, scaling, native, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, _ = _attend(
            module,
            query.float(),
            key.float(),
            value.float(),
            attention_mask,
            dropout,
            scaling,
            native,
            **kwargs,
        )
    return out.to(half), None


# ``packed_sdpa`` with the examples computed by WronAI's compiled kernel (``wronai_native_attention``)
native_packed_attention = functools.partial(packed_sdpa, native=True)


def cpu_half_attention(query: torch.Tensor) -> torch.dtype | None:
    """The half-precision dtype sdpa would run ``query`` in on a CPU (its own, or CPU autocast's), else None.

    WronAI computes such attention in fp32 and returns it in that dtype. Two measurements on a 2-core Xeon
    with AMX-BF16 (torch 2.13, the speed benchmark's model, 6 heads of 64): bf16 flash attention forward +
    backward is 2-4x slower than fp32 for examples under ~300 tokens (100 tokens: 4.5 vs 1.2 ms) and equal
    at 512; and every new sequence length leaves oneDNN kernels and their buffers cached in the C heap
    (500 lengths: ~1 GB in bf16, ~0 in fp32), so per-example attention over packed rows, whose lengths all
    differ, grew RSS by ~25 MB per step. Casting q, k and v (a few MiB per layer) costs far less than either.
    """
    if query.device.type != "cpu":
        return None
    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    if torch.is_autocast_enabled("cpu"):  # RoPE hands sdpa fp32 queries; CPU autocast would cast them
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype in (torch.bfloat16, torch.float16) else None
    return None


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    native: bool,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    per_row = kwargs.get(LENGTHS_KWARG)
    bounds = kwargs.get("cu_seq_lens_q")
    if per_row is None and isinstance(bounds, torch.Tensor) and bounds.device.type == "cpu":
        per_row = example_lengths(bounds, query.shape[0], query.shape[2])  # a CPU tensor: no device sync
    starts = kwargs.get(PREFIX_KWARG) or [None] * query.shape[0]
    if per_row is None or query.shape[2] != key.shape[2] or kwargs.get("output_attentions"):
        if any(any(row or ()) for row in starts):
            raise WronAIError(
                "attention: a batch laid out with a shared prefix reached attention that cannot read it "
                "(per-example attention needs the example lengths, no KV cache and no attention weights "
                "returned) — set hardware.shared_prefix: off"
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    for lengths, first in zip(per_row, starts, strict=True):
        if first and any(first):
            _check_prefix_row(lengths, first)
    p = dropout if module.training else 0.0
    if native and not p and _native_applies(query, key, value, kwargs):
        from wronai.kernels import cpu_attention

        examples = cpu_attention.examples_tensor(per_row, starts)
        return cpu_attention.attention(
            cpu_attention.attention_kernel(), query, key, value, examples, scaling
        ), None
    gqa = query.shape[1] != key.shape[1]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), dropout_p=p,
            is_causal=True, scale=scaling, enable_gqa=gqa,
        )  # fmt: skip

    rows = []
    for q, k, v, lengths, first in zip(
        query.unbind(0), key.unbind(0), value.unbind(0), per_row, starts, strict=True
    ):
        if first and any(first):
            rows.append(_sharing_prefix(attend, q, k, v, lengths, first))
            continue
        # split/unbind (not slicing): their backward writes each gradient once, where a slice's backward
        # fills a zero tensor of the whole row per example
        pieces = [
            attend(qe, ke, ve)
            for qe, ke, ve in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True)
        ]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _sharing_prefix(
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: list[int],
    first: list[int],
) -> torch.Tensor:
    """One row's attention (q, k, v: heads × positions × dim) where examples starting at position p > 0
    continue the row's first p tokens: each attends causally to those and to itself, as the whole example
    would; the outputs for the prefix rows come from the first example only."""
    prefix = max(first)
    sizes = [prefix, lengths[0] - prefix, *lengths[1:]]
    qs, ks, vs = q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1)
    pieces = [attend(torch.cat(qs[:2], 1), torch.cat(ks[:2], 1), torch.cat(vs[:2], 1))]
    for j, start in enumerate(first[1:], 2):
        if start:
            out = attend(
                torch.cat([qs[0], qs[j]], 1), torch.cat([ks[0], ks[j]], 1), torch.cat([vs[0], vs[j]], 1)
            )
            pieces.append(out[:, :, prefix:])
        else:
            pieces.append(attend(qs[j], ks[j], vs[j]))
    return torch.cat(pieces, dim=2)


def _check_prefix_row(lengths: list[int], first: list[int]) -> None:
    """A row whose examples continue its first tokens is one WronAI's collator builds: the first example
    holds the prefix, every other one continues all of it or none."""
    prefix = max(first)
    if first[0] != 0 or lengths[0] <= prefix or any(p not in (0, prefix) for p in first):
        raise WronAIError(
            f"attention: a row's examples continue different prefixes (first positions {first}) — WronAI's "
            "collator never builds such rows; set hardware.shared_prefix: off"
        )


def _native_applies(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict[str, Any]
) -> bool:
    """The compiled kernel computes plain causal attention: not a sliding window, soft-capped scores or
    attention sinks (those models keep sdpa), and only the shapes and dtypes it takes."""
    from wronai.kernels.cpu_attention import usable

    special = any(kwargs.get(name) is not None for name in ("sliding_window", "softcap", "s_aux"))
    return not special and usable(query, key, value)


def example_lengths(bounds: torch.Tensor | list[int], batch: int, length: int) -> list[list[int]]:
    """Per row, the lengths of the examples it holds, from boundaries over the flattened batch.

    An example that crosses a row end (never made by WronAI's packer) is cut at the row end. Reads
    ``bounds`` back to the host: call it once per batch on CPU boundaries (the collator does).
    """
    total = batch * length
    values = bounds.tolist() if isinstance(bounds, torch.Tensor) else list(bounds)
    cuts = sorted({*(int(x) for x in values if 0 <= int(x) <= total), *range(0, total + 1, length)})
    rows: list[list[int]] = [[] for _ in range(batch)]
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        rows[start // length].append(end - start)
    return rows


def register_packed_attention() -> None:
    """Make ``wronai_packed_sdpa`` and ``wronai_native_attention`` known to transformers (idempotent; masks
    are built as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, function in ((PACKED_SDPA, packed_sdpa), (NATIVE_ATTENTION, native_packed_attention)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)


def enable_packed_attention(model: Any, native: str = "off") -> bool:
    """Switch a model that uses sdpa to per-example attention; returns whether it did.

    ``native`` (hardware.native_attention as the plan resolved it): auto/on = the examples by the compiled
    kernel, built and checked here; auto falls back to sdpa per example with a note when it cannot be,
    on stops the run. Other implementations are left alone: flash-attention already reads example
    boundaries from the position ids (variable-length kernels) and eager is what the user asked for
    explicitly.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in (
        "sdpa",
        PACKED_SDPA,
        NATIVE_ATTENTION,
    ):
        return False
    register_packed_attention()
    name = NATIVE_ATTENTION if native != "off" and _native_kernel_ready(native) else PACKED_SDPA
    try:
        base.set_attn_implementation(name)
    except (ValueError, AttributeError) as err:  # an architecture that cannot switch at run time keeps sdpa
        logger.info(
            "per-example attention not available for %s (%s) — packed rows use sdpa with a mask",
            type(base).__name__,
            err,
        )
        return False
    if getattr(config, "_attn_implementation", None) != name:
        return False
    how = (
        "compiled kernel, all examples of a layer in one call"
        if name == NATIVE_ATTENTION
        else "sdpa per example"
    )
    logger.info("attention: %s (packed rows: %s; fp32 math on a CPU)", name, how)
    return True


def _native_kernel_ready(setting: str) -> bool:
    """Build, load and check the compiled kernel; False (auto, with a note) or an error (on) if it fails."""
    from wronai.kernels import cpu_attention
    from wronai.kernels.native import kernel_ready

    kernel = kernel_ready(
        setting, "native_attention", cpu_attention.attention_kernel, "attention", "PyTorch's sdpa per example"
    )
    return kernel is not None


def sequence_boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """Start offsets of every example in the flattened batch, plus the total length (``cu_seq_lens``).

    An example starts at every row start and wherever the position id does not continue by one.
    """
    batch, length = position_ids.shape
    flat = position_ids.reshape(-1)
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = flat[1:] != flat[:-1] + 1
    new[::length] = True
    starts = new.nonzero().flatten()
    return torch.cat([starts, torch.tensor([batch * length])]).to(torch.int32)
