"""Loading a YAML config: read, `--set` overrides, YAML 1.1 values settled, legacy keys, validation, paths.

``load_config`` is the only entry point. It never loads a model; every problem it finds is reported at once,
one line per problem, naming the dotted key, the bad value and the fix. The steps live in their own modules:
``yaml_file`` (reading, keeping the text of retyped scalars), ``overrides`` (`--set`), ``settle`` (what a
retyped value meant), ``legacy`` (classic WronAI keys), ``problems`` (one-line errors) and ``paths``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from wronai.config.legacy import migrate_legacy
from wronai.config.overrides import apply_override
from wronai.config.paths import resolve_paths
from wronai.config.problems import problem_lines
from wronai.config.schema import WronAIConfig
from wronai.config.settle import settle
from wronai.config.yaml_file import parse, read_yaml
from wronai.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class LoadedConfig:
    """A validated config plus the notes (legacy keys mapped, groups ignored) made while loading it."""

    config: WronAIConfig
    notes: list[str] = field(default_factory=list)
    source: Path | None = None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, data: dict | None = None
) -> WronAIConfig:
    """Load, migrate and validate a config file (or an already-parsed ``data`` dict)."""
    loaded = load_config_with_notes(path, overrides, data=data)
    for note in loaded.notes:
        logger.info("config: %s", note)
    return loaded.config


def load_config_with_notes(
    path: str | Path | None = None, overrides: list[str] | None = None, *, data: dict | None = None
) -> LoadedConfig:
    """Like ``load_config``, returning the notes made while loading instead of logging them."""
    source = Path(path) if path is not None else None
    where = str(source) if source else None
    raw = read_yaml(source) if data is None else _deepcopy(data)
    problems = [p for p in (apply_override(raw, item) for item in overrides or []) if p]
    settled = settle(raw)
    notes = settled.notes + migrate_legacy(raw)
    if problems:
        raise ConfigError(problems, where)
    base_dir = source.resolve().parent if source else Path.cwd()
    try:
        config = WronAIConfig.model_validate(raw)
    except ValidationError as err:
        reported = set(settled.problems)
        lines = [line for key, line in problem_lines(err) if key not in reported]
        raise ConfigError(list(settled.problems.values()) + lines, where) from None
    if settled.problems:
        raise ConfigError(list(settled.problems.values()), where)
    resolve_paths(config, base_dir)
    return LoadedConfig(config=config, notes=notes, source=source)


def _deepcopy(data: dict) -> dict:
    """A copy of an already-parsed config, read back as WronAI reads a file (so `data=` and files agree)."""
    copy = parse(yaml.safe_dump(data))
    return copy if isinstance(copy, dict) else {}


def dump_config(config: WronAIConfig) -> str:
    """The resolved config as YAML (every key, defaults included), loadable by ``load_config``."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
