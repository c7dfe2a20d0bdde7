"""CPU memory hygiene: freed loading buffers go back to the OS; hardware.return_freed_memory keeps them going back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wronai import hardware
from wronai.config.schema import HardwareSection

# glibc keeps freed buffers in its heap once a larger freed buffer has raised its dynamic mmap threshold.
# Run in a fresh interpreter: the heap of the test process is in no known state.
FRAGMENT = """
import torch
from wronai import hardware
from wronai.config.schema import HardwareSection
{setup}
big = torch.ones(16 * 2**20 // 4); del big            # raises glibc's dynamic mmap threshold to 16 MiB
keep = [torch.ones(8 * 2**20 // 4) for _ in range(30)]  # 240 MiB of 8 MiB buffers
pin = torch.ones(2**20 // 4)                            # allocated last: holds the heap top
before = hardware._rss_bytes(); del keep
dropped = before - hardware._rss_bytes()
print(dropped / 2**20, hardware.release_free_memory() / 2**20)
"""
ON = 'assert hardware.apply_memory_settings(HardwareSection(return_freed_memory="on"), "cpu", 1)'
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap behaviour")


def run_fragment(setup: str) -> tuple[float, float]:
    code = FRAGMENT.format(setup=setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    dropped_on_free, trimmed = (float(x) for x in out.split())
    return dropped_on_free, trimmed


@linux_only
def test_release_free_memory_returns_what_the_heap_kept():
    dropped_on_free, trimmed = run_fragment("")
    assert dropped_on_free < 60  # glibc kept the freed 8 MiB buffers ...
    assert trimmed > 180  # ... and malloc_trim handed them back


@linux_only
def test_return_freed_memory_gives_buffers_back_as_they_are_freed():
    dropped_on_free, trimmed = run_fragment(ON)
    assert dropped_on_free > 180  # above the fixed 4 MiB threshold: unmapped at once
    assert trimmed < 60


@pytest.mark.parametrize(
    ("mode", "device", "parameters", "expected"),
    [
        ("auto", "cpu", 1_100_000_000, True),
        ("auto", "cpu", 17_000_000, False),  # small models: page faults cost more than the memory saved
        ("on", "cpu", 17_000_000, True),
        ("off", "cpu", 7_000_000_000, False),
        ("auto", "cuda", 7_000_000_000, False),  # GPU memory is not the C heap
        ("on", "mps", 7_000_000_000, False),
    ],
)
def test_return_freed_memory_decision(mode, device, parameters, expected):
    resolved = hardware.wants_fixed_mmap_threshold(
        HardwareSection(return_freed_memory=mode), device, parameters
    )
    assert resolved is expected
