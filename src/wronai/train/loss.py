"""The causal-LM loss computed only where it is trained: logits for answer tokens, not for prompts.

With answer-only masking most prompt positions carry label -100, yet the stock forward pass still projects
every position onto the whole vocabulary (hidden × vocab FLOPs per token, and a tokens × vocab fp32 logits
tensor kept for backward — gigabytes for 128k–152k-token vocabularies). ``trained_positions_loss`` hands the
output head only the hidden states of positions whose next token is trained (a pre-hook on the head, removed
right after the forward pass), row by row, and returns exactly the loss transformers would: the summed
token cross-entropy divided by ``num_items_in_batch`` when given, else the mean over trained tokens.

The number of trained positions differs from batch to batch, and so would the shape of the head's matmul:
on a CPU every new bf16 matmul shape leaves a oneDNN kernel and its buffers cached in the C heap for good —
measured on the speed benchmark (AMX-BF16 Xeon, packed rows of 3 x 512): RSS grew by ~25 MB per step, from
1.1 to 2.3 GB in 30 steps. With ``multiple`` (the trainer passes ``train.trainer.length_multiple``: 64 on
bf16/fp16 CPU runs, none elsewhere) the selection is padded to a multiple of it with untrained positions
(whose targets are -100 by construction, so they add nothing to the loss or its gradient): a run sees at
most ``rows x length / multiple`` shapes, and RSS stays flat.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from wronai.data.tokenize import IGNORE_INDEX


def output_head(model: Any) -> torch.nn.Module | None:
    """The output projection of a (possibly PEFT- or DDP-wrapped) causal LM, or None."""
    inner = getattr(model, "module", model)  # DDP / FSDP wrappers
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    getter = getattr(base, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else None


def trained_mask(labels: torch.Tensor) -> torch.Tensor:
    """True at positions whose next token is trained (never all False: one position is kept)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if not mask.any():
        mask[0, 0] = True
    return mask


def bucketed(mask: torch.Tensor, multiple: int) -> torch.Tensor:
    """``mask`` with its first untrained positions added until the count is a multiple of ``multiple`` (or
    every position is in). Every added position's next token is untrained, so its target is -100."""
    count = int(mask.sum())
    extra = min(-count % multiple, mask.numel() - count)
    if extra == 0:
        return mask
    flat = mask.flatten().clone()
    flat[(~flat).nonzero().flatten()[:extra]] = True
    return flat.view_as(mask)


def _select_rows(mask: torch.Tensor, _module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    hidden = args[0]
    return (hidden[mask.to(hidden.device)].unsqueeze(0), *args[1:])


def trained_positions_loss(
    model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None, *, multiple: int | None = None
) -> torch.Tensor:
    """Token cross-entropy over trained positions only; equal to ``model(**inputs).loss``. ``multiple``: the
    head sees a multiple of this many positions (``bucketed``)."""
    labels = inputs["labels"]
    mask = trained_mask(labels)
    if multiple:
        mask = bucketed(mask, multiple)
    head = output_head(model)
    if head is None:
        raise ValueError("model has no output embeddings — set training.trained_logits_only=false")
    handle = head.register_forward_pre_hook(partial(_select_rows, mask))
    try:
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    finally:
        handle.remove()
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    targets = shifted[mask].to(logits.device)  # the same row-major order as the selected hidden states
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
