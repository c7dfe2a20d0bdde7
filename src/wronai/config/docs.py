"""Render the configuration reference (docs/configuration.md) from the schema's help strings."""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from wronai.config.annotations import submodel
from wronai.config.legacy import IGNORED_GROUPS, LEGACY_KEYS
from wronai.config.schema import WronAIConfig


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "null")


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        return f"`{field.default!r}`" if field.default is not None else "`null`"
    if field.default_factory is not None:
        value = field.default_factory()
        return (
            f"`{value.model_dump() if isinstance(value, BaseModel) else value!r}`"
            if not isinstance(value, BaseModel)
            else "(group)"
        )
    return "**required**"


def _section(name: str, model: type[BaseModel], lines: list[str]) -> None:
    lines += [
        f"## `{name}`",
        "",
        inspect.cleandoc(model.__doc__ or ""),
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    nested = []
    for key, field in model.model_fields.items():
        annotation = field.annotation
        sub = submodel(annotation)
        if sub is not None:
            nested.append((f"{name}.{key}", sub))
        kind = _type_name(annotation).replace("|", "\\|")
        lines.append(f"| `{name}.{key}` | {kind} | {_default(field)} | {field.description or ''} |")
    lines.append("")
    for sub_name, sub in nested:
        _section(sub_name, sub, lines)


def render_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/wronai/config/schema.py` by `wronai config-docs --out docs/configuration.md`;",
        "a test fails when this file and the schema disagree. Every key can also be set on the command line:",
        "`wronai train CONFIG --set group.key=value`.",
        "",
        'Unknown keys are errors (with a *did you mean* hint). Numbers written as strings (`"2e-4"`) are accepted.',
        "",
        "YAML 1.1 turns some unquoted words and numbers into other types; WronAI reads them by the key's type, so",
        "you rarely need quotes. Where a key's choices include `no`, `none` or `off` (`eval_strategy`,",
        "`save_strategy`, `lora.bias`, `hardware.fused_lora`, ...), an unquoted `no`/`off`/`false` means that",
        "choice and `on`/`yes`/`true` means `on` where that is a choice. A text key gets the text as written:",
        "`dataset_config: no` is `'no'`, `revision: 0755` is `'0755'`, `wandb_run_name: 12:30` is `'12:30'`,",
        "`train_split: 2024-01-01` is `'2024-01-01'`. A number key reads a leading zero as decimal (`seed: 0042`",
        "is 42, not the octal 34; noted at load), `1_000` as 1000 and a whole `1e3` as 1000; a base-60 `1:30`",
        "is an error. An empty value, `null` and `~` are null: fine where the type includes `null`, an error",
        "elsewhere. A key given twice in one mapping is an error (YAML would silently keep the last one).",
        "`--set group.key=value` reads the value exactly as the file would.",
        "",
    ]
    for name, field in WronAIConfig.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        _section(name, model, lines)
    lines += [
        "## Classic WronAI keys",
        "",
        "Configs written for the classic `scripts/train.py` load unchanged:",
        "",
    ]
    for (group, old), target in LEGACY_KEYS.items():
        lines.append(
            f"- `{group}.{old}` → " + (f"`{target[0]}.{target[1]}`" if target else "ignored (noted at load)")
        )
    lines.append("- groups " + ", ".join(f"`{g}`" for g in IGNORED_GROUPS) + " → ignored (noted at load)")
    lines.append("")
    return "\n".join(lines)
