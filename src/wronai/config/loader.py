"""Loading a YAML config: legacy keys, `--set` overrides, path resolution and one-line errors.

``load_config`` is the only entry point. It never loads a model; every problem it finds is reported at once,
one line per problem, naming the dotted key, the bad value and the fix.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from wronai.config.schema import WronAIConfig
from wronai.errors import ConfigError

logger = logging.getLogger(__name__)

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

_DROP_REASON = {
    ("training", "remove_unused_columns"): "WronAI always keeps exactly the columns the model needs",
    ("polish", "polish_stopwords"): "stopword removal harms language-model training",
    ("polish", "morphological_analysis"): "the pipeline does not use it",
}


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
    source = Path(path) if path is not None else None
    raw = _read_yaml(source) if data is None else _deepcopy(data)
    problems: list[str] = []
    for item in overrides or []:
        problem = apply_override(raw, item)
        if problem:
            problems.append(problem)
    notes = migrate_legacy(raw)
    if problems:
        raise ConfigError(problems, str(source) if source else None)
    base_dir = source.resolve().parent if source else Path.cwd()
    try:
        config = WronAIConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_errors(err), str(source) if source else None) from None
    resolve_paths(config, base_dir)
    return LoadedConfig(config=config, notes=notes, source=source)


def _deepcopy(data: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(data))


def _read_yaml(path: Path | None) -> dict:
    if path is None:
        raise ConfigError(["no config given — pass a YAML file, e.g. configs/default.yaml"])
    if not path.exists():
        raise ConfigError(
            [f"config file not found: {path} — check the path (configs/ holds the shipped ones)"]
        )
    if path.is_dir():
        raise ConfigError([f"{path} is a directory — pass a YAML file inside it"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path} is not UTF-8 text (byte {err.start}) — save it as UTF-8"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            [f"YAML syntax error at{where}: {problem} — fix the indentation/quoting there"], str(path)
        ) from None
    if raw is None:
        raise ConfigError(["the file is empty — start from configs/default.yaml"], str(path))
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"the top level must be a mapping of groups (model:, data:, ...), got {type(raw).__name__}"],
            str(path),
        )
    return raw


def apply_override(raw: dict, item: str) -> str | None:
    """Apply one ``dotted.key=value`` override in place; return a problem line or None."""
    if "=" not in item:
        return f"bad --set {item!r} — write --set dotted.key=value, e.g. --set training.max_steps=10"
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        return f"bad --set {item!r} — the key before '=' is empty"
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"bad --set {item!r} — `{part}` is a value, not a group"
        node = child
    node[parts[-1]] = value
    return None


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
        new_group, new_key = target
        if (group, old) == ("hardware", "max_memory_mb") and value is not None:
            value = f"{value}MiB"
        if (group, old) == ("data", "validation_split_percentage") and isinstance(value, (int, float)):
            value = value / 100
        dest = raw.setdefault(new_group, {})
        if not isinstance(dest, dict):
            continue
        if new_key in dest and (new_group, new_key) != (group, old):
            notes.append(f"`{group}.{old}` ignored because `{new_group}.{new_key}` is also set")
            continue
        dest[new_key] = value
        if (new_group, new_key) != (group, old):
            notes.append(f"`{group}.{old}` is an old name — mapped to `{new_group}.{new_key}`")
    return notes


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
            annotation = fields[item].annotation
            current = _submodel(annotation)
        elif current is not None and not parts:
            parts.append(str(item))
            current = None
        elif current is not None:
            # extra (unknown) key directly under a model
            parts.append(str(item))
            current = None
        # else: a union tag such as 'str' or 'list[str]' — skip it
    return ".".join(parts), current


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _section_for(key: str) -> type[BaseModel] | None:
    model: type[BaseModel] | None = WronAIConfig
    for part in key.split(".")[:-1]:
        if model is None or part not in model.model_fields:
            return None
        model = _submodel(model.model_fields[part].annotation)
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
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation_errors(err: ValidationError) -> list[str]:
    """One line per problem: `dotted.key`: what is wrong — how to fix it."""
    lines: list[str] = []
    seen: set[str] = set()
    for e in err.errors():
        key, _ = _walk(WronAIConfig, tuple(e["loc"]))
        kind = e["type"]
        value = e.get("input")
        if kind == "extra_forbidden":
            line = f"unknown key `{key}` — {_suggest(key)}"
        elif kind == "missing":
            group, _, name = key.rpartition(".")
            where = f"the `{group}` group" if group else "the top level"
            line = f"`{key}` is required — add `{name}:` to {where}"
        elif kind.startswith("literal_error"):
            expected = e.get("ctx", {}).get("expected", "")
            line = f"`{key}`: {_short(value)} is not allowed — use one of {expected}"
        elif kind in ("float_parsing", "float_type", "int_parsing", "int_type", "int_from_float"):
            want = "a whole number" if kind.startswith("int") else "a number (e.g. 2e-4)"
            line = f"`{key}`: {_short(value)} is not {want} — write {want}"
        elif kind in ("string_type", "list_type"):
            line = f"`{key}`: {_short(value)} has the wrong type — write {'a list' if kind == 'list_type' else 'text'}"
        elif kind in ("bool_parsing", "bool_type"):
            line = f"`{key}`: {_short(value)} is not true/false — write true or false"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            line = f"`{key}`: {_short(value)} is out of range — {e['msg'].replace('Input should be', 'it must be')}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            line = f"`{key}` must be a group of keys (a mapping), got {_short(value)} — indent its keys under `{key}:`"
        elif kind == "value_error":
            message = e["msg"].removeprefix("Value error, ")
            line = f"`{key}`: {message}" if key else message
        else:
            line = f"`{key}`: {_short(value)} — {e['msg']}"
        if key in seen and kind not in ("extra_forbidden", "missing"):
            continue  # union branches report the same key several times; the first line is enough
        seen.add(key)
        lines.append(line)
    return lines


def _resolve(path_text: str, base_dir: Path) -> str:
    """A path relative to the config file's directory if it exists there, else to the working directory."""
    p = Path(path_text).expanduser()
    if p.is_absolute():
        return str(p)
    for root in (base_dir, Path.cwd()):
        candidate = root / p
        if candidate.exists():
            return str(candidate.resolve())
    return path_text


def resolve_paths(config: WronAIConfig, base_dir: Path) -> None:
    """Make local file paths absolute so the saved config works from anywhere; Hub ids stay as written."""
    model = config.model
    model.name = _resolve(model.name, base_dir)
    if model.create_if_missing is not None:
        spec = model.create_if_missing
        spec.tokenizer_data = [_resolve(p, base_dir) for p in spec.tokenizer_data]
        if not Path(model.name).is_absolute():
            model.name = str((Path.cwd() / model.name).resolve())
    if config.polish.extend_vocab is not None:
        config.polish.extend_vocab.data = [_resolve(p, base_dir) for p in config.polish.extend_vocab.data]
    if config.hardware.distributed_config:
        config.hardware.distributed_config = _resolve(config.hardware.distributed_config, base_dir)
    ext = config.extensions
    ext.tokenizer_hook = _resolve_hook(ext.tokenizer_hook, base_dir)
    ext.data_hook = _resolve_hook(ext.data_hook, base_dir)
    ext.callbacks = [h for h in (_resolve_hook(c, base_dir) for c in ext.callbacks) if h]
    names = config.data.dataset_name
    if isinstance(names, list):
        config.data.dataset_name = [_resolve(n, base_dir) for n in names]
    else:
        config.data.dataset_name = _resolve(names, base_dir)


def _resolve_hook(spec: str | None, base_dir: Path) -> str | None:
    """`file.py:name` hooks are resolved like other paths; `package.module:name` stays as written."""
    if spec is None:
        return None
    target, sep, attr = spec.rpartition(":")
    if sep and target.endswith(".py"):
        return f"{_resolve(target, base_dir)}:{attr}"
    return spec


def dump_config(config: WronAIConfig) -> str:
    """The resolved config as YAML (every key, defaults included), loadable by ``load_config``."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
