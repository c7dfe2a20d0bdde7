"""Loading a YAML config: legacy keys, `--set` overrides, path resolution and one-line errors.

``load_config`` is the only entry point. It never loads a model; every problem it finds is reported at once,
one line per problem, naming the dotted key, the bad value and the fix.

YAML 1.1 (PyYAML) turns some unquoted text into other types: ``no``/``off`` into False, ``0755`` into the
octal 493, ``12:30`` into the base-60 750, ``2024-01-01`` into a date. The loader keeps the text as written
next to each such value (``_Plain``) and ``settle`` decides, from the schema type of the key, what the user
meant: the text for text keys, the off choice for strategy keys, the decimal number for number keys — or a
one-line problem where no reading is safe. ``--set key=value`` values and ``data=`` dicts go the same way.
"""

from __future__ import annotations

import decimal
import difflib
import logging
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from wronai.config.schema import WronAIConfig, annotation_parts, switch_words
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

# Legacy keys whose value migrate_legacy converts: read as this type, not as the target key's type.
_LEGACY_TYPES: dict[tuple[str, str], Any] = {
    ("hardware", "max_memory_mb"): float | None,
    ("data", "validation_split_percentage"): float | None,
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
    where = str(source) if source else None
    raw = _read_yaml(source) if data is None else _deepcopy(data)
    problems: list[str] = []
    for item in overrides or []:
        problem = apply_override(raw, item)
        if problem:
            problems.append(problem)
    settled = settle(raw)
    notes = settled.notes + migrate_legacy(raw)
    if problems:
        raise ConfigError(problems, where)
    base_dir = source.resolve().parent if source else Path.cwd()
    try:
        config = WronAIConfig.model_validate(raw)
    except ValidationError as err:
        reported = set(settled.problems)
        lines = [line for key, line in _problem_lines(err) if key not in reported]
        raise ConfigError(list(settled.problems.values()) + lines, where) from None
    if settled.problems:
        raise ConfigError(list(settled.problems.values()), where)
    resolve_paths(config, base_dir)
    return LoadedConfig(config=config, notes=notes, source=source)


def _deepcopy(data: dict) -> dict:
    """A copy of an already-parsed config, read back as WronAI reads a file (so `data=` and files agree)."""
    copy = _parse(yaml.safe_dump(data))
    return copy if isinstance(copy, dict) else {}


@dataclass(frozen=True)
class _Plain:
    """An unquoted YAML scalar that YAML 1.1 made into a non-string (`no` -> False), with the text as written."""

    value: Any
    text: str


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, keeping the text of every unquoted scalar it would turn into a non-string.

    Keys are always the text as written (`on:` is the key 'on', not True); a key given twice in one mapping
    is an error instead of the first one being silently dropped.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(None, None, "expected a mapping", node.start_mark)
        first: dict[str, yaml.Node] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in first:
                    line = first[key_node.value].start_mark.line + 1
                    raise _DuplicateKey(
                        f"`{key_node.value}` is given twice (first at line {line}) — YAML would silently keep "
                        "only the last one; merge the two",
                        key_node.start_mark,
                    )
                first[key_node.value] = key_node
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


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


def _keep_text(base: Any) -> Any:
    def construct(loader: _Loader, node: yaml.ScalarNode) -> Any:
        value = base(loader, node)
        return _Plain(value, node.value) if node.style is None else value

    return construct


for _tag in ("bool", "int", "float", "null", "timestamp"):
    _Loader.add_constructor(
        f"tag:yaml.org,2002:{_tag}", _keep_text(getattr(yaml.SafeLoader, f"construct_yaml_{_tag}"))
    )


# a lone `=` or `<<` value is text (PyYAML has no constructor for the 1.1 `value` and `merge` tags there)
def _as_text(loader: _Loader, node: yaml.ScalarNode) -> str:
    return str(loader.construct_scalar(node))


for _tag in ("value", "merge"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _as_text)


def _parse(text: str) -> Any:
    """YAML text as WronAI reads it: like ``yaml.safe_load``, with `_Plain` where YAML 1.1 retyped a scalar."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 — a SafeLoader subclass


@dataclass
class Settled:
    """What `settle` decided: notes on values read differently than YAML 1.1 would, and problems by key."""

    notes: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)


_LEADING_ZERO = re.compile(r"[-+]?0[0-7_]+")
_EXPONENT = re.compile(r"[-+]?(\d[\d_]*)?\.?\d*[eE][-+]?\d+")


def settle(raw: dict) -> Settled:
    """Replace every `_Plain` in ``raw`` (in place) by what the user meant, judged by the key's schema type.

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
        annotation: Any = Any
        if key in model.model_fields:
            annotation = model.model_fields[key].annotation
        elif (prefix, key) in _LEGACY_TYPES:
            annotation = _LEGACY_TYPES[(prefix, key)]
        elif (target := LEGACY_KEYS.get((prefix, str(key)))) is not None:
            group = WronAIConfig.model_fields.get(target[0])
            section = _submodel(group.annotation) if group is not None else None
            if section is not None and target[1] in section.model_fields:
                annotation = section.model_fields[target[1]].annotation
        node[key] = _settle(value, annotation, dotted, settled)


def _settle(value: Any, annotation: Any, key: str, settled: Settled) -> Any:
    parts = annotation_parts(annotation)
    if isinstance(value, dict):
        model = _submodel(annotation)
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
    if not isinstance(value, _Plain):
        return value
    if annotation is Any or value.value is None:
        return value.value
    return _decide(value, annotation, parts, key, settled)


def _decide(plain: _Plain, annotation: Any, parts: tuple[Any, ...], key: str, settled: Settled) -> Any:
    value, text = plain.value, plain.text
    if isinstance(value, bool):
        off, on = switch_words(annotation)
        if bool in parts or (off is not None and value is False) or (on is not None and value is True):
            return value
        return text
    if isinstance(value, (int, float)):
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
    return text  # a date or time: the text as written (a text key takes it, other keys report it)


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
        raw = _parse(text)
        raw = raw.value if isinstance(raw, _Plain) else raw
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if isinstance(err, _DuplicateKey):
            raise ConfigError([f"line {err.problem_mark.line + 1}: {problem}"], str(path)) from None
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
        # parsed like a value in the file, so `--set training.eval_strategy=no` is `eval_strategy: no`
        value = _parse(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None or (isinstance(child, _Plain) and child.value is None):
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
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]  # as YAML spells them
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _takes_null(key: str) -> bool:
    section = _section_for(key)
    name = key.rpartition(".")[2]
    if section is None or name not in section.model_fields:
        return False
    return type(None) in annotation_parts(section.model_fields[name].annotation)


def format_validation_errors(err: ValidationError) -> list[str]:
    """One line per problem: `dotted.key`: what is wrong — how to fix it."""
    return [line for _, line in _problem_lines(err)]


_NO_VALUE = "has no value (YAML reads an empty value, null and ~ as none)"


def _problem_lines(err: ValidationError) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
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
            if _takes_null(key):
                expected += ", or null"
            if value is None:
                line = f"`{key}` {_NO_VALUE} — use one of {expected}"
            else:
                line = f"`{key}`: {_short(value)} is not allowed — use one of {expected}"
        elif kind in ("float_parsing", "float_type", "int_parsing", "int_type", "int_from_float"):
            want = "a whole number" if kind.startswith("int") else "a number (e.g. 2e-4)"
            if value is None:
                line = f"`{key}` {_NO_VALUE} — write {want}"
            else:
                line = f"`{key}`: {_short(value)} is not {want} — write {want}"
        elif kind in ("string_type", "list_type"):
            want = "a list" if kind == "list_type" else "text"
            if value is None:
                line = f"`{key}` {_NO_VALUE} — write {want} (quoted, e.g. 'null', if you mean that word)"
            else:
                line = f"`{key}`: {_short(value)} has the wrong type — write {want}"
        elif kind in ("bool_parsing", "bool_type"):
            if value is None:
                line = f"`{key}` {_NO_VALUE} — write true or false"
            else:
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
        lines.append((key, line))
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
