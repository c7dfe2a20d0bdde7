"""Swapping module classes: recognising a stock forward by its code, and putting swapped classes back (every
fused subclass here records the class it was swapped in for)."""

from __future__ import annotations

from typing import Any

import torch


def same_code(a: Any, b: Any) -> bool:
    """Whether two code objects are the same function body (bytecode, constants, names, arguments)."""
    fields = ("co_code", "co_consts", "co_names", "co_varnames", "co_argcount")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def restore_stock(model: torch.nn.Module, marker: type) -> int:
    """Every module of ``model`` that is an instance of ``marker`` (a fused subclass's mix-in) back to its
    ``stock`` class; returns how many."""
    swapped = [m for m in model.modules() if isinstance(m, marker)]
    for module in swapped:
        module.__class__ = module.stock  # type: ignore[assignment]
    return len(swapped)


def swapped_class(cache: dict[type, type], mixin: type, stock: type, name: str, doc: str) -> type:
    """The subclass ``name`` of ``stock`` with ``mixin``'s forward first, recording ``stock``; made once per
    stock class and process (kept in ``cache``), so that swaps made at different times share it."""
    if stock not in cache:
        cache[stock] = type(
            name, (mixin, stock), {"stock": stock, "__module__": mixin.__module__, "__doc__": doc}
        )
    return cache[stock]
