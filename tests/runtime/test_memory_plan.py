"""`wronai plan`: memory estimates for known models, fit/no-fit advice, a one-line offline error."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from wronai.cli import main
from wronai.config import load_config
from wronai.runtime.memory import (
    CPU_HEAP_SLACK,
    CPU_RUNTIME,
    CUDA_CONTEXT,
    GIB,
    ModelShape,
    Settings,
    estimate,
)
from wronai.runtime.memory_plan import make_plan, parse_gpu_size, render

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
    ("llama2-7b qlora", LLAMA2_7B, settings(), 6.74, 40.0, 7.36),
    ("mistral-7b qlora", MISTRAL_7B, settings(), 7.24, 41.9, 7.7),
    ("mistral-7b lora bf16", MISTRAL_7B, settings(quantization="none"), 7.24, 41.9, 16.75),
    (
        "mistral-7b qlora no-gc b4",
        MISTRAL_7B,
        settings(gradient_checkpointing=False, batch=4),
        7.24,
        41.9,
        77.2,
    ),
    ("llama3-70b qlora fsdp x2", LLAMA3_70B, settings(strategy="fsdp", nproc=2), 70.6, 207.1, 30.6),
]


@pytest.mark.parametrize(("name", "cfg", "s", "params_b", "lora_m", "gib"), KNOWN, ids=[k[0] for k in KNOWN])
def test_known_estimates(name, cfg, s, params_b, lora_m, gib):
    est = estimate(ModelShape.from_config(cfg), s)
    assert est.total_params / 1e9 == pytest.approx(params_b, rel=0.01)
    assert est.trainable / 1e6 == pytest.approx(lora_m, rel=0.01)
    assert est.total / GIB == pytest.approx(gib, rel=0.02), est.parts


TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000}  # fmt: skip


def cpu_settings(**kw) -> Settings:
    """What benchmarks/plan_accuracy.py runs: fp32 compute, batch 1 x 256, no LoRA dropout."""
    base = {"compute_bytes": 4, "weight_bytes": 4, "seq": 256, "lora_dropout": False, "accumulation": 1}
    return settings(**{**base, **kw})


def test_logits_term_counts_four_live_copies():
    shape = ModelShape.from_config(MISTRAL_7B)
    for compute_bytes, per_logit in ((2, 14), (4, 16)):
        est = estimate(shape, settings(compute_bytes=compute_bytes, batch=2, seq=512))
        assert est.parts["logits + loss"] == 2 * 512 * 32000 * per_logit


def test_cpu_estimate_adds_heap_slack_and_runtime_instead_of_cuda_context():
    shape = ModelShape.from_config(TINYLLAMA)
    s = cpu_settings()
    gpu, cpu = estimate(shape, s, cuda_context=False), estimate(shape, s, device="cpu")
    assert "CUDA context" not in cpu.parts and "CPU heap slack" not in gpu.parts
    assert {k: v for k, v in cpu.parts.items() if not k.startswith("CPU")} == gpu.parts
    no_gc = replace(s, gradient_checkpointing=False)
    all_layers = estimate(shape, no_gc, cuda_context=False).parts["activations"]
    assert cpu.parts["CPU heap slack"] == pytest.approx(CPU_HEAP_SLACK * all_layers)
    assert cpu.total - gpu.total == pytest.approx(CPU_HEAP_SLACK * all_layers + CPU_RUNTIME)
    # the slack follows all layers' activations even with checkpointing on: glibc keeps each layer's buffers
    assert estimate(shape, no_gc, device="cpu").parts["CPU heap slack"] == cpu.parts["CPU heap slack"]
    assert 0.5 * GIB < cpu.total - gpu.total < 0.7 * GIB
    assert estimate(shape, s, device="cpu", cuda_context=True).parts.keys() == cpu.parts.keys()


# peak RSS increase of two AdamW steps on CPU, measured by benchmarks/plan_accuracy.py (MiB; docs/distributed.md)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 500}  # fmt: skip
LLAMA_150M = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 4, "vocab_size": 32000}  # fmt: skip
MEASURED_CPU = [
    ("tiny 4bit b4x128", TINY, cpu_settings(batch=4, seq=128, gradient_checkpointing=False), 24),
    ("llama-150m 4bit gc b2x256", LLAMA_150M, cpu_settings(batch=2), 788),
    ("tinyllama-1.1b 4bit gc", TINYLLAMA, cpu_settings(), 2070),
    ("tinyllama-1.1b fp32 gc", TINYLLAMA, cpu_settings(quantization="none"), 5168),
]


@pytest.mark.parametrize(("name", "cfg", "s", "mib"), MEASURED_CPU, ids=[m[0] for m in MEASURED_CPU])
def test_cpu_estimate_within_15_percent_of_measured(name, cfg, s, mib):
    shape = ModelShape.from_config(cfg)
    assert estimate(shape, s, device="cpu").total / 2**20 == pytest.approx(mib, rel=0.15)
    # the GPU formula alone (live tensors only) misses the heap glibc keeps
    assert estimate(shape, s, cuda_context=False).total / 2**20 < 0.9 * mib


def test_sharding_divides_weights_and_states():
    shape = ModelShape.from_config(LLAMA3_70B)
    one = estimate(shape, settings(nproc=2, strategy="ddp"))
    fsdp = estimate(shape, settings(nproc=2, strategy="fsdp"))
    zero2 = estimate(shape, settings(nproc=2, strategy="deepspeed_zero2"))
    assert fsdp.parts["base weights"] < 0.6 * one.parts["base weights"]
    assert zero2.parts["base weights"] == one.parts["base weights"]
    assert zero2.parts["LoRA grads + AdamW"] == pytest.approx(one.parts["LoRA grads + AdamW"] / 2)
    assert (
        estimate(shape, settings(gradient_checkpointing=False)).parts["activations"]
        > 10 * one.parts["activations"]
    )


def test_sharded_quantized_run_counts_the_whole_model_while_loading():
    """FSDP/ZeRO-3 + 4-bit: every rank loads the whole 4-bit model (and casts the rest to float32, adds LoRA)
    before the Trainer shards it — a peak more GPUs do not lower, and the verdict uses it."""
    shape = ModelShape.from_config(LLAMA3_70B)
    fsdp = estimate(shape, settings(strategy="fsdp", nproc=2))
    whole = shape.linear_params * (0.5 + 0.127 / 8) + shape.other_params * 4  # NF4 + double quant; fp32 rest
    largest_16bit = shape.vocab * shape.hidden * 2  # the embedding's bf16 original next to its fp32 copy
    assert fsdp.load_peak == pytest.approx(whole + largest_16bit + fsdp.trainable * 4 + CUDA_CONTEXT)
    assert fsdp.total / GIB == pytest.approx(30.6, rel=0.02)  # a training step, sharded (KNOWN)
    assert fsdp.peak == fsdp.load_peak and fsdp.load_peak / GIB == pytest.approx(44.2, rel=0.02)
    assert estimate(shape, settings(strategy="fsdp", nproc=8)).load_peak == fsdp.load_peak
    assert estimate(shape, settings(strategy="deepspeed_zero3", nproc=2)).load_peak == fsdp.load_peak
    for unsharded_load in (
        settings(strategy="ddp", nproc=2),
        settings(strategy="fsdp", nproc=2, quantization="none"),
    ):
        assert estimate(shape, unsharded_load).load_peak == 0
    tight = make_plan(shape, settings(strategy="fsdp", nproc=2), 40 * GIB)  # a step fits, loading does not
    assert not tight.fits
    assert tight.advice == [
        "still too large: use GPUs with more memory (each holds the whole quantized model while it loads), or a smaller model"
    ]
    text = render(tight, "llama3-70b", "40GB")
    assert "load peak" in text and "does NOT fit on a 40GB GPU (40 GiB): 110% used" in text
    assert make_plan(shape, settings(strategy="fsdp", nproc=2), 48 * GIB).fits


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
    assert (
        main(
            [
                "plan",
                str(_config(tmp_path, model, gradient_checkpointing=False, per_device_train_batch_size=8)),
                "--gpu",
                "8GB",
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "does NOT fit on a 8GB GPU" in out and "to fit: set training.gradient_checkpointing: true" in out


def test_cli_plans_a_cpu_run_against_ram(tmp_path, capsys):
    """--ram: peak RSS of a CPU run (no CUDA context, heap slack), dtypes as this CPU's device plan resolves them."""
    model = tmp_path / "mistral"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MISTRAL_7B))
    short = _config(tmp_path, model)
    raw = yaml.safe_load(short.read_text())
    raw["data"]["max_seq_length"] = 512
    short.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["plan", str(short), "--ram", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "peak RSS increase per process (CPU" in out and "fits in 24GB of RAM" in out
    assert "CPU heap slack" in out and "CUDA context" not in out
    assert main(["plan", str(short), "--ram", "4GB", "--nproc", "2"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit in 4GB of RAM" in out and "deepspeed_zero3" in out and "fsdp" not in out
    assert main(["plan", str(short), "--ram", "lots"]) == 2
    assert "lots: give the memory size like 8GB" in capsys.readouterr().err


def test_cli_offline_hub_error_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", str(_config(tmp_path, "no-such-org/no-such-model"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot fetch config.json of 'no-such-org/no-such-model'" in err and "offline" in err


def test_plan_uses_create_if_missing_spec(tmp_path):
    from wronai.runtime.memory_plan import plan_config

    cfg = load_config(data={"model": {"name": str(tmp_path / "nope"), "create_if_missing": {"tokenizer_data": ["x.txt"]}},
                            "data": {"dataset_name": "org/dataset"}})  # fmt: skip
    plan, text = plan_config(cfg, "8GB")
    assert plan.fits and plan.shape.hidden == 128


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_out_of_memory_message_gives_the_plan_estimate(tmp_path, device):
    """The one-line OOM message quotes `wronai plan`'s peak for the run — not a count of loaded parameters,
    which sees bitsandbytes' packed 4-bit weights at half their number."""
    from wronai.runtime.memory_plan import plan_config
    from wronai.train.faults import oom_message

    model = tmp_path / "llama2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B), encoding="utf-8")
    training = {
        "gradient_checkpointing": True,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 16,
    }
    cfg = load_config(data={"model": {"name": str(model)}, "data": {"dataset_name": "org/dataset"},
                            "training": training})  # fmt: skip  # a run's config: its batch decided
    plan, _ = plan_config(cfg, "24GB", device=device)
    message = oom_message("training", cfg, device)
    where = "process" if device == "cpu" else "GPU"
    assert f"estimates {plan.estimate.peak / GIB:.1f} GiB per {where}" in message
    name, largest = max(plan.estimate.parts.items(), key=lambda part: part[1])
    assert f"{name} {largest / GIB:.1f} GiB of it" in message and "6.74B parameters" in message
    crude = 0.55 * plan.estimate.total_params / GIB  # the old model: 0.55 bytes per 4-bit parameter
    assert f"{crude:.1f} GiB" not in message
    assert "\n" not in message and message.startswith("out of memory while training (")
    assert "lower training.per_device_train_batch_size (now 1" in message
    assert "gradient_checkpointing" not in message.split(" — ")[1]  # already on


def test_out_of_memory_message_without_a_known_shape_gives_advice_only(tmp_path):
    from wronai.train.faults import oom_message

    empty = tmp_path / "empty"
    empty.mkdir()  # no config.json: no estimate, still the settings to change
    cfg = load_config(data={"model": {"name": str(empty)}, "data": {"dataset_name": "org/dataset"}})
    message = oom_message("loading the model", cfg)
    assert message.startswith("out of memory while loading the model — lower ") and "GiB" not in message
