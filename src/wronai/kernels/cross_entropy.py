"""The output head and the token cross-entropy in one autograd step, a chunk of positions at a time.

The stock loss projects the trained positions onto the whole vocabulary (``logits = h·Wᵀ``, kept for the
backward), takes ``log_softmax`` (a second positions × vocabulary tensor, kept too) and, in the backward,
fills a third one with zeros for ``nll_loss``'s gradient before ``log_softmax``'s backward reads the other
two — for a 152k-token vocabulary and 4096 positions, 2.5 GB each in fp32. ``_LinearCrossEntropy`` does the
forward and the backward of that loss in the forward pass, ``rows`` positions at a time:

    logits = h·Wᵀ (+ b)  in ``compute``, then fp32       lse = max + log Σ exp(logits − max)
    loss  += Σ (lse − logits[target])                    over positions whose target is not ignored
    g      = softmax(logits) − onehot(target)  (0 for ignored positions; in place of the logits)
    dh     = g·W,  dW += gᵀ·h,  db += Σ g

and keeps only ``dh`` (positions × hidden, in ``compute``) and, when the head is trained, ``dW``/``db``; the
backward scales them by the loss's gradient. The numbers are the stock ones: the logits in the head's
dtype (autocast's under autocast) and then fp32, as ``trained_positions_loss`` computes them; gradients back
in autocast's dtype and then the input's, as autocast's linear gives them.
"""

from __future__ import annotations

from typing import Any

import torch

from wronai.kernels.row_slices import DenseRows, slice_rows, sliced_grad_input, sliced_matmul

IGNORE = -100
# fp32 logits of one chunk at most (64 MiB): the whole selection for small vocabularies, 64 rows for 152k
CHUNK_BYTES = 64 * 2**20


def chunk_rows(vocab: int) -> int:
    """Positions per chunk: a multiple of 64 (so bf16 CPU runs see few matmul shapes), at least 64."""
    return max(64, CHUNK_BYTES // (4 * vocab) // 64 * 64)


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(h·Wᵀ + b, targets) over targets != -100, with its gradients made in the forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        rows: int,
        weight_rows: int,
        compute: torch.dtype,
        grads: bool,
    ) -> torch.Tensor:
        # (needs_input_grad holds under no_grad too: ``grads`` says whether a backward can follow)
        need_h, need_w, need_b = (grads and need for need in ctx.needs_input_grad[:3])
        source = DenseRows(*weight.shape)
        with torch.autocast(hidden.device.type, enabled=False):  # explicit dtypes below
            # a whole weight is cast once (a view where it is in ``compute``), slices chunk by chunk
            whole = weight_rows >= weight.shape[0]
            tensors = (weight.to(compute) if whole else weight,)
            b = None if bias is None else bias.to(compute)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty(hidden.shape, dtype=compute, device=hidden.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = (
                torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
            )
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows].to(compute)
                target = targets[start : start + rows]
                if b is not None and whole:  # the bias inside the product, rounded once (as F.linear)
                    logits = torch.addmm(b, h, tensors[0].t())
                else:
                    logits = sliced_matmul(h, source, tensors, weight_rows)
                    if b is not None:
                        logits += b
                logits = logits.float()  # a new tensor where compute is 16-bit; else the matmul's own
                kept = target != IGNORE
                index = target.clamp(min=0).unsqueeze(1)
                picked = logits.gather(1, index).squeeze(1)
                top = logits.amax(1, keepdim=True)
                exp = logits.sub_(top).exp_()
                sums = exp.sum(1, keepdim=True)
                lse = (top + sums.log()).squeeze(1)
                total += torch.where(kept, lse - picked, 0.0).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad = exp.div_(sums)  # softmax, then minus one at the target, zero where ignored
                grad.scatter_add_(1, index, kept.unsqueeze(1).to(grad.dtype).neg())
                grad.mul_(kept.unsqueeze(1))
                low = grad.to(compute)
                if grad_h is not None:
                    grad_h[start : start + rows] = sliced_grad_input(low, source, tensors, weight_rows)
                if grad_w is not None:
                    grad_w += (low.t() @ h).float()
                if grad_b is not None:
                    grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        out = []
        for saved, dtype in ((grad_h, h_dtype), (grad_w, w_dtype), (grad_b, b_dtype)):
            out.append(None if saved is None else (saved.float() * grad).to(dtype))
        return (*out, None, None, None, None, None)


def _slice_bytes(head: Any) -> int | None:
    """Bytes of the head's weight per row slice in the fused step (0 = the whole weight), or None where it
    cannot be the head: a plain ``nn.Linear`` is used whole; a frozen head that computes from row slices of
    its weight (its class says ``slice_bytes``: ``wronai.model.kbit.UpcastLinear``, a 16-bit head computed in
    fp32) in the same slices. PEFT's wrappers, 4-bit and 8-bit layers, and weights a sharding wrapper holds
    in pieces are not heads it can compute."""
    if not isinstance(head, torch.nn.Linear) or head.weight.dim() != 2:
        return None
    if tuple(head.weight.shape) != (head.out_features, head.in_features):
        return None
    if type(head) is torch.nn.Linear:
        return 0
    chunk = getattr(type(head), "slice_bytes", None)
    if chunk is None or head.weight.requires_grad:
        return None
    return int(chunk)


def usable_head(head: Any) -> bool:
    """Whether ``linear_cross_entropy`` can compute this output head (``_slice_bytes``)."""
    return _slice_bytes(head) is not None


def linear_cross_entropy(hidden: torch.Tensor, head: Any, targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy of ``head(hidden)`` (hidden: positions × features) against ``targets`` (-100 = not
    counted), as the stock head + ``logits.float()`` + ``cross_entropy(reduction="sum")`` computes it: in
    autocast's dtype under autocast, else in the hidden states' dtype."""
    chunk = _slice_bytes(head)
    if chunk is None:
        raise TypeError(f"the fused loss cannot compute a {type(head).__name__} head")
    device = hidden.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    weight_rows = slice_rows(DenseRows(head.out_features, head.in_features), chunk, compute)
    # a head built from slices is built once for all positions (in chunks, once per chunk)
    rows = chunk_rows(head.out_features) if weight_rows >= head.out_features else max(1, hidden.shape[0])
    grads = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(
        hidden, head.weight, head.bias, targets, rows, weight_rows, compute, grads
    )
