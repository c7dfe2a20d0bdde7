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

With ``fused`` (``hardware.fused_cross_entropy``) the pre-hook computes the head and the loss itself, in one
chunked autograd step (``wronai.kernels.cross_entropy``), and hands the head no position: no logits tensor
is kept for the backward. ``fused_loss_problem`` is its start-up check on the model itself. With
``last_layer`` the last decoder layer's query/output projections and MLP see the same positions only
(``wronai.train.last_layer``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from wronai.data.tokenize import IGNORE_INDEX
from wronai.errors import WronAIError
from wronai.kernels.cross_entropy import linear_cross_entropy, usable_head
from wronai.train.last_layer import trained_rows_only


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


def _select_rows(
    mask: torch.Tensor, state: dict[str, Any], module: torch.nn.Module, args: tuple[Any, ...]
) -> tuple[Any, ...]:
    """The head's pre-hook: the trained positions' hidden states only (kept in ``state``). Where ``state``
    holds the targets (fused), the head and the loss are computed here in one step
    (``wronai.kernels.cross_entropy``) and the head itself is handed no position at all."""
    hidden = args[0]
    selected = hidden[mask.to(hidden.device)]
    state["hidden"] = selected
    targets = state.get("targets")
    if targets is None:
        return (selected.unsqueeze(0), *args[1:])
    if "total" in state:
        raise WronAIError(
            "the model's forward called its output head twice — set hardware.fused_cross_entropy=off"
        )
    state["total"] = linear_cross_entropy(selected, module, targets.to(hidden.device))
    return (selected[:0].unsqueeze(0), *args[1:])


def summed_loss(
    model: Any,
    inputs: dict[str, Any],
    *,
    multiple: int | None = None,
    fused: bool = False,
    last_layer: Sequence[torch.nn.Module] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The summed token cross-entropy over trained positions, their targets, the hidden states the head was
    given for them, and the router loss a mixture-of-experts model adds to its loss (``router_loss``; None
    for other models). ``fused``: head and loss in one chunked step (a head
    ``kernels.cross_entropy.usable_head`` takes); ``last_layer``: the last decoder layer's position-wise
    parts, computed at the head's positions only (``wronai.train.last_layer``)."""
    labels = inputs["labels"]
    mask = trained_mask(labels)
    if multiple:
        mask = bucketed(mask, multiple)
    head = output_head(model)
    if head is None:
        raise ValueError("model has no output embeddings — set training.trained_logits_only=false")
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    targets = shifted[mask]  # the same row-major order as the selected hidden states
    state: dict[str, Any] = {"targets": targets if fused else None}
    handle = head.register_forward_pre_hook(partial(_select_rows, mask, state))
    try:
        with trained_rows_only(last_layer, mask):
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        handle.remove()
    if "hidden" not in state:
        raise WronAIError(
            "the model's forward computes its logits without calling its output head — set "
            "training.trained_logits_only=false"
        )
    router = router_loss(model, outputs)
    if fused:
        return state["total"], targets, state["hidden"], router
    logits = outputs.logits
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, targets, state["hidden"], router


def router_loss(model: Any, outputs: Any) -> torch.Tensor | None:
    """What a mixture-of-experts model with ``output_router_logits`` adds to its loss when given labels —
    ``router_aux_loss_coef`` × its load-balancing ``aux_loss`` (Mixtral, Qwen-MoE, …); the forward here
    runs without labels, so it is added back by the caller. None for a model that returns no ``aux_loss``."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is None:
        return None
    inner = getattr(model, "module", model)
    coef = getattr(getattr(inner, "config", None), "router_aux_loss_coef", None)
    if coef is None:
        raise WronAIError(
            "the model returns a router aux_loss but its config has no router_aux_loss_coef — set "
            "training.trained_logits_only=false"
        )
    return coef * aux


def trained_positions_loss(
    model: Any,
    inputs: dict[str, Any],
    num_items_in_batch: Any = None,
    *,
    multiple: int | None = None,
    fused: bool = False,
    last_layer: Sequence[torch.nn.Module] = (),
) -> torch.Tensor:
    """Token cross-entropy over trained positions only, plus a mixture-of-experts model's router loss; equal
    to ``model(**inputs).loss``. ``multiple``: the head sees a multiple of this many positions
    (``bucketed``); ``fused``, ``last_layer``: see ``summed_loss``."""
    total, targets, _, router = summed_loss(
        model, inputs, multiple=multiple, fused=fused, last_layer=last_layer
    )
    if num_items_in_batch is None:
        loss = total / (targets != IGNORE_INDEX).sum().clamp(min=1).to(total.device)
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    return loss if router is None else loss + router.to(loss.device)


# positions of the first row the start-up checks (fused loss, last layer) run on
CHECK_POSITIONS = 16


def fused_loss_problem(model: Any, inputs: dict[str, Any], multiple: int | None = None) -> str | None:
    """The fused loss against the stock one on the model itself, under the caller's autocast: the first
    ``CHECK_POSITIONS`` tokens of the batch's first row, every one trained, run twice from the same random
    state (dropout alike); the loss and its gradients for the head's input (and trained head parameters)
    must agree. A forward that does more to the logits than its head (a scale, a soft cap) fails here.
    None when they agree, else what differs. Parameters' ``.grad`` are not touched."""
    head = output_head(model)
    if head is None or not usable_head(head):
        return f"the output head is a {type(head).__name__}, which the fused loss does not compute"
    ids = inputs["input_ids"][:1, :CHECK_POSITIONS]
    small = {"input_ids": ids, "labels": ids.clone()}
    params: list[torch.Tensor] = [
        p for p in (head.weight, head.bias) if isinstance(p, torch.Tensor) and p.requires_grad
    ]
    results, hidden = runs_from_one_state(
        model, small, [{"multiple": multiple, "fused": fused} for fused in (False, True)],
        lambda hidden: [hidden, *params],
    )  # fmt: skip
    half = torch.is_autocast_enabled(ids.device.type) or hidden.dtype != torch.float32
    names = ["loss", "input grad", *("weight grad" if p is head.weight else "bias grad" for p in params)]
    return first_difference(names, results, 3e-2 if half else 1e-4, "the stock loss's")


def runs_from_one_state(
    model: Any,
    small: dict[str, Any],
    variants: list[dict[str, Any]],
    wrt: Callable[[torch.Tensor], list[torch.Tensor]],
) -> tuple[list[list[torch.Tensor | None]], torch.Tensor]:
    """The start-up checks' runs: ``summed_loss`` (plus the router loss) with each of ``variants``' keyword
    arguments, from the same random state (dropout alike) without touching the run's, and its gradients
    for ``wrt(hidden the head got)`` — per run ``[loss, *gradients]`` in float32 (None: not reached) — and
    the last run's head input. Parameters' ``.grad`` are not touched."""
    device = small["input_ids"].device
    results: list[list[torch.Tensor | None]] = []
    for kwargs in variants:
        with torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else [], device_type=device.type
        ):
            torch.manual_seed(0)
            total, _, hidden, router = summed_loss(model, small, **kwargs)
            if router is not None:
                total = total + router.to(total.device)
            grads = torch.autograd.grad(total, wrt(hidden), allow_unused=True)
        results.append([total.detach().float(), *(g if g is None else g.float() for g in grads)])
    return results, hidden


def first_difference(
    names: Sequence[str], results: list[list[torch.Tensor | None]], tol: float, reference: str
) -> str | None:
    """The first of the named values (loss, gradients) where the second run differs from the first (the
    reference) beyond ``tol`` — "<name> differs from <reference>" — or None."""
    for name, stock, ours in zip(names, *results, strict=True):
        if (stock is None) != (ours is None):
            return f"{name} is missing on one side"
        if stock is None or ours is None:
            continue
        if not torch.allclose(ours, stock, rtol=tol, atol=tol * float(stock.abs().max().clamp(min=1e-6))):
            return f"{name} differs from {reference}"
    return None
