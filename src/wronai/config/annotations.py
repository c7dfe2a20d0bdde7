"""Reading a schema field's type annotation: union members, Literal choices, YAML switch words, sub-group."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The group a field holds (``TinyModelSpec | None`` -> TinyModelSpec); None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


# The values an unquoted YAML `no`/`off`/`false` stands for in a field whose choices include one, first match wins.
OFF_WORDS = ("no", "none", "off")


def annotation_parts(annotation: Any) -> tuple[Any, ...]:
    """The members of a union (``str | None`` -> (str, NoneType)); a plain annotation is its own only member."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def choices(annotation: Any) -> tuple[set[str], set[str]]:
    """The string Literal choices of a field: (choices of the value itself, choices of its list items)."""
    own: set[str] = set()
    items: set[str] = set()
    for part in annotation_parts(annotation):
        target = own
        if get_origin(part) is list:
            part, target = get_args(part)[0], items
        for member in annotation_parts(part):
            if get_origin(member) is Literal:
                target.update(a for a in get_args(member) if isinstance(a, str))
    return own, items


def switch_words(annotation: Any) -> tuple[str | None, str | None]:
    """What YAML's false and true stand for in a field of this type: its off choice and its `on` choice.

    YAML 1.1 reads an unquoted no/off/false (yes/on/true) as a boolean, so ``eval_strategy: no`` arrives as
    False. Where the field's choices (or its list items' choices) include no, none or off (on), that boolean
    can only mean that choice. Fields that take a boolean themselves get (None, None): there it is the value.
    """
    if bool in annotation_parts(annotation):
        return None, None
    own, items = choices(annotation)
    words = own | items
    off = next((w for w in OFF_WORDS if w in words), None)
    return off, "on" if "on" in words else None
