"""Reading YAML as WronAI does: PyYAML's safe loader, keeping the text of every retyped scalar.

YAML 1.1 (PyYAML) turns some unquoted text into other types: ``no``/``off`` into False, ``0755`` into the
octal 493, ``12:30`` into the base-60 750, ``2024-01-01`` into a date. ``parse`` keeps the text as written
next to each such value (``Plain``), so ``wronai.config.settle`` can decide from the key's schema type what
the user meant. ``read_yaml`` reads a config file, each problem as one line naming the fix.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wronai.errors import ConfigError


@dataclass(frozen=True)
class Plain:
    """An unquoted YAML scalar that YAML 1.1 made into a non-string (`no` -> False), with the text as written."""

    value: Any
    text: str


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping (YAML itself would silently keep the last one)."""

    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader, keeping the text of every unquoted scalar it would turn into a non-string.

    Keys are always the text as written (`on:` is the key 'on', not True); a key given twice in one mapping
    is an error instead of the first one being silently dropped.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(None, None, "expected a mapping", node.start_mark)
        _check_unique_keys(node)
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
            else:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        "found unhashable key",
                        key_node.start_mark,
                    )
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


def _check_unique_keys(node: yaml.MappingNode) -> None:
    """Raise DuplicateKey for the first scalar key written twice in this mapping (merge keys aside)."""
    first: dict[str, yaml.Node] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in first:
                line = first[key_node.value].start_mark.line + 1
                raise DuplicateKey(
                    f"`{key_node.value}` is given twice (first at line {line}) — YAML would silently keep "
                    "only the last one; merge the two",
                    key_node.start_mark,
                )
            first[key_node.value] = key_node


def _keep_text(base: Any) -> Any:
    def construct(loader: Loader, node: yaml.ScalarNode) -> Any:
        value = base(loader, node)
        return Plain(value, node.value) if node.style is None else value

    return construct


for _tag in ("bool", "int", "float", "null", "timestamp"):
    Loader.add_constructor(
        f"tag:yaml.org,2002:{_tag}", _keep_text(getattr(yaml.SafeLoader, f"construct_yaml_{_tag}"))
    )


# a lone `=` or `<<` value is text (PyYAML has no constructor for the 1.1 `value` and `merge` tags there)
def _as_text(loader: Loader, node: yaml.ScalarNode) -> str:
    return str(loader.construct_scalar(node))


for _tag in ("value", "merge"):
    Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _as_text)


def parse(text: str) -> Any:
    """YAML text as WronAI reads it: like ``yaml.safe_load``, with `Plain` where YAML 1.1 retyped a scalar."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 — a SafeLoader subclass


def read_yaml(path: Path | None) -> dict:
    """The top-level mapping of a config file; a ConfigError with one line per problem otherwise."""
    text = _read_text(path)
    try:
        raw = parse(text)
        raw = raw.value if isinstance(raw, Plain) else raw
    except yaml.YAMLError as err:
        raise ConfigError([_syntax_problem(err)], str(path)) from None
    if raw is None:
        raise ConfigError(["the file is empty — start from configs/default.yaml"], str(path))
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"the top level must be a mapping of groups (model:, data:, ...), got {type(raw).__name__}"],
            str(path),
        )
    return raw


def _read_text(path: Path | None) -> str:
    if path is None:
        raise ConfigError(["no config given — pass a YAML file, e.g. configs/default.yaml"])
    if not path.exists():
        raise ConfigError(
            [f"config file not found: {path} — check the path (configs/ holds the shipped ones)"]
        )
    if path.is_dir():
        raise ConfigError([f"{path} is a directory — pass a YAML file inside it"])
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path} is not UTF-8 text (byte {err.start}) — save it as UTF-8"]) from None


def _syntax_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if isinstance(err, DuplicateKey):
        return f"line {err.problem_mark.line + 1}: {problem}"
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"YAML syntax error at{where}: {problem} — fix the indentation/quoting there"
