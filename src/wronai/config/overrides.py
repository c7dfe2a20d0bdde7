"""`--set dotted.key=value` overrides, applied to the parsed config before it is validated."""

from __future__ import annotations

import yaml

from wronai.config.yaml_file import Plain, parse


def apply_override(raw: dict, item: str) -> str | None:
    """Apply one ``dotted.key=value`` override in place; return a problem line or None."""
    if "=" not in item:
        return f"bad --set {item!r} — write --set dotted.key=value, e.g. --set training.max_steps=10"
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        return f"bad --set {item!r} — the key before '=' is empty"
    try:
        # parsed like a value in the file, so `--set training.eval_strategy=no` is `eval_strategy: no`
        value = parse(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None or (isinstance(child, Plain) and child.value is None):
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"bad --set {item!r} — `{part}` is a value, not a group"
        node = child
    node[parts[-1]] = value
    return None
