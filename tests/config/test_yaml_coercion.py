"""YAML 1.1 coercions: an unquoted value means what the user wrote, or gives one line naming the key and the fix.

Every case runs twice: written unquoted in a YAML file, and given as `--set key=text` on the command line;
both must give the same result. See the "YAML 1.1" paragraph in docs/configuration.md for the rules.
"""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import BaseModel

from wronai.config import dump_config, load_config, load_config_with_notes
from wronai.config.annotations import annotation_parts
from wronai.config.schema import WronAIConfig
from wronai.errors import ConfigError

BASE = {"model": {"name": "org/model"}, "data": {"dataset_name": "org/dataset"}}
VIA = ("file", "set")


def _emit(tree: dict, indent: int = 0) -> list[str]:
    """YAML text for a nested dict whose leaves are raw YAML text, written unquoted as given."""
    lines = []
    for key, value in tree.items():
        if isinstance(value, dict):
            lines += [f"{' ' * indent}{key}:", *_emit(value, indent + 2)]
        else:
            lines.append(f"{' ' * indent}{key}: {value}")
    return lines


def load(key: str, text: str, via: str, tmp_path) -> Any:
    """Load BASE plus `key: text`, written in the file or given as --set (then the file holds only BASE)."""
    tree = {group: dict(values) for group, values in BASE.items()}
    if via == "file":
        *groups, name = key.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[name] = text
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(_emit(tree)) + "\n", encoding="utf-8")
    return load_config_with_notes(path, [f"{key}={text}"] if via == "set" else None)


def attr(config: WronAIConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# (key, YAML text, attribute to read (None = key), expected value)
ACCEPTED = [
    # strategy keys: YAML's false is the off choice
    *[("training.eval_strategy", t, None, "no") for t in ("no", "No", "NO", "off", "OFF", "false", "False")],
    ("training.save_strategy", "no", None, "no"),
    ("training.save_strategy", "off", None, "no"),
    ("training.evaluation_strategy", "no", "training.eval_strategy", "no"),  # the old name
    ("training.logging_strategy", "no", None, "no"),
    ("training.save_strategy", "off", None, "no"),
    ("training.eval_strategy", "epoch", None, "epoch"),
    # other keys whose choices include none/off/on
    ("lora.bias", "no", None, "none"),
    ("lora.bias", "false", None, "none"),
    ("hardware.distributed", "off", None, "none"),
    ("polish.normalize.dedupe", "no", None, "none"),
    ("logging.report_to", "no", None, ["none"]),
    ("logging.report_to", "[tensorboard, off]", None, ["tensorboard", "none"]),
    ("hardware.fused_lora", "on", None, "on"),
    ("hardware.fused_lora", "yes", None, "on"),
    ("hardware.fused_lora", "true", None, "on"),
    ("hardware.fused_lora", "off", None, "off"),
    ("hardware.return_freed_memory", "no", None, "off"),
    # boolean keys: the boolean
    ("data.packing", "yes", None, True),
    ("data.packing", "off", None, False),
    ("training.gradient_checkpointing", "on", None, True),
    ("hardware.pin_memory", "no", None, False),
    ("training.dataloader_pin_memory", "off", "hardware.pin_memory", False),  # old name, moved group
    # text keys: the text as written
    ("data.dataset_config", "no", None, "no"),  # Norwegian
    ("data.train_split", "on", None, "on"),
    ("data.text_column", "Yes", None, "Yes"),
    ("data.train_split", "2024-01-01", None, "2024-01-01"),
    ("data.columns", "{output: no, on: tekst}", None, {"output": "no", "on": "tekst"}),
    ("model.revision", "0755", None, "0755"),
    ("model.revision", "1234567", None, "1234567"),
    ("model.revision", "1_000", None, "1_000"),
    ("model.revision", "1.0", None, "1.0"),
    ("model.revision", "2024-01-01 12:00:00", None, "2024-01-01 12:00:00"),
    ("model.name", "=", None, "="),
    ("logging.wandb_run_name", "12:30", None, "12:30"),
    ("logging.wandb_project", "0x1F", None, "0x1F"),
    ("lora.target_modules", "[on, off, q_proj]", None, ["on", "off", "q_proj"]),
    ("polish.special_tokens", "[yes, no]", None, ["yes", "no"]),
    ("hardware.max_memory", "{0: 7000, cpu: 30GiB}", None, {"0": "7000", "cpu": "30GiB"}),
    ("hardware.max_memory_mb", "7_000", "hardware.max_memory", "7000MiB"),  # a number there (old key)
    # number keys
    ("training.seed", "0042", None, 42),  # decimal, not the octal 34 (noted)
    ("training.seed", "-0042", None, -42),
    ("training.seed", "0x1F", None, 31),  # explicit hex stays hex
    ("training.seed", "0", None, 0),
    ("training.max_steps", "1_000", None, 1000),
    ("training.max_steps", "1e3", None, 1000),  # PyYAML leaves 1e3 as text; a whole number is whole
    ("training.max_steps", "1.0e3", None, 1000),
    ("training.save_total_limit", "2e1", None, 20),
    ("training.learning_rate", "1e-4", None, 1e-4),  # text to PyYAML, a number to the float key
    ("training.learning_rate", "1.0e-4", None, 1e-4),
    ("training.learning_rate", "2E-4", None, 2e-4),
    ("lora.lora_alpha", "0016", None, 16.0),
    # null where the key takes null
    ("model.revision", "null", None, None),
    ("model.revision", "~", None, None),
    ("data.eval_split", "Null", None, None),
    ("hardware.pin_memory", "~", None, None),
]


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize(
    ("key", "text", "read", "expected"), ACCEPTED, ids=[f"{c[0]}: {c[1]}" for c in ACCEPTED]
)
def test_unquoted_value_means_what_was_written(tmp_path, via, key, text, read, expected):
    config = load(key, text, via, tmp_path).config
    value = attr(config, read or key)
    assert value == expected and type(value) is type(expected), (value, expected)


@pytest.mark.parametrize("via", VIA)
def test_leading_zero_number_is_decimal_and_noted(tmp_path, via):
    notes = load("training.seed", "0042", via, tmp_path).notes
    assert any("`training.seed`: 0042 read as the decimal 42" in n and "octal: 34" in n for n in notes), notes
    for plain in ("42", "0x1F", "0"):
        assert not any("octal" in n for n in load("training.seed", plain, via, tmp_path).notes)


# (key, YAML text, the one problem line must contain this)
REJECTED = [
    # a boolean where it is not one of the choices: the problem shows the word as written
    (
        "training.eval_strategy",
        "yes",
        "`training.eval_strategy`: 'yes' is not allowed — use one of 'no', 'steps'",
    ),
    ("training.eval_strategy", "on", "`training.eval_strategy`: 'on' is not allowed"),
    ("training.save_strategy", "True", "`training.save_strategy`: 'True' is not allowed"),
    ("lora.bias", "yes", "`lora.bias`: 'yes' is not allowed — use one of 'none'"),
    ("logging.report_to", "yes", "`logging.report_to[0]`: 'yes' is not allowed"),
    ("data.format", "no", "`data.format`: 'no' is not allowed — use one of 'auto'"),
    (
        "polish.normalize.language",
        "no",
        "`polish.normalize.language`: 'no' is not allowed — use one of 'pl', or null",
    ),
    ("training.max_steps", "no", "`training.max_steps`: 'no' is not a whole number"),  # not 0
    ("training.warmup_steps", "off", "`training.warmup_steps`: 'off' is not a whole number"),
    ("training.learning_rate", "on", "`training.learning_rate`: 'on' is not a number"),  # not 1.0
    ("lora.lora_alpha", "yes", "`lora.lora_alpha`: 'yes' is not a number"),
    # base-60 numbers
    ("training.save_steps", "1:30", "`training.save_steps`: 1:30 is a base-60 number to YAML 1.1 (90)"),
    ("training.learning_rate", "1:30.5", "`training.learning_rate`: 1:30.5 is a base-60 number"),
    # not whole / not a number
    ("training.max_steps", "1e-4", "`training.max_steps`: '1e-4' is not a whole number"),
    ("training.max_steps", "2024-01-01", "`training.max_steps`: '2024-01-01' is not a whole number"),
    ("training.max_steps", "1e999999999", "`training.max_steps`: '1e999999999' is not a whole number"),
    # null where the key does not take null
    (
        "training.eval_strategy",
        "null",
        "`training.eval_strategy` has no value (YAML reads an empty value, null",
    ),
    ("data.train_split", "~", "`data.train_split` has no value"),
    ("logging.wandb_project", "null", "`logging.wandb_project` has no value"),
    ("training.max_steps", "~", "`training.max_steps` has no value"),
    ("data.packing", "null", "`data.packing` has no value"),
]


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize(("key", "text", "fragment"), REJECTED, ids=[f"{c[0]}: {c[1]}" for c in REJECTED])
def test_unreadable_value_gives_one_line_naming_the_key(tmp_path, via, key, text, fragment):
    with pytest.raises(ConfigError) as info:
        load(key, text, via, tmp_path)
    problems = info.value.problems
    assert len(problems) == 1 and fragment in problems[0], problems
    assert "\n" not in problems[0] and "Traceback" not in str(info.value)
    fix = problems[0].split(" — ", 1)[1]
    assert f"'{text}'" not in fix.split("(")[0], f"the fix suggests what was written: {problems[0]}"


def _literal_fields(model: type[BaseModel], prefix: str) -> list[tuple[str, list[str], bool]]:
    """(dotted key, string choices, is a list) for every field of the schema with Literal choices."""
    found = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        for part in annotation_parts(field.annotation):
            if isinstance(part, type) and issubclass(part, BaseModel):
                found += _literal_fields(part, key)
        choices, is_list = [], False
        for part in annotation_parts(field.annotation):
            in_list = typing.get_origin(part) is list
            for member in annotation_parts(typing.get_args(part)[0] if in_list else part):
                if typing.get_origin(member) is typing.Literal:
                    choices += [c for c in typing.get_args(member) if isinstance(c, str)]
                    is_list = is_list or in_list
        if choices:
            found.append((key, choices, is_list))
    return found


LITERALS = _literal_fields(WronAIConfig, "")
OFF_TEXT = ("no", "No", "NO", "off", "Off", "OFF", "false", "False", "FALSE")
ON_TEXT = ("on", "On", "ON", "yes", "Yes", "YES", "true", "True", "TRUE")


def test_schema_scan_finds_the_switch_fields():
    with_off = {key for key, choices, _ in LITERALS if {"no", "none", "off"} & set(choices)}
    assert {
        "training.eval_strategy",
        "training.save_strategy",
        "lora.bias",
        "logging.report_to",
        "hardware.distributed",
        "hardware.fused_lora",
        "hardware.return_freed_memory",
        "polish.normalize.dedupe",
    } <= with_off


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize(("key", "choices", "is_list"), LITERALS, ids=[f[0] for f in LITERALS])
def test_every_choice_of_every_field_can_be_written_unquoted(tmp_path, via, key, choices, is_list):
    """No choice is refused when written as it is documented (the `eval_strategy: no` bug, for every field)."""
    off = next((w for w in ("no", "none", "off") if w in choices), None)
    cases = [(c, c) for c in choices]
    if off is not None:
        cases += [(t, off) for t in OFF_TEXT]
    if "on" in choices:
        cases += [(t, "on") for t in ON_TEXT]
    for text, expected in cases:
        value = attr(load(key, text, via, tmp_path).config, key)
        assert value == ([expected] if is_list else expected), (key, text, value)


def test_python_booleans_in_data_dicts_read_like_the_file():
    raw = {
        **BASE,
        "training": {"eval_strategy": False, "save_strategy": False},
        "hardware": {"fused_lora": True},
        "logging": {"report_to": False},
    }
    cfg = load_config(data=raw)
    assert (cfg.training.eval_strategy, cfg.training.save_strategy) == ("no", "no")
    assert cfg.hardware.fused_lora == "on" and cfg.logging.report_to == ["none"]
    cfg = load_config(data={**BASE, "model": {"name": "org/model", "revision": 1234567}})
    assert cfg.model.revision == "1234567"  # like `revision: 1234567` in a file


TRICKY = """\
model:
  name: org/model
  revision: 0755
data:
  dataset_name: org/dataset
  dataset_config: no
  train_split: 2024-01-01
  columns: {output: yes, on: tekst}
training:
  eval_strategy: no
  save_strategy: off
  seed: 0042
logging:
  wandb_run_name: 12:30
  report_to: no
hardware:
  fused_lora: on
"""


def test_resolved_config_round_trips(tmp_path):
    """The saved run config (dump_config) loads back to the same values: quoting survives the round trip."""
    first = tmp_path / "first.yaml"
    first.write_text(TRICKY, encoding="utf-8")
    cfg = load_config(first)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(again).model_dump() == cfg.model_dump()
    assert cfg.data.dataset_config == "no" and cfg.data.columns == {"output": "yes", "on": "tekst"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "model: {name: a}\ndata: {dataset_name: b}\nmodel: {name: c}\n",
            "line 3: `model` is given twice (first at line 1)",
        ),
        (
            "model:\n  name: a\n  name: b\ndata: {dataset_name: b}\n",
            "line 3: `name` is given twice (first at line 2)",
        ),
        (
            "model: {name: a}\ndata: {dataset_name: b}\ntraining: {yes: 1, Yes: 2}\n",
            "unknown key `training.yes`",
        ),
    ],
)
def test_duplicate_keys_are_an_error_not_silently_dropped(tmp_path, text, fragment):
    path = tmp_path / "dup.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(fragment in p for p in info.value.problems), info.value.problems


def test_merge_keys_may_override(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "model: {name: a}\ndata: {dataset_name: b}\n"
        "base: &base {eval_strategy: no, save_strategy: no, max_steps: 5}\n"
        "training:\n  <<: *base\n  max_steps: 7\n".replace("base: &base", "x-base: &base"),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="unknown key `x-base`"):
        load_config(path)  # the anchor holder itself is an unknown group
    path.write_text(
        "model: {name: a}\ndata: {dataset_name: b}\n"
        "training:\n  <<: {eval_strategy: no, save_strategy: no, max_steps: 5}\n  max_steps: 7\n",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert (cfg.training.eval_strategy, cfg.training.save_strategy, cfg.training.max_steps) == ("no", "no", 7)


def test_settle_problems_and_schema_problems_come_together_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {name: a}\ndata: {dataset_name: b}\ntraining: {save_steps: 1:30}\nlora: {rnak: 8}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 2, problems  # no second line for save_steps from the schema check
    assert any("base-60" in p for p in problems) and any("`lora.rnak`" in p for p in problems)


def test_set_into_an_empty_group(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: a}\ndata: {dataset_name: b}\ntraining:\n", encoding="utf-8")
    assert load_config(path, ["training.max_steps=3", "training.eval_strategy=no"]).training.max_steps == 3
