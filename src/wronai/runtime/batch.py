"""``training.per_device_train_batch_size: auto`` and ``gradient_accumulation_steps: auto``.

A forward pass of one short row leaves a CPU's matrix units idle and a GPU's mostly idle too, so the rows
per forward are chosen from a tokens-per-forward target and the memory plan, while the rows per optimizer
step (the effective batch, what the results depend on) stay what the config says:

- both set: used as written, never changed;
- batch set, accumulation auto: accumulation 16 (the value configs without it always had), as before;
- batch auto: the effective batch is ``gradient_accumulation_steps`` when set (× batch 1, as before), else
  16; the batch is the largest power of two that divides it, keeps ``batch × data.max_seq_length`` within
  the device's tokens-per-forward target, and whose activations without recomputation fit the share of free
  memory that ``gradient_checkpointing: auto`` allows (``runtime.memory``'s estimate of the model's
  config.json); accumulation = effective batch / batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from wronai.errors import WronAIError
from wronai.runtime.activation_checkpointing import (
    AUTO_CHECKPOINTING_SHARE,
    activation_bytes,
    free_memory,
    run_settings,
)
from wronai.runtime.memory import ModelShape, read_model_config

# rows per optimizer step when the config names neither (the classic batch 1 × accumulation 16)
DEFAULT_EFFECTIVE_BATCH = 16
DEFAULT_ACCUMULATION = 16
# tokens per forward pass at which the device's matmuls run near their peak rate (CPU: measured on the
# benchmark model, docs/benchmarks.md; more only adds activation memory)
TOKENS_PER_FORWARD = {"cpu": 4096, "mps": 4096, "cuda": 16384}


@dataclass(frozen=True)
class BatchChoice:
    batch: int
    accumulation: int
    reason: str

    @property
    def notes(self) -> list[str]:
        return [self.reason] if self.reason else []


def choose(
    batch: int | str,
    accumulation: int | str,
    *,
    seq: int,
    device: str,
    fits: Callable[[int], bool] | None = None,
) -> BatchChoice:
    """The batch and accumulation for these settings (see the module docstring); ``fits(b)``: whether a
    forward of ``b`` rows fits in memory without recomputation (None: unknown, tokens target only)."""
    if batch != "auto":
        acc = DEFAULT_ACCUMULATION if accumulation == "auto" else int(accumulation)
        return BatchChoice(int(batch), acc, "")
    effective = DEFAULT_EFFECTIVE_BATCH if accumulation == "auto" else int(accumulation)
    target = TOKENS_PER_FORWARD.get(device, TOKENS_PER_FORWARD["cpu"])
    chosen, limit = 1, "the whole effective batch in one forward"
    for b in (2**k for k in range(1, effective.bit_length())):
        if effective % b:
            limit = f"a batch of {b} does not divide {effective}"
            break
        if b * seq > target:
            limit = f"{b} rows would exceed the target"
            break
        if fits is not None and not fits(b):
            limit = f"{b} rows' activations would not fit the free memory without recomputation"
            break
        chosen = b
    why = f"{chosen} × {seq} = {chosen * seq} tokens per forward, target {target} on {device}; {limit}"
    reason = (
        f"training.per_device_train_batch_size: auto -> {chosen}, gradient_accumulation_steps -> "
        f"{effective // chosen} (effective batch {effective} rows per step kept; {why})"
    )
    return BatchChoice(chosen, effective // chosen, reason)


def resolve(
    config: Any, device: str, model_config: dict[str, Any] | None = None, free_bytes: float | None = None
) -> tuple[Any, BatchChoice]:
    """``config`` with the batch settings resolved to numbers for ``device`` (a copy; the input is unchanged).
    ``free_bytes``: the memory a step may use (default: what is free on this machine's ``device`` now)."""
    t = config.training
    fits = (
        _memory_check(config, device, model_config, free_bytes)
        if t.per_device_train_batch_size == "auto"
        else None
    )
    choice = choose(
        t.per_device_train_batch_size, t.gradient_accumulation_steps,
        seq=config.data.max_seq_length, device=device, fits=fits,
    )  # fmt: skip
    training = t.model_copy(
        update={
            "per_device_train_batch_size": choice.batch,
            "gradient_accumulation_steps": choice.accumulation,
        }
    )
    return config.model_copy(update={"training": training}), choice


def _memory_check(
    config: Any, device: str, model_config: dict[str, Any] | None, free_bytes: float | None
) -> Callable[[int], bool] | None:
    """``fits(b)`` from the memory estimate and the free memory, or None when either is unknown."""

    try:
        free = free_bytes if free_bytes is not None else free_memory(device)
    except (RuntimeError, AssertionError):  # CUDA asked for on a machine without it
        free = None
    try:
        shape = ModelShape.from_config(
            model_config if model_config is not None else read_model_config(config)
        )
    except (WronAIError, OSError, ValueError, KeyError):
        return None
    if free is None:
        return None
    one = config.model_copy(
        update={
            "training": config.training.model_copy(
                update={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1}
            )
        }
    )
    settings = replace(run_settings(one, device), gradient_checkpointing=False)
    kind = "cpu" if device == "cpu" else "cuda"
    return lambda b: (
        activation_bytes(shape, replace(settings, batch=b), kind) <= AUTO_CHECKPOINTING_SHARE * free
    )


def for_packed_rows(batch: int, accumulation: int, examples: int, rows: int) -> BatchChoice:
    """The auto batch once the data is packed: the effective batch counts *examples* (as unpacked rows did),
    so an optimizer step sees as many examples as the config means — ``rows`` packed rows holding ``examples``
    examples; the forward batch stays at most ``batch`` rows (what the memory was planned for)."""
    effective = batch * accumulation
    per_row = max(1.0, examples / max(rows, 1))
    rows_per_step = max(1, round(effective / per_row))
    chosen = max(1, min(batch, rows_per_step))
    acc = max(1, round(rows_per_step / chosen))
    reason = (
        f"training.per_device_train_batch_size: auto -> {chosen}, gradient_accumulation_steps -> {acc} for packed rows "
        f"({per_row:.1f} examples per row: {chosen * acc} rows ≈ {round(chosen * acc * per_row)} examples per step, "
        f"the effective batch of {effective} examples kept)"
    )
    return BatchChoice(chosen, acc, reason)


def packed_rows_rule(batch: int, accumulation: int) -> str:
    """What ``for_packed_rows`` will do with an auto batch once the data is packed, said before any data is read."""
    effective = batch * accumulation
    return (
        f"training.per_device_train_batch_size: auto, data packed -> settled again once the data is packed: "
        f"{effective} examples per optimizer step kept, in at most {batch} packed rows per forward "
        f"(rows per step ≈ {effective} ÷ examples per packed row; `wronai validate --data` prepares the data and shows it)"
    )
