"""Classic WronAI configs: the old keys mapped onto the schema, and the groups accepted but ignored."""

from __future__ import annotations

from typing import Any

# Groups the classic WronAI configs carry that the pipeline does not use: accepted, reported, ignored.
IGNORED_GROUPS = ("safety", "evaluation", "advanced", "resources", "quality", "deployment", "monitoring")

# (group, old key) -> (group, new key) or None to drop. Values move unchanged unless converted below.
LEGACY_KEYS: dict[tuple[str, str], tuple[str, str] | None] = {
    ("training", "evaluation_strategy"): ("training", "eval_strategy"),
    ("training", "dataloader_pin_memory"): ("hardware", "pin_memory"),
    ("training", "dataloader_num_workers"): ("hardware", "dataloader_num_workers"),
    ("training", "report_to"): ("logging", "report_to"),
    ("training", "run_name"): ("logging", "wandb_run_name"),
    ("training", "remove_unused_columns"): None,
    ("hardware", "max_memory_mb"): ("hardware", "max_memory"),
    ("hardware", "pin_memory"): ("hardware", "pin_memory"),
    ("polish", "polish_stopwords"): None,
    ("polish", "morphological_analysis"): None,
    ("data", "validation_split_percentage"): ("data", "eval_fraction"),
}

# Legacy keys whose value migrate_legacy converts: read as this type, not as the target key's type.
LEGACY_TYPES: dict[tuple[str, str], Any] = {
    ("hardware", "max_memory_mb"): float | None,
    ("data", "validation_split_percentage"): float | None,
}

_DROP_REASON = {
    ("training", "remove_unused_columns"): "WronAI always keeps exactly the columns the model needs",
    ("polish", "polish_stopwords"): "stopword removal harms language-model training",
    ("polish", "morphological_analysis"): "the pipeline does not use it",
}


def migrate_legacy(raw: dict) -> list[str]:
    """Rewrite classic WronAI keys in place; return a note per change."""
    notes: list[str] = []
    for group in IGNORED_GROUPS:
        if group in raw:
            raw.pop(group)
            notes.append(f"group `{group}` (classic WronAI) is not used by this pipeline and was ignored")
    for (group, old), target in LEGACY_KEYS.items():
        section = raw.get(group)
        if not isinstance(section, dict) or old not in section:
            continue
        value = section.pop(old)
        if target is None:
            notes.append(f"`{group}.{old}` ignored: {_DROP_REASON.get((group, old), 'not used')}")
            continue
        note = _move(raw, (group, old), target, _converted((group, old), value))
        if note:
            notes.append(note)
    return notes


def _converted(old: tuple[str, str], value: Any) -> Any:
    """An old key's value in the new key's unit (MiB as text, a percentage as a fraction)."""
    if old == ("hardware", "max_memory_mb") and value is not None:
        return f"{value}MiB"
    if old == ("data", "validation_split_percentage") and isinstance(value, (int, float)):
        return value / 100
    return value


def _move(raw: dict, old: tuple[str, str], new: tuple[str, str], value: Any) -> str | None:
    """Put an old key's value under its new key unless that is set already; the note to give, if any."""
    dest = raw.setdefault(new[0], {})
    if not isinstance(dest, dict):
        return None
    if new[1] in dest and new != old:
        return f"`{old[0]}.{old[1]}` ignored because `{new[0]}.{new[1]}` is also set"
    dest[new[1]] = value
    if new != old:
        return f"`{old[0]}.{old[1]}` is an old name — mapped to `{new[0]}.{new[1]}`"
    return None
