"""The C heap of CPU runs: hand freed buffers back to the OS instead of letting glibc keep them.

Every CPU tensor is a ``malloc``. glibc serves buffers below its mmap threshold from its heap and keeps
them there once freed, for reuse; buffers that do not fit the holes left between live ones make the heap
grow. A training step allocates and frees thousands of buffers of many sizes (dequantized weights,
activations, gradients), so the heap of a 1B-parameter QLoRA run holds 70 MiB of free pages after one
decoder stack's forward and 170 MiB after two steps (measured with ``mallinfo2`` on TinyLlama-1.1B, seq 32)
— 20% of the model's part of the peak RSS. ``hardware.return_freed_memory`` sets three things:

- ``release_free_memory``: ``malloc_trim`` once the model is prepared (always; loading frees a lot);
- a fixed mmap threshold (``memory_settings``): buffers of 4 MiB and more are mapped and unmapped;
- ``HeapTrimmer``: between decoder layers, forward and backward, the heap's free pages are handed back
  (``install_heap_trimming``).

Small models want the opposite: ``return_freed_memory: off`` (auto below 0.5B parameters) keeps freed
buffers for the next step (``keep_freed_memory``). glibc's defaults trim the top of its heap whenever more
than twice the largest recently freed buffer is free there — after every backward, when a step's activations
go — so the next step page-faults them in again: ~20k faults per step (~90 MiB) on the speed-benchmark model,
at ~3 µs each. A fixed 32 MiB mmap threshold and no automatic trimming keep them: under 1k faults per step.

``memory_settings`` applies all of it inside a block and sets glibc's defaults again on exit. All of it is
a no-op off Linux/glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from wronai.config.sections.run import HardwareSection

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 4 * 2**20  # buffers at least this large come from (and go back to) the OS
KEEP_MMAP_THRESHOLD = 32 * 2**20  # the largest mmap threshold glibc accepts on 64-bit systems
KEEP_TRIM_THRESHOLD = 2**31 - 1  # free memory at the heap top is kept up to this (mallopt takes a C int)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
GLIBC_MMAP_THRESHOLD = GLIBC_TRIM_THRESHOLD = 128 * 1024  # glibc's defaults for both (malloc/malloc.c)
LARGE_MODEL_PARAMS = 500_000_000  # return_freed_memory: auto turns it on from here


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_memory() -> int:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``); returns the bytes RSS fell by.

    Loading and quantizing a model frees many buffers of a few MiB, and glibc keeps them in the heap:
    measured on TinyLlama-1.1B 4-bit, RSS right after loading varied from 0.95 to 1.58 GiB between identical
    runs. Called after the model is prepared; a no-op off Linux/glibc.
    """
    import gc

    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return 0
    before = resident_bytes()
    trim(0)
    return max(0, before - resident_bytes())


TRIM_GROWTH = 16 * 2**20  # HeapTrimmer: trim once RSS has grown this much since the last trim


class HeapTrimmer:
    """Hands the heap's free pages back (``malloc_trim``) when RSS has grown by ``growth`` bytes since the last
    trim — reading RSS costs microseconds, a trim and the page faults after it milliseconds. ``trims``
    counts the trims done."""

    def __init__(self, growth: int = TRIM_GROWTH) -> None:
        self._trim = getattr(_libc(), "malloc_trim", None)
        self.growth = growth
        self.floor = resident_bytes()
        self._readable = self.floor > 0
        self.trims = 0
        self.handles: list[Any] = []  # the forward hooks install_heap_trimming registered

    def remove(self) -> None:
        """Take the trimmer off the layers it was installed on (the hooks on tensors end with their step)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @property
    def available(self) -> bool:
        return self._trim is not None and self._readable

    def __call__(self, *_: Any) -> None:
        if self._trim is None or not self._readable:
            return
        resident = resident_bytes()
        if resident - self.floor < self.growth:
            self.floor = min(self.floor, resident)
            return
        self._trim(0)
        self.trims += 1
        self.floor = resident_bytes()


def _trim_after_forward(trimmer: HeapTrimmer, _module: Any, _args: Any, output: Any) -> None:
    trimmer()
    hidden = output[0] if isinstance(output, tuple) else output
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        hidden.register_hook(trimmer)  # runs when this layer's backward starts


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (the classes its ``_no_split_modules`` names)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def install_heap_trimming(model: torch.nn.Module, growth: int = TRIM_GROWTH) -> HeapTrimmer | None:
    """After every decoder layer's forward and before its backward, trim the heap if RSS grew by ``growth``
    since the last trim; None without glibc or decoder layers."""
    trimmer = HeapTrimmer(growth)
    if not trimmer.available:
        return None
    layers = decoder_layers(model)
    trimmer.handles = [layer.register_forward_hook(partial(_trim_after_forward, trimmer)) for layer in layers]
    logger.debug("heap trimming between %d decoder layers", len(layers))
    return trimmer if layers else None


def freed_memory_policy(hardware: HardwareSection, device: str, parameters: int) -> str | None:
    """``hardware.return_freed_memory`` resolved for this run: "return" (on, or auto for CPU runs of >= 0.5B
    parameters), "keep" (off, or auto below that), None off the CPU (GPU memory is not the C heap)."""
    mode = hardware.return_freed_memory
    if device != "cpu":
        return None
    if mode == "on" or (mode == "auto" and parameters >= LARGE_MODEL_PARAMS):
        return "return"
    return "keep"


def freed_memory_reason(hardware: HardwareSection, parameters: int) -> str:
    """Why ``hardware.return_freed_memory`` resolved as it did for a CPU run of ``parameters`` parameters."""
    if hardware.return_freed_memory != "auto":
        return "set in the config"
    side = "at least" if parameters >= LARGE_MODEL_PARAMS else "under"
    size = f"{parameters / 1e9:.3g}B" if parameters >= 10**9 else f"{parameters / 1e6:.3g}M"
    return (
        f"a model of {size} parameters, {side} the {LARGE_MODEL_PARAMS / 1e9:g}B from which auto returns it"
    )


def freed_memory_note(hardware: HardwareSection, device: str, parameters: int) -> str | None:
    """The line `wronai train` logs for ``hardware.return_freed_memory`` on this run and `wronai validate`
    shows (from config.json's parameter count); None off the CPU, where it does not apply."""
    policy = freed_memory_policy(hardware, device, parameters)
    if policy is None:
        return None
    setting = hardware.return_freed_memory
    value = ("auto -> " if setting == "auto" else "") + ("on" if policy == "return" else "off")
    what = (
        f"buffers of {MMAP_THRESHOLD // 2**20} MiB and more go back to the OS when freed"
        if policy == "return"
        else "freed buffers are kept for the next step: fewer page faults"
    )
    return f"hardware.return_freed_memory: {value} ({freed_memory_reason(hardware, parameters)}) — {what}"


def _mallopt(parameter: int, value: int) -> bool:
    """glibc's ``mallopt``; whether it took the setting (False off glibc)."""
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and mallopt(parameter, value) == 1


def keep_freed_memory() -> bool:
    """Keep freed buffers in the C heap for reuse: buffers up to 32 MiB come from the heap, and its top is
    not trimmed when a step's activations are freed; returns whether glibc took both settings."""
    return _mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD) and _mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)


@contextlib.contextmanager
def memory_settings(
    hardware: HardwareSection, device: str, parameters: int, model: torch.nn.Module | None = None
) -> Iterator[bool]:
    """``hardware.return_freed_memory`` for CPU runs inside the block; yields whether freed memory goes back to the OS.

    "return": glibc raises its mmap threshold each time a large buffer is freed (up to 32 MiB), after which
    buffers of that size come from the heap and stay there once freed: the dequantized 4-bit weights and
    activations of a 1B model, a few to 30 MiB each. A fixed 4 MiB threshold keeps returning them; smaller
    buffers are trimmed between the decoder layers of ``model``. "keep": ``keep_freed_memory``.

    On exit (also on an error) the hooks on ``model`` are removed and glibc's default mmap and trim
    thresholds (128 KiB) are set again; glibc cannot be told to resume raising the mmap threshold by
    itself, so after the block it stays at its default.
    """
    returned, policy, trimmer = _apply(hardware, device, parameters, model)
    try:
        yield returned
    finally:
        if trimmer is not None:
            trimmer.remove()
        if policy is not None:
            restore_malloc_defaults()


def _apply(
    hardware: HardwareSection, device: str, parameters: int, model: torch.nn.Module | None
) -> tuple[bool, str | None, HeapTrimmer | None]:
    """(freed memory goes back to the OS, the policy applied or None, the trimmer installed on ``model``)."""
    policy = freed_memory_policy(hardware, device, parameters)
    if policy is None:
        return False, None, None
    note = freed_memory_note(hardware, device, parameters)
    if policy == "keep":
        if keep_freed_memory():
            logger.info("%s", note)
        return False, policy, None
    if not _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return False, policy, None
    trimmer = install_heap_trimming(model) if model is not None else None
    logger.info(
        "%s%s", note, "; the heap's free pages between decoder layers too" if trimmer is not None else ""
    )
    return True, policy, trimmer


def restore_malloc_defaults() -> bool:
    """glibc's default mmap and trim thresholds again; whether glibc took both (False off glibc)."""
    return _mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD) and _mallopt(
        M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD
    )


def resident_bytes() -> int:
    """Resident set size from /proc/self/statm (cheaper than the status file); 0 where there is none."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
