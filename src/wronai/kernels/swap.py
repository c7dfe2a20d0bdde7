"""Putting swapped module classes back: every fused subclass here records the class it was swapped in for."""

from __future__ import annotations

import torch


def restore_stock(model: torch.nn.Module, marker: type) -> int:
    """Every module of ``model`` that is an instance of ``marker`` (a fused subclass's mix-in) back to its
    ``stock`` class; returns how many."""
    swapped = [m for m in model.modules() if isinstance(m, marker)]
    for module in swapped:
        module.__class__ = module.stock  # type: ignore[assignment]
    return len(swapped)
