"""Reading a schema field's type annotation: which config group (pydantic model) it holds, if any."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The group a field holds (``TinyModelSpec | None`` -> TinyModelSpec); None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
