"""`wronai plan`: memory estimates for known models, fit/no-fit advice, a one-line offline error."""

from __future__ import annotations

import json

import pytest
import yaml

from wronai.cli import main
from wronai.config import load_config
from wronai.planning import GIB, ModelShape, Settings, estimate, make_plan, parse_gpu_size

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000}  # fmt: skip
MISTRAL_7B = {**LLAMA2_7B, "intermediate_size": 14336, "num_key_value_heads": 8}
LLAMA3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256}  # fmt: skip


def settings(**kw) -> Settings:
    base = dict(quantization="4bit", double_quant=True, weight_bytes=2, compute_bytes=2, lora_r=16,
                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), lora_dropout=True,
                batch=1, seq=2048, accumulation=16, gradient_checkpointing=True, strategy="none", nproc=1)  # fmt: skip
    return Settings(**{**base, **kw})


# (model, settings, params in billions, LoRA params in millions, GiB per GPU) — the GiB column pins the formula;
# its accuracy against measured peaks is checked by benchmarks/plan_accuracy.py (docs/distributed.md)
KNOWN = [
    ("llama2-7b qlora", LLAMA2_7B, settings(), 6.74, 40.0, 7.1),
    ("mistral-7b qlora", MISTRAL_7B, settings(), 7.24, 41.9, 7.5),
    ("mistral-7b lora bf16", MISTRAL_7B, settings(quantization="none"), 7.24, 41.9, 16.5),
    ("mistral-7b qlora no-gc b4", MISTRAL_7B, settings(gradient_checkpointing=False, batch=4), 7.24, 41.9, 76.3),
    ("llama3-70b qlora fsdp x2", LLAMA3_70B, settings(strategy="fsdp", nproc=2), 70.6, 207.1, 29.6),
]


@pytest.mark.parametrize(("name", "cfg", "s", "params_b", "lora_m", "gib"), KNOWN, ids=[k[0] for k in KNOWN])
def test_known_estimates(name, cfg, s, params_b, lora_m, gib):
    est = estimate(ModelShape.from_config(cfg), s)
    assert est.total_params / 1e9 == pytest.approx(params_b, rel=0.01)
    assert est.trainable / 1e6 == pytest.approx(lora_m, rel=0.01)
    assert est.total / GIB == pytest.approx(gib, rel=0.02), est.parts


def test_sharding_divides_weights_and_states():
    shape = ModelShape.from_config(LLAMA3_70B)
    one = estimate(shape, settings(nproc=2, strategy="ddp"))
    fsdp = estimate(shape, settings(nproc=2, strategy="fsdp"))
    zero2 = estimate(shape, settings(nproc=2, strategy="deepspeed_zero2"))
    assert fsdp.parts["base weights"] < 0.6 * one.parts["base weights"]
    assert zero2.parts["base weights"] == one.parts["base weights"]
    assert zero2.parts["LoRA grads + AdamW"] == pytest.approx(one.parts["LoRA grads + AdamW"] / 2)
    assert estimate(shape, settings(gradient_checkpointing=False)).parts["activations"] > 10 * one.parts["activations"]


def test_fits_and_advice():
    shape = ModelShape.from_config(MISTRAL_7B)
    assert make_plan(shape, settings(), 24 * GIB).fits
    assert make_plan(shape, settings(), 24 * GIB).advice == []
    tight = make_plan(shape, settings(gradient_checkpointing=False, batch=4), 24 * GIB)
    assert not tight.fits
    assert "gradient_checkpointing: true" in tight.advice[0]
    assert "GiB" in tight.advice[0]
    hopeless = make_plan(ModelShape.from_config(LLAMA3_70B), settings(), 8 * GIB)
    assert not hopeless.fits and hopeless.advice[-1].startswith("still too large")


@pytest.mark.parametrize(("text", "gib"), [("8GB", 8), ("24gb", 24), ("80", 80), ("7.5GiB", 7.5)])
def test_parse_gpu_size(text, gib):
    assert parse_gpu_size(text) == gib * GIB


def _config(tmp_path, name, **training):
    raw = {"model": {"name": str(name)}, "data": {"dataset_name": "org/dataset"}, "training": training}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_cli_reads_local_config_json(tmp_path, capsys):
    model = tmp_path / "mistral"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MISTRAL_7B))
    assert main(["plan", str(_config(tmp_path, model)), "--gpu", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "7.24B parameters" in out and "fits on a 24GB GPU" in out
    assert main(["plan", str(_config(tmp_path, model, gradient_checkpointing=False, per_device_train_batch_size=8)), "--gpu", "8GB"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit on a 8GB GPU" in out and "to fit: set training.gradient_checkpointing: true" in out


def test_cli_offline_hub_error_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", str(_config(tmp_path, "no-such-org/no-such-model"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot fetch config.json of 'no-such-org/no-such-model'" in err and "offline" in err


def test_plan_uses_create_if_missing_spec(tmp_path):
    from wronai.planning import plan_config

    cfg = load_config(data={"model": {"name": str(tmp_path / "nope"), "create_if_missing": {"tokenizer_data": ["x.txt"]}},
                            "data": {"dataset_name": "org/dataset"}})  # fmt: skip
    plan, text = plan_config(cfg, "8GB")
    assert plan.fits and plan.shape.hidden == 128
