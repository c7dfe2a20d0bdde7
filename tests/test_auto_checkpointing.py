"""training.gradient_checkpointing: auto — on only where the activations would not fit the free memory."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import make_config_dict
from test_plan import MISTRAL_7B, settings
from wronai import planning
from wronai.cli import main
from wronai.config import load_config
from wronai.errors import ConfigError
from wronai.kbit import gradient_checkpointing_on
from wronai.planning import GIB, ModelShape, activation_bytes, checkpointing_needed

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 500}  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "s", "free_gib", "needed"),
    [
        (TINY, settings(batch=4, seq=512), 1.0, False),
        (MISTRAL_7B, settings(batch=1, seq=512), 20.0, False),  # ~1.5 GiB of activations (bf16, GPU)
        (MISTRAL_7B, settings(batch=4, seq=2048), 20.0, True),  # ~70 GiB
        (MISTRAL_7B, settings(batch=2, seq=1024), 4.0, True),
    ],
)
def test_checkpointing_only_where_the_activations_do_not_fit(shape, s, free_gib, needed):
    got, why = checkpointing_needed(ModelShape.from_config(shape), s, free_gib * GIB, "cuda")
    assert got is needed
    assert f"batch {s.batch} × seq {s.seq}" in why and f"{free_gib:.1f} GiB free" in why


def test_the_threshold_is_half_the_free_memory():
    shape, s = ModelShape.from_config(MISTRAL_7B), settings(batch=2, seq=1024)
    without = activation_bytes(shape, settings(batch=2, seq=1024, gradient_checkpointing=False))
    assert without > activation_bytes(shape, s)  # checkpointing saves activations
    assert checkpointing_needed(shape, s, 2 * without, "cuda")[0] is False
    assert checkpointing_needed(shape, s, 2 * without * 0.99, "cuda")[0] is True


def test_free_memory_is_split_between_the_processes_of_a_machine(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = planning.free_memory("cpu")
    assert alone is not None and alone > 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert planning.free_memory("cpu") == pytest.approx(alone / 4, rel=0.2)
    assert planning.free_memory("mps") is None


def test_unknown_shape_or_memory_keeps_checkpointing_on(tiny_model_dir, alpaca_file, tmp_path):
    cfg = load_config(data=make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out"))
    assert planning.auto_gradient_checkpointing(cfg, {"model_type": "mamba"}, "cpu") == (
        True,
        "model shape unknown (not a Llama-style config)",
    )
    assert planning.auto_gradient_checkpointing(cfg, TINY, "mps")[0] is True


@pytest.mark.parametrize(("free_bytes", "on"), [(None, False), (1024.0, True)])
def test_pipeline_decides_auto_from_the_loaded_model(
    tiny_model_dir, alpaca_file, tmp_path, monkeypatch, free_bytes, on
):
    from wronai.pipeline import WronAITrainer

    if free_bytes is not None:  # a machine with 1 KiB free: even the tiny model's activations do not fit
        monkeypatch.setattr(planning, "free_memory", lambda device: free_bytes)
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out")
    raw["training"]["gradient_checkpointing"] = "auto"
    pipeline = WronAITrainer(load_config(data=raw))
    model = pipeline.load_model()
    assert gradient_checkpointing_on(model) is on
    assert any(f"gradient_checkpointing: auto -> {'on' if on else 'off'}" in n for n in pipeline.plan.notes)


def test_plan_shows_what_auto_decides(tmp_path, capsys):
    model = tmp_path / "mistral"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MISTRAL_7B))
    outputs = []
    for batch, gpu in ((1, "24GB"), (8, "24GB")):
        raw = {"model": {"name": str(model)}, "data": {"dataset_name": "org/d", "max_seq_length": 512},
               "training": {"per_device_train_batch_size": batch, "gradient_checkpointing": "auto"}}  # fmt: skip
        path = tmp_path / f"plan{batch}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        main(["plan", str(path), "--gpu", gpu])
        outputs.append(capsys.readouterr().out)
    assert "gradient_checkpointing: auto -> off" in outputs[0] and "checkpointing off" in outputs[0]
    assert "gradient_checkpointing: auto -> on" in outputs[1] and "checkpointing on" in outputs[1]


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="training.gradient_checkpointing"):
        load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"},
                          "training": {"gradient_checkpointing": "sometimes"}})  # fmt: skip


def test_out_of_memory_advice_names_checkpointing_when_auto_left_it_off():
    from wronai.reliability import oom_message

    cfg = load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"}})
    assert cfg.training.gradient_checkpointing == "auto"  # the default
    assert "set training.gradient_checkpointing: true" in oom_message("training", cfg)
