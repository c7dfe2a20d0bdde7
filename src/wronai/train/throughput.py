"""Throughput and memory in the training log: ``tokens_per_second``, ``rss_mb`` and ``cuda_max_memory_mb``.

``ThroughputMemoryCallback`` counts the non-pad input tokens of every training forward pass (a forward
pre-hook on the model reads each batch's ``attention_mask``; packed batches, which have none, count every
token before the trailing padding) and the time spent inside optimizer steps (evaluation and checkpointing
excluded). At each logging step it adds to the Trainer's log entry:

- ``tokens_per_second``: trained tokens since the last log / step time since the last log (all processes)
- ``tokens_seen``: trained tokens so far (all processes)
- ``tokens_shared``: of those, tokens computed once for several examples (a shared prompt start,
  ``hardware.shared_prefix``; only when there were any): the model ran on ``tokens_seen - tokens_shared``
- ``rss_mb``: this process's resident memory (psutil)
- ``cuda_max_memory_mb``: peak CUDA memory allocated so far on this process's GPU (only when CUDA is used)

The values land in ``trainer_state.json``'s ``log_history`` (and in TensorBoard/W&B when the callback runs
before their callbacks: add it with :func:`attach`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import TrainerCallback

from wronai.model.attention import PREFIX_KWARG

logger = logging.getLogger(__name__)


def count_tokens(kwargs: dict[str, Any], args: tuple[Any, ...], pad_token_id: int | None) -> int:
    """Non-pad input tokens of one forward call's batch: the examples' tokens, with a prefix computed once
    for several examples (``hardware.shared_prefix``) counted for each of them."""
    return _input_tokens(kwargs, args, pad_token_id) + shared_tokens(kwargs)


def shared_tokens(kwargs: dict[str, Any]) -> int:
    """Tokens of one forward call's batch computed once for several examples (``hardware.shared_prefix``):
    every example continuing a row's first tokens counts them once more."""
    return sum(sum(row) for row in kwargs.get(PREFIX_KWARG) or ())


def _input_tokens(kwargs: dict[str, Any], args: tuple[Any, ...], pad_token_id: int | None) -> int:
    mask = kwargs.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        return int(mask.sum())
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        return 0
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if pad_token_id is None:
        return int(ids.numel())
    total = 0
    for row in ids:  # packed rows: padding only at the end
        keep = (row != pad_token_id).nonzero()
        total += int(keep[-1]) + 1 if len(keep) else 0
    return total


class ThroughputMemoryCallback(TrainerCallback):
    """Adds tokens_per_second, tokens_seen (and tokens_shared), rss_mb and cuda_max_memory_mb to each
    training log entry."""

    def __init__(self) -> None:
        self._hook: Any = None
        self._pad: int | None = None
        self._tokens = 0
        self._tokens_total = 0
        self._shared = 0
        self._shared_total = 0
        self._step_time = 0.0
        self._step_start: float | None = None

    # --- counting ---------------------------------------------------------------------------------------
    def _pre_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        if module.training and torch.is_grad_enabled():
            self._tokens += count_tokens(kwargs, args, self._pad)
            self._shared += shared_tokens(kwargs)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._pad = getattr(processing_class, "pad_token_id", None)
        if self._pad is None and model is not None:
            self._pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._tokens = self._shared = 0
        self._step_time = 0.0
        history = getattr(state, "log_history", None) or []
        seen = [h["tokens_seen"] for h in history if "tokens_seen" in h]
        self._tokens_total = int(seen[-1]) if seen else 0  # resumed runs continue the count
        shared = [h["tokens_shared"] for h in history if "tokens_shared" in h]
        self._shared_total = int(shared[-1]) if shared else 0

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self._step_time += time.perf_counter() - self._step_start
            self._step_start = None

    # --- reporting --------------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # training-step logs only (not eval or the final summary)
            return
        tokens = _sum_over_processes(self._tokens, args)
        self._tokens_total += tokens
        self._shared_total += _sum_over_processes(self._shared, args)
        metrics: dict[str, float] = {"tokens_seen": float(self._tokens_total), "rss_mb": round(_rss_mb(), 1)}
        if self._shared_total:
            metrics["tokens_shared"] = float(self._shared_total)
        if self._step_time > 0:
            metrics["tokens_per_second"] = round(tokens / self._step_time, 2)
        cuda = _cuda_max_mb()
        if cuda is not None:
            metrics["cuda_max_memory_mb"] = round(cuda, 1)
        logs.update(metrics)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(metrics)  # the Trainer appended a copy of `logs` before calling the callbacks
        self._tokens = self._shared = 0
        self._step_time = 0.0


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _cuda_max_mb() -> float | None:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _sum_over_processes(value: int, args: Any) -> int:
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=getattr(args, "device", "cpu"))
    dist.all_reduce(tensor)
    return int(tensor.item())


def attach(trainer: Any) -> ThroughputMemoryCallback:
    """Put the callback *first* in a built Trainer, so loggers (TensorBoard, W&B, console) see its values.

    One already added (e.g. through ``extensions.callbacks``) is moved to the front instead of doubled.
    """
    callbacks = trainer.callback_handler.callbacks
    existing = [cb for cb in callbacks if isinstance(cb, ThroughputMemoryCallback)]
    for cb in existing:
        callbacks.remove(cb)
    callback = existing[0] if existing else ThroughputMemoryCallback()
    callbacks.insert(0, callback)
    return callback
