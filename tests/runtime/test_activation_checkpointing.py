"""training.gradient_checkpointing: auto — recompute only as many layers as the free memory needs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml
from test_memory_plan import MISTRAL_7B, settings

from conftest import assert_same_loss_and_gradients, loss_and_gradients, make_config_dict, polish_batch
from wronai.cli import main
from wronai.config import load_config
from wronai.errors import ConfigError
from wronai.model.kbit import gradient_checkpointing_on
from wronai.runtime import activation_checkpointing
from wronai.runtime.activation_checkpointing import activation_bytes, checkpointing_choice
from wronai.runtime.memory import GIB, ModelShape, estimate

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 500}  # fmt: skip
TINY_SPEC = {"vocab_size": 500, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
TINY4 = {**TINY, "num_hidden_layers": 4}


@pytest.mark.parametrize(
    ("shape", "s", "free_gib", "every"),
    [
        (TINY, settings(batch=4, seq=512), 1.0, 0),
        (MISTRAL_7B, settings(batch=1, seq=512), 20.0, 0),  # ~4.5 GiB of activations (bf16, GPU): off
        (
            MISTRAL_7B,
            settings(batch=1, seq=2048),
            24.0,
            2,
        ),  # ~18 GiB off; 16 of 32 layers recomputed: ~10 GiB
        (MISTRAL_7B, settings(batch=4, seq=2048), 20.0, 1),  # ~70 GiB: every layer
        (MISTRAL_7B, settings(batch=4, seq=2048), 0.5, 1),  # nothing fits: every layer, as `true`
    ],
)
def test_checkpointing_only_where_the_activations_do_not_fit(shape, s, free_gib, every):
    got, why = checkpointing_choice(ModelShape.from_config(shape), s, free_gib * GIB, "cuda")
    assert got == every
    assert f"batch {s.batch} × seq {s.seq}" in why and f"{free_gib:.1f} GiB free" in why


def test_the_choice_is_the_fewest_recomputed_layers_that_fit():
    shape, s = ModelShape.from_config(MISTRAL_7B), settings(batch=1, seq=2048)
    free = 24 * GIB
    every, _ = checkpointing_choice(shape, s, free, "cuda")
    fits = [n for n in range(1, 33) if activation_bytes(shape, replace(s, checkpoint_every=n)) <= free / 2]
    assert every == max(fits) > 1
    assert activation_bytes(shape, replace(s, checkpoint_every=every + 1)) > free / 2


def test_partial_checkpointing_estimate_lies_between_off_and_every_layer():
    shape = ModelShape.from_config(MISTRAL_7B)
    off, every = settings(gradient_checkpointing=False), settings()
    parts = [
        estimate(shape, s).parts["activations"] for s in (every, replace(every, checkpoint_every=2), off)
    ]
    assert parts[0] < parts[1] < parts[2]
    assert estimate(shape, replace(every, checkpoint_every=32)).parts["activations"] < parts[2]


def test_the_threshold_is_half_the_free_memory():
    shape, s = ModelShape.from_config(TINY), settings(batch=2, seq=1024)
    without = activation_bytes(shape, settings(batch=2, seq=1024, gradient_checkpointing=False))
    assert without > activation_bytes(shape, s)  # checkpointing saves activations
    assert checkpointing_choice(shape, s, 2 * without, "cuda")[0] == 0
    assert checkpointing_choice(shape, s, 2 * without * 0.99, "cuda")[0] > 0


def test_free_memory_is_split_between_the_processes_of_a_machine(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = activation_checkpointing.free_memory("cpu")
    assert alone is not None and alone > 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert activation_checkpointing.free_memory("cpu") == pytest.approx(alone / 4, rel=0.2)
    assert activation_checkpointing.free_memory("mps") is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (8 * GIB, 16 * GIB))
    assert activation_checkpointing.free_memory("cuda") == 8 * GIB  # each process has a GPU of its own


def test_unknown_shape_or_memory_keeps_checkpointing_on(tiny_model_dir, alpaca_file, tmp_path):
    cfg = load_config(data=make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out"))
    assert activation_checkpointing.auto_gradient_checkpointing(cfg, {"model_type": "mamba"}, "cpu") == (
        1,
        "on",
        "model shape unknown (not a Llama-style config)",
    )
    assert activation_checkpointing.auto_gradient_checkpointing(cfg, TINY, "mps")[:2] == (1, "on")


def checkpointed_layers(model) -> list[bool]:
    return [bool(layer.gradient_checkpointing) for layer in model.get_base_model().model.layers]


@pytest.mark.parametrize(("free", "flags", "what"), [("all", [False] * 4, "off"), ("partial", [True, False] * 2, "on for one decoder layer in every 2 (2 of 4)"),
                                                     ("none", [True] * 4, "on (")])  # fmt: skip
def test_pipeline_decides_auto_from_the_loaded_model(
    tiny_model_dir, alpaca_file, tmp_path, monkeypatch, free, flags, what
):
    """A 4-layer model: plenty of memory → off; enough for every 2nd layer → layers 0 and 2; 1 KiB → all."""
    from wronai.recipe import Pipeline

    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out")
    raw["model"] = {
        "name": str(tmp_path / "four"),
        "create_if_missing": {**TINY_SPEC, "tokenizer_data": [str(alpaca_file)]},
    }
    raw["training"]["gradient_checkpointing"] = "auto"
    cfg = load_config(data=raw)
    shape, s = ModelShape.from_config(TINY4), activation_checkpointing.run_settings(cfg, "cpu")
    budget = {"all": 10 * GIB, "none": 1024.0,
              "partial": 2 * activation_bytes(shape, replace(s, gradient_checkpointing=True, checkpoint_every=2), "cpu")}[free]  # fmt: skip
    monkeypatch.setattr(activation_checkpointing, "free_memory", lambda device: budget)
    pipeline = Pipeline(cfg)
    model = pipeline.load_model()
    assert checkpointed_layers(model) == flags
    assert gradient_checkpointing_on(model) is any(flags)
    assert any(f"gradient_checkpointing: auto -> {what}" in n for n in pipeline.plan.notes)


def test_every_nth_layer_when_asked(tiny_model_dir, alpaca_file, tmp_path):
    from wronai.recipe import Pipeline

    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out")
    raw["model"] = {
        "name": str(tmp_path / "four"),
        "create_if_missing": {**TINY_SPEC, "tokenizer_data": [str(alpaca_file)]},
    }
    raw["training"].update(gradient_checkpointing=True, checkpoint_every_n_layers=3)
    model = Pipeline(load_config(data=raw)).load_model()
    assert checkpointed_layers(model) == [True, False, False, True]


def test_partial_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, alpaca_file, tmp_path):
    from wronai.model import loading
    from wronai.model.lora import apply_lora
    from wronai.model.tokenizer import load_tokenizer
    from wronai.runtime.hardware import plan_device

    cfg = load_config(data=make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out"))
    plan = plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    tok, _ = load_tokenizer(cfg.model, cfg.polish)
    batch = polish_batch(tok)
    results = []
    for every in (0, 2):
        torch.manual_seed(0)
        base = loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan)
        model = apply_lora(base, cfg.lora, [], gradient_checkpointing=every).train()
        assert checkpointed_layers(model) == [every == 2, False]
        results.append(loss_and_gradients(model, batch))
    assert_same_loss_and_gradients(results[1], results[0])


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
    assert "every" not in outputs[1]  # batch 8 × 512 of a 7B model on 24 GB: every layer


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="training.gradient_checkpointing"):
        load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"},
                          "training": {"gradient_checkpointing": "sometimes"}})  # fmt: skip


def test_out_of_memory_advice_names_checkpointing_when_auto_left_it_off():
    from wronai.train.faults import oom_message

    cfg = load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"}})
    assert cfg.training.gradient_checkpointing == "auto"  # the default
    assert "set training.gradient_checkpointing: true" in oom_message("training", cfg)
