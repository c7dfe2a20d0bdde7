"""``training.gradient_checkpointing: auto``: recompute only as many decoder layers as memory needs.

After the model is loaded, the activations of one step are estimated with ``wronai plan``'s formula
(``memory.estimate``: the model's shape, ``per_device_train_batch_size``, ``data.max_seq_length``) and
compared with the memory still free — the process's GPU's free memory on CUDA, available RAM on a CPU split
between the processes of the machine. Off when the activations without checkpointing take at most half of it; else
one decoder layer in every N is recomputed (transformers 5's ``every_n_layers``), the largest N that fits,
down to every layer. Unknown shapes and MPS keep it on for every layer.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from wronai.errors import WronAIError
from wronai.runtime.memory import GIB, ModelShape, Settings, estimate, on_this_cpu

# training.gradient_checkpointing: auto turns it off while a step's activations without it take at most
# this share of the memory free after loading (the estimate is conservative on CPUs; evaluation, the
# optimizer's first step and other processes need the rest)
AUTO_CHECKPOINTING_SHARE = 0.5
_ACTIVATION_PARTS = ("activations", "logits + loss", "CPU heap slack")


def activation_bytes(shape: ModelShape, s: Settings, device: str = "cuda") -> float:
    """The part of ``estimate`` that grows with a step's tokens: saved activations, the loss's logits, heap slack."""
    parts = estimate(shape, s, device=device).parts
    return sum(parts.get(name, 0.0) for name in _ACTIVATION_PARTS)


def checkpointing_choice(shape: ModelShape, s: Settings, free_bytes: float, device: str) -> tuple[int, str]:
    """training.gradient_checkpointing: auto — 0 (off) when the activations without it fit the free memory's
    share, else N: recompute every N-th decoder layer, the largest N (fewest layers recomputed) that fits; 1 = all."""
    budget = AUTO_CHECKPOINTING_SHARE * free_bytes
    without = activation_bytes(shape, replace(s, gradient_checkpointing=False), device)
    why = f"activations ≈ {without / GIB:.2f} GiB without it for batch {s.batch} × seq {s.seq}, {free_bytes / GIB:.1f} GiB free"
    if without <= budget:
        return 0, why
    for every in range(shape.layers, 1, -1):
        if (
            activation_bytes(shape, replace(s, gradient_checkpointing=True, checkpoint_every=every), device)
            <= budget
        ):
            return every, why
    return 1, why


def describe_checkpointing(every: int, layers: int) -> str:
    """0 -> 'off', 1 -> 'on', N -> 'on for one decoder layer in every N (k of L)'."""
    if every <= 1:
        return "on" if every == 1 else "off"
    return f"on for one decoder layer in every {every} ({-(-layers // every)} of {layers})"


def auto_note(what: str, why: str) -> str:
    """The line `wronai train` logs (and adds to the plan notes) and `wronai plan` prints for the decision."""
    return f"training.gradient_checkpointing: auto -> {what} ({why})"


def free_memory(device: str) -> float | None:
    """Bytes this process may still use: the free memory of its GPU (CUDA; each process has its own), or
    the available RAM split between the processes of this machine (CPU; LOCAL_WORLD_SIZE); None on MPS."""
    if device == "cuda":
        import torch

        return float(torch.cuda.mem_get_info()[0])
    if device == "cpu":
        import psutil

        return float(psutil.virtual_memory().available) / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return None


def run_settings(config: Any, device: str) -> Settings:
    """The estimate's settings for a run of ``config`` on ``device`` (dtypes as this machine's plan resolves them)."""
    settings = Settings.from_config(config)
    return on_this_cpu(settings, config) if device == "cpu" else settings


def auto_gradient_checkpointing(
    config: Any, model_config: dict[str, Any], device: str
) -> tuple[int, str, str]:
    """Resolve ``training.gradient_checkpointing: auto`` for a loaded model: (every N-th layer, 0 = off; what; why)."""
    free = free_memory(device)
    if free is None:
        return 1, "on", f"free memory unknown on {device}"
    try:
        shape = ModelShape.from_config(model_config)
    except WronAIError:
        return 1, "on", "model shape unknown (not a Llama-style config)"
    every, why = checkpointing_choice(
        shape, run_settings(config, device), free, "cpu" if device == "cpu" else "cuda"
    )
    return every, describe_checkpointing(every, shape.layers), why
