"""Validation errors as one line per problem: the dotted key, the bad value and the fix ("did you mean")."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from wronai.config.annotations import annotation_parts, choices, submodel
from wronai.config.legacy import LEGACY_KEYS
from wronai.config.schema import WronAIConfig

_NO_VALUE = "has no value (YAML reads an empty value, null and ~ as none)"
_RANGE_KINDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_NUMBER_KINDS = ("float_parsing", "float_type", "int_parsing", "int_type", "int_from_float")


def format_validation_errors(err: ValidationError) -> list[str]:
    """One line per problem: `dotted.key`: what is wrong — how to fix it."""
    return [line for _, line in problem_lines(err)]


def problem_lines(err: ValidationError) -> list[tuple[str, str]]:
    """(dotted key, line) per problem; union branches reporting one key again are left out."""
    lines: list[tuple[str, str]] = []
    seen: set[str] = set()
    for e in err.errors():
        key, _ = _walk(WronAIConfig, tuple(e["loc"]))
        kind = e["type"]
        if key in seen and kind not in ("extra_forbidden", "missing"):
            continue  # union branches report the same key several times; the first line is enough
        seen.add(key)
        lines.append((key, _line(e, key)))
    return lines


def _line(e: ErrorDetails, key: str) -> str:
    kind = e["type"]
    value = e.get("input")
    if kind == "extra_forbidden":
        return f"unknown key `{key}` — {_suggest(key)}"
    if kind == "missing":
        group, _, name = key.rpartition(".")
        where = f"the `{group}` group" if group else "the top level"
        return f"`{key}` is required — add `{name}:` to {where}"
    if kind.startswith("literal_error"):
        expected = (e.get("ctx") or {}).get("expected", "")
        if _takes_null(key):
            expected += ", or null"
        return _bad_value(key, value, "is not allowed", f"use one of {expected}")
    typed = _type_line(kind, key, value)
    if typed is not None:
        words = sorted(_words(key))
        return typed + (f", or {' / '.join(words)}" if words and value is not None else "")
    if kind in _RANGE_KINDS:
        return (
            f"`{key}`: {_short(value)} is out of range — {e['msg'].replace('Input should be', 'it must be')}"
        )
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"`{key}` must be a group of keys (a mapping), got {_short(value)} — indent its keys under `{key}:`"
    if kind == "value_error":
        message = e["msg"].removeprefix("Value error, ")
        return f"`{key}`: {message}" if key else message
    return f"`{key}`: {_short(value)} — {e['msg']}"


def _type_line(kind: str, key: str, value: Any) -> str | None:
    """The line for a value of the wrong type (number, text, list, boolean); None for other kinds."""
    if kind in _NUMBER_KINDS:
        want = "a whole number" if kind.startswith("int") else "a number (e.g. 2e-4)"
        return _bad_value(key, value, f"is not {want}", f"write {want}")
    if kind in ("string_type", "list_type"):
        want = "a list" if kind == "list_type" else "text"
        none_fix = f"write {want} (quoted, e.g. 'null', if you mean that word)"
        return _bad_value(key, value, "has the wrong type", f"write {want}", none_fix)
    if kind in ("bool_parsing", "bool_type"):
        return _bad_value(key, value, "is not true/false", "write true or false")
    return None


def _bad_value(key: str, value: Any, wrong: str, fix: str, none_fix: str | None = None) -> str:
    """`key`: value <wrong> — <fix>; for a null value, that it has none (and ``none_fix`` if given)."""
    if value is None:
        return f"`{key}` {_NO_VALUE} — {none_fix or fix}"
    return f"`{key}`: {_short(value)} {wrong} — {fix}"


def _walk(model: type[BaseModel] | None, loc: tuple) -> tuple[str, type[BaseModel] | None]:
    """Turn a pydantic error location into a dotted key, dropping union-branch tags."""
    parts: list[str] = []
    current = model
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            continue
        fields = current.model_fields if current is not None else {}
        if item in fields:
            parts.append(item)
            current = submodel(fields[item].annotation)
        elif current is not None:
            # a top-level group, or an extra (unknown) key directly under a model
            parts.append(str(item))
            current = None
        # else: a union tag such as 'str' or 'list[str]' — skip it
    return ".".join(parts), current


def _section_for(key: str) -> type[BaseModel] | None:
    model: type[BaseModel] | None = WronAIConfig
    for part in key.split(".")[:-1]:
        if model is None or part not in model.model_fields:
            return None
        model = submodel(model.model_fields[part].annotation)
    return model


def _suggest(key: str) -> str:
    section = _section_for(key)
    prefix, _, name = key.rpartition(".")
    candidates = list(section.model_fields) if section is not None else []
    group = prefix.split(".")[0] if prefix else ""
    candidates += [old for (g, old) in LEGACY_KEYS if g == group and prefix == g]
    close = (
        difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
        or sorted((c for c in candidates if name.startswith(c) or c.startswith(name)), key=len, reverse=True)[
            :1
        ]
    )
    if close:
        full = f"{prefix}.{close[0]}" if prefix else close[0]
        return f"did you mean `{full}`?"
    if not prefix:
        return f"remove it (groups are: {', '.join(WronAIConfig.model_fields)})"
    return f"remove it (valid keys: {', '.join(candidates)})" if candidates else "remove it"


def _short(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]  # as YAML spells them
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _words(key: str) -> set[str]:
    """The words a typed field also accepts (``auto`` of ``int | Literal["auto"]``)."""
    section = _section_for(key)
    name = key.rpartition(".")[2]
    if section is None or name not in section.model_fields:
        return set()
    return choices(section.model_fields[name].annotation)[0]


def _takes_null(key: str) -> bool:
    section = _section_for(key)
    name = key.rpartition(".")[2]
    if section is None or name not in section.model_fields:
        return False
    return type(None) in annotation_parts(section.model_fields[name].annotation)
