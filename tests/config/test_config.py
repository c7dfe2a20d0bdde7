"""Configuration: shipped YAMLs load, classic configs migrate, every bad value gives one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wronai.config import dump_config, load_config, load_config_with_notes
from wronai.config.docs import render_reference
from wronai.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))

BASE = {"model": {"name": "org/model"}, "data": {"dataset_name": "org/dataset"}}


def with_(**groups) -> dict:
    cfg = {k: dict(v) for k, v in BASE.items()}
    for group, values in groups.items():
        if isinstance(values, dict):
            cfg.setdefault(group, {}).update(values)
        else:
            cfg[group] = values
    return cfg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.name
    # the resolved config round-trips through YAML
    again = load_config(data=yaml.safe_load(dump_config(cfg)))
    assert again.model_dump() == cfg.model_dump()


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "offline_demo.yaml"} <= names


CLASSIC = """
model:
  name: "facebook/opt-1.3b"
  trust_remote_code: true
  torch_dtype: "bfloat16"
  device_map: "auto"
lora:
  r: 16
  lora_alpha: 32
  lora_dropout: 0.1
  bias: "none"
  task_type: "CAUSAL_LM"
  target_modules: ["q_proj", "v_proj"]
quantization:
  load_in_4bit: true
  bnb_4bit_compute_dtype: "bfloat16"
  bnb_4bit_quant_type: "nf4"
  bnb_4bit_use_double_quant: true
training:
  output_dir: "./checkpoints/wronai-7b"
  num_train_epochs: 3
  per_device_train_batch_size: 1
  per_device_eval_batch_size: 1
  gradient_accumulation_steps: 16
  warmup_ratio: 0.03
  learning_rate: 2e-4
  fp16: false
  bf16: true
  logging_steps: 10
  save_steps: 500
  eval_steps: 500
  evaluation_strategy: "steps"
  save_strategy: "steps"
  load_best_model_at_end: true
  metric_for_best_model: "eval_loss"
  greater_is_better: false
  save_total_limit: 3
  remove_unused_columns: false
  dataloader_pin_memory: false
  gradient_checkpointing: true
  group_by_length: true
  optim: "paged_adamw_32bit"
  lr_scheduler_type: "cosine"
  max_grad_norm: "1.0"
  weight_decay: 0.01
  data_seed: 42
data:
  dataset_name: "imdb"
  train_split: "train"
  eval_split: "test"
  max_seq_length: 2048
  preprocessing_num_workers: 4
polish:
  tokenizer_vocab_size: 32000
  add_polish_tokens: true
  polish_stopwords: true
  morphological_analysis: true
logging:
  wandb_project: "wronai"
  wandb_run_name: "wronai-7b-{timestamp}"
  log_level: "INFO"
  report_to: ["tensorboard"]
hardware:
  max_memory_mb: 7000
  cpu_offload: true
  pin_memory: false
  dataloader_num_workers: 2
safety:
  content_filter: true
evaluation:
  metrics: ["perplexity"]
"""


def test_classic_config_loads_with_old_keys_mapped(tmp_path):
    path = tmp_path / "classic.yaml"
    path.write_text(CLASSIC)
    loaded = load_config_with_notes(path)
    cfg = loaded.config
    assert cfg.training.eval_strategy == "steps"
    assert cfg.training.warmup_ratio == pytest.approx(0.03)
    assert cfg.training.learning_rate == pytest.approx(2e-4)  # YAML reads 2e-4 as a string
    assert cfg.training.max_grad_norm == 1.0
    assert cfg.training.group_by_length is True
    assert cfg.hardware.max_memory == "7000MiB"
    assert cfg.hardware.pin_memory is False
    assert cfg.model.torch_dtype == "bfloat16"
    notes = "\n".join(loaded.notes)
    for fragment in (
        "evaluation_strategy",
        "safety",
        "evaluation",
        "remove_unused_columns",
        "polish_stopwords",
    ):
        assert fragment in notes


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        data=BASE,
        overrides=["training.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "data.packing=true"],
    )
    assert cfg.training.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.packing is True


# (config dict or overrides, expected fragment of the one-line problem)
BAD = [
    (with_(lora={"rnak": 8}), "unknown key `lora.rnak` — did you mean `lora.r`?"),
    (with_(trainig={"max_steps": 1}), "unknown key `trainig` — did you mean `training`?"),
    (with_(training={"learning_rate": "fast"}), "`training.learning_rate`: 'fast' is not a number"),
    (with_(training={"max_steps": "ten"}), "`training.max_steps`: 'ten' is not a whole number"),
    (with_(training={"eval_strategy": "sometimes"}), "`training.eval_strategy`: 'sometimes' is not allowed"),
    (
        with_(training={"optim": "adamw"}),
        "`training.optim`: unknown optimizer 'adamw' — did you mean adamw_torch",
    ),
    (
        with_(training={"lr_scheduler_type": "cosin"}),
        "`training.lr_scheduler_type`: unknown scheduler 'cosin'",
    ),
    (with_(training={"fp16": True, "bf16": True}), "fp16 and bf16 are both true"),
    (with_(training={"warmup_steps": 10, "warmup_ratio": 0.1}), "warmup_steps and warmup_ratio are both set"),
    (
        with_(training={"load_best_model_at_end": True, "eval_strategy": "no"}),
        "load_best_model_at_end needs evaluation",
    ),
    (
        with_(training={"load_best_model_at_end": True, "save_steps": 50, "eval_steps": 20}),
        "save_steps (50) to be a multiple of eval_steps (20)",
    ),
    (
        with_(training={"per_device_train_batch_size": 0}),
        "`training.per_device_train_batch_size`: 0 is out of range",
    ),
    (with_(lora={"r": 0}), "`lora.r`: 0 is out of range"),
    (with_(lora={"lora_dropout": 1.5}), "`lora.lora_dropout`: 1.5 is out of range"),
    (with_(lora={"bias": "some"}), "`lora.bias`: 'some' is not allowed"),
    (
        with_(quantization={"load_in_4bit": True, "load_in_8bit": True}),
        "load_in_4bit and load_in_8bit are both true",
    ),
    (
        with_(quantization={"bnb_4bit_quant_type": "int4"}),
        "`quantization.bnb_4bit_quant_type`: 'int4' is not allowed",
    ),
    (with_(quantization={"load_in_4bit": "maybe"}), "`quantization.load_in_4bit`: 'maybe' is not true/false"),
    (with_(data={"format": "xml"}), "`data.format`: 'xml' is not allowed"),
    (with_(data={"eval_fraction": 1.5}), "`data.eval_fraction`: 1.5 is out of range"),
    (with_(data={"prompt_template": "no placeholder here"}), "must contain {instruction}"),
    (with_(data={"max_seq_length": 2}), "`data.max_seq_length`: 2 is out of range"),
    ({"data": {"dataset_name": "x"}}, "`model` is required"),
    ({"model": {"name": "x"}}, "`data` is required"),
    (with_(model={"name": None}), "`model.name`"),
    (with_(model="just-a-string"), "`model` must be a group of keys"),
    (with_(model={"torch_dtype": "int8"}), "`model.torch_dtype`: 'int8' is not allowed"),
    (with_(logging={"report_to": ["mlflow"]}), "`logging.report_to[0]`: 'mlflow' is not allowed"),
    (with_(hardware={"device": "tpu"}), "`hardware.device`: 'tpu' is not allowed"),
    (
        with_(
            model={
                "create_if_missing": {
                    "tokenizer_data": ["a.txt"],
                    "hidden_size": 100,
                    "num_attention_heads": 3,
                }
            }
        ),
        "not divisible",
    ),
]


@pytest.mark.parametrize(("raw", "fragment"), BAD, ids=[f[1][:40] for f in BAD])
def test_bad_config_gives_one_precise_line(raw, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(data=raw)
    problems = info.value.problems
    assert any(fragment in p for p in problems), problems
    assert all("\n" not in p for p in problems)
    assert "Traceback" not in str(info.value)


def test_all_problems_reported_at_once():
    raw = with_(lora={"rnak": 1, "r": 0}, training={"optim": "nope"}, data={"format": "xml"})
    with pytest.raises(ConfigError) as info:
        load_config(data=raw)
    assert len(info.value.problems) == 4


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model: [unclosed\n", "YAML syntax error at line"),
        ("", "the file is empty"),
        ("- a\n- b\n", "the top level must be a mapping"),
    ],
)
def test_bad_yaml_files(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="write --set dotted.key=value"):
        load_config(data=BASE, overrides=["training.max_steps"])
    with pytest.raises(ConfigError, match="unknown key `training.max_stepz`"):
        load_config(data=BASE, overrides=["training.max_stepz=3"])


def test_relative_paths_resolve_against_config_dir(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "data.jsonl").write_text('{"text": "a"}\n')
    path = tmp_path / "cfg" / "c.yaml"
    path.write_text(
        yaml.safe_dump({"model": {"name": "org/model"}, "data": {"dataset_name": "../data.jsonl"}})
    )
    cfg = load_config(path)
    assert cfg.data.dataset_name == str((tmp_path / "data.jsonl").resolve())
    assert cfg.model.name == "org/model"  # Hub ids stay as written


def test_configuration_docs_are_current():
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert text == render_reference(), (
        "docs/configuration.md is stale — run `wronai config-docs --out docs/configuration.md`"
    )
