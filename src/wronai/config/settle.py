"""Deciding what a YAML 1.1-retyped value meant, from the schema type of its key.

``parse`` (wronai.config.yaml_file) keeps the text as written next to each unquoted scalar that YAML 1.1
turned into a non-string (``Plain``); ``settle`` replaces each one by what the user meant: the text for text
keys, the off choice for strategy keys, the decimal number for number keys — or a one-line problem where no
reading is safe. ``--set key=value`` values and ``data=`` dicts go the same way.
"""

from __future__ import annotations

import decimal
import re
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from wronai.config.annotations import annotation_parts, submodel, switch_words
from wronai.config.legacy import LEGACY_KEYS, LEGACY_TYPES
from wronai.config.schema import WronAIConfig
from wronai.config.yaml_file import Plain


@dataclass
class Settled:
    """What `settle` decided: notes on values read differently than YAML 1.1 would, and problems by key."""

    notes: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)


_LEADING_ZERO = re.compile(r"[-+]?0[0-7_]+")
_EXPONENT = re.compile(r"[-+]?(\d[\d_]*)?\.?\d*[eE][-+]?\d+")


def settle(raw: dict) -> Settled:
    """Replace every `Plain` in ``raw`` (in place) by what the user meant, judged by the key's schema type.

    - text keys (str, list[str], dict[str, str]): the text as written (`dataset_config: no` is 'no',
      `revision: 0755` is '0755', `wandb_run_name: 12:30` is '12:30');
    - keys whose choices include no/none/off (on): YAML's false (true) stays a boolean, which the schema
      reads as that choice (`eval_strategy: off` is 'no');
    - boolean keys: the boolean (`packing: yes` is true);
    - number keys: the number, but a leading-zero number is decimal (`seed: 0042` is 42, not octal 34,
      with a note), a base-60 `1:30` is a problem, and a whole exponent number is whole (`max_steps: 1e3`);
    - any other key (a boolean where it is not a choice, a date): the text, so a problem shows what was written;
    - null/~/empty stays null: allowed where the key takes null, else a problem that says so.
    Keys the schema does not know keep YAML's values (they are reported as unknown anyway).
    """
    settled = Settled()
    _settle_mapping(raw, WronAIConfig, "", settled)
    return settled


def _settle_mapping(node: dict, model: type[BaseModel], prefix: str, settled: Settled) -> None:
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        node[key] = _settle(value, _key_annotation(model, prefix, key), dotted, settled)


def _key_annotation(model: type[BaseModel], prefix: str, key: Any) -> Any:
    """The type a key of this group is read as: its field's, a legacy key's own or its new key's; else Any."""
    if key in model.model_fields:
        return model.model_fields[key].annotation
    if (prefix, key) in LEGACY_TYPES:
        return LEGACY_TYPES[(prefix, key)]
    if (target := LEGACY_KEYS.get((prefix, str(key)))) is not None:
        group = WronAIConfig.model_fields.get(target[0])
        section = submodel(group.annotation) if group is not None else None
        if section is not None and target[1] in section.model_fields:
            return section.model_fields[target[1]].annotation
    return Any


def _settle(value: Any, annotation: Any, key: str, settled: Settled) -> Any:
    parts = annotation_parts(annotation)
    if isinstance(value, dict):
        model = submodel(annotation)
        if model is not None and annotation is not Any:
            _settle_mapping(value, model, key, settled)
            return value
        inner = next((get_args(p)[1] for p in parts if get_origin(p) is dict and get_args(p)), Any)
        for k, v in value.items():
            value[k] = _settle(v, inner, f"{key}.{k}", settled)
        return value
    if isinstance(value, list):
        inner = next((get_args(p)[0] for p in parts if get_origin(p) is list and get_args(p)), Any)
        return [_settle(v, inner, f"{key}[{i}]", settled) for i, v in enumerate(value)]
    if isinstance(value, str):
        return _whole_exponent(value, parts)
    if not isinstance(value, Plain):
        return value
    if annotation is Any or value.value is None:
        return value.value
    return _decide(value, annotation, parts, key, settled)


def _decide(plain: Plain, annotation: Any, parts: tuple[Any, ...], key: str, settled: Settled) -> Any:
    value, text = plain.value, plain.text
    if isinstance(value, bool):
        off, on = switch_words(annotation)
        if bool in parts or (off is not None and value is False) or (on is not None and value is True):
            return value
        return text
    if isinstance(value, (int, float)):
        return _decide_number(value, text, parts, key, settled)
    return text  # a date or time: the text as written (a text key takes it, other keys report it)


def _decide_number(value: int | float, text: str, parts: tuple[Any, ...], key: str, settled: Settled) -> Any:
    if not any(p in (int, float) for p in parts):
        return text if str in parts else value
    if ":" in text:
        settled.problems[key] = (
            f"`{key}`: {text} is a base-60 number to YAML 1.1 ({value}) — write the number without ':'"
        )
        return text
    if isinstance(value, int) and _LEADING_ZERO.fullmatch(text) and int(text) != value:
        settled.notes.append(
            f"`{key}`: {text} read as the decimal {int(text)} (YAML 1.1 would make a leading 0 octal: "
            f"{value}) — write {int(text)} to silence this note"
        )
        return int(text)
    return value


def _whole_exponent(value: str, parts: tuple[Any, ...]) -> Any:
    """`max_steps: 1e3`: PyYAML leaves a number without a '.' in its mantissa as text; a whole one is whole."""
    if int in parts and float not in parts and str not in parts and _EXPONENT.fullmatch(value.strip()):
        try:
            number = decimal.Decimal(value.strip().replace("_", ""))
        except decimal.InvalidOperation:
            return value
        if number.is_finite() and number.adjusted() < 19 and number == number.to_integral_value():
            return int(number)  # (a 64-bit range; `1e999999999` stays text and is reported)
    return value
