"""Shared fixtures: a tiny Polish tokenizer and Llama model built in-process (no network, seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]

POLISH_TEXT = [
    "Warszawa jest stolicą Polski i największym miastem w kraju.",
    "Kraków leży nad Wisłą, a na Wawelu stoi zamek królewski.",
    "Zażółć gęślą jaźń — to zdanie zawiera wszystkie polskie znaki diakrytyczne.",
    "Gdańsk jest portem nad Morzem Bałtyckim; słynie z Długiego Targu.",
    "Pierogi, bigos i żurek to tradycyjne potrawy kuchni polskiej.",
    "Mikołaj Kopernik urodził się w Toruniu w 1473 roku.",
    "Maria Skłodowska-Curie dwukrotnie otrzymała Nagrodę Nobla.",
    "W języku polskim jest siedem przypadków: mianownik, dopełniacz, celownik, biernik, narzędnik, miejscownik i wołacz.",
    "Odpowiedź brzmi: tak, ale tylko wtedy, gdy pogoda będzie ładna.",
    "Uczenie maszynowe pozwala komputerom uczyć się na podstawie danych.",
]

CITIES = [
    "Warszawa",
    "Kraków",
    "Gdańsk",
    "Wrocław",
    "Poznań",
    "Łódź",
    "Szczecin",
    "Lublin",
    "Toruń",
    "Rzeszów",
]


def alpaca_rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        rows.append(
            {
                "instruction": f"Napisz jedno zdanie o mieście {city}.",
                "input": "" if i % 3 else f"Kontekst numer {i}.",
                "output": f"{city} to piękne polskie miasto z bogatą historią."
                + " Warto je odwiedzić." * (i % 4),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    rows = alpaca_rows(40)
    paragraphs = POLISH_TEXT * 4 + [r["instruction"] + " " + r["output"] for r in rows]
    paragraphs += [
        "### Instrukcja:\n### Odpowiedź:\n### Dane wejściowe:\n<|im_start|>user <|im_end|> assistant"
    ] * 5
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, corpus_file) -> Path:
    """A 2-layer Llama (hidden 64) with a 500-token byte-level BPE tokenizer, saved like a Hub model."""
    from wronai.config.sections.model import TinyModelSpec
    from wronai.model.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    spec = TinyModelSpec(
        tokenizer_data=[str(corpus_file)], vocab_size=500, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    return build_tiny_model(spec, out)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    from wronai.model.tokenizer import set_pad_token

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    set_pad_token(tok)
    return tok


@pytest.fixture()
def alpaca_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data" / "alpaca.jsonl", alpaca_rows(40))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test gets its own prepared-data cache (never ~/.cache)."""
    path = tmp_path / "wronai-cache"
    monkeypatch.setenv("WRONAI_CACHE_DIR", str(path))
    return path


def quantized_linear(rows: int, cols: int, quant_type: str, nested: bool, bias: bool):
    """A bitsandbytes 4-bit linear layer (cols -> rows) quantized from a seeded float32 one, on the CPU."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    dense = torch.nn.Linear(cols, rows, bias=bias)
    layer = bnb.nn.Linear4bit(
        cols, rows, bias=bias, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=nested
    )
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    from wronai.kernels.bnb import forbid_packed_format

    forbid_packed_format(
        layer
    )  # as every 4-bit model WronAI loads (tests/test_packed_format.py: the flag on)
    return layer


def polish_batch(tokenizer):
    """Two short padded Polish sentences as model inputs."""
    return tokenizer(
        ["Warszawa jest stolicą Polski.", "Kraków leży nad Wisłą."], return_tensors="pt", padding=True
    )


def loss_and_gradients(model, batch) -> tuple:
    """One forward/backward on the batch (labels = inputs): the loss and every trained parameter's gradient."""
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def two_pipeline_steps(raw: dict, calls=None) -> tuple:
    """The pipeline's model for config ``raw`` (seeded), trained on a Polish batch for two
    ``loss_and_gradients`` steps: (model, [first, second], how much ``calls(model)`` grew over them)."""
    import torch

    from wronai.config import load_config
    from wronai.recipe import Pipeline

    torch.manual_seed(0)
    pipeline = Pipeline(load_config(data=raw))
    model = pipeline.load_model()
    pipeline.close()
    model.train()
    batch = polish_batch(pipeline.tokenizer)
    before = calls(model) if calls else 0
    results = [loss_and_gradients(model, batch)]
    model.zero_grad()
    results.append(loss_and_gradients(model, batch))
    return model, results, (calls(model) - before if calls else 0)


def same_training_off_and_auto(raw: dict, key: str, calls) -> dict:
    """``two_pipeline_steps`` with ``hardware.<key>`` off and auto, asserting the same loss and gradients;
    per setting, the model and how much ``calls(model)`` grew."""
    runs = {}
    for setting in ("off", "auto"):
        raw["hardware"][key] = setting
        runs[setting] = two_pipeline_steps(raw, calls)
    for fused, stock in zip(runs["auto"][1], runs["off"][1], strict=True):
        assert_same_loss_and_gradients(fused, stock)
    return {setting: (model, grew) for setting, (model, _, grew) in runs.items()}


def collate_as(layout: str, examples: list[dict]) -> dict:
    """``examples`` batched as training batches them: right-padded rows ("padded"), or packed into rows of
    48 tokens ("packed")."""
    from wronai.data.collate import PackedCollator, PaddingCollator, pack_examples

    if layout == "padded":
        return PaddingCollator(pad_token_id=0)(examples)
    return PackedCollator(pad_token_id=0)(pack_examples(examples, 48))


def run_outcome(out: Path) -> tuple[list[float], dict, list]:
    """What a finished CLI run in ``out`` left: its logged losses, its adapter tensors, its device plan."""
    import json

    from safetensors.torch import load_file

    state = json.loads((out / "trainer_state.json").read_text())
    plan = json.loads((out / "provenance.json").read_text()).get("device_plan", [])
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    return losses, load_file(out / "adapter_model.safetensors"), plan


def assert_same_loss_and_gradients(result, reference) -> None:
    """Two ``loss_and_gradients`` results agree: the loss, and the gradient of every trained parameter."""
    import torch

    torch.testing.assert_close(result[0], reference[0], rtol=1e-5, atol=1e-6)
    assert result[1].keys() == reference[1].keys() and reference[1]
    for name, grad in reference[1].items():
        torch.testing.assert_close(result[1][name], grad, rtol=1e-3, atol=1e-6)


def assert_same_as_reference(compute, reference, x, tol: float):
    """``compute(x)`` equals ``reference(x)`` and gives x the same gradient; returns compute's output."""
    import torch

    x_ref = x.detach().clone().requires_grad_(True)
    x_out = x.detach().clone().requires_grad_(True)
    ref, out = reference(x_ref), compute(x_out)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(x_out.grad, x_ref.grad, rtol=tol, atol=tol)
    return out


def make_config_dict(model_dir: Path, data_path: Path, out_dir: Path, **sections) -> dict:
    """A small, fast run config: 4-bit QLoRA on the tiny model. It writes down what `auto` would decide
    (batch, packing, the timed CPU choices), so that a test's numbers do not depend on the machine running
    it; the tests of those decisions leave them out."""
    cfg = {
        "model": {"name": str(model_dir)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "quantization": {"load_in_4bit": True},
        "training": {
            "output_dir": str(out_dir),
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "eval_steps": 3,
            "save_steps": 3,
            "gradient_checkpointing": False,
            "lr_scheduler_type": "constant",
        },
        "data": {
            "dataset_name": str(data_path),
            "max_seq_length": 128,
            "eval_fraction": 0.1,
            "packing": False,
        },
        "logging": {"report_to": ["none"], "report": False},  # tests of the report turn it on
        "hardware": {"autotune": False},
    }
    for group, values in sections.items():
        cfg.setdefault(group, {}).update(values)
    return cfg


def train_via_cli(root: Path, model_dir: Path, rows: int = 60, **sections) -> Path:
    """Train a small run through `wronai train CONFIG` (as a user would); returns its output directory."""
    import yaml

    from wronai.cli import main

    data = write_jsonl(root / "train.jsonl", alpaca_rows(rows))
    raw = make_config_dict(model_dir, data, root / "out", **sections)
    raw["data"]["cache_dir"] = str(root / "cache")
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(cfg)]) == 0
    return root / "out"


def tiny_llama(model_dir: Path):
    """The tiny model in float32, training mode, no KV cache (seeded: any weights it creates are the same)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def plan_with_gpu(monkeypatch, **sections):
    """The device plan of a config with ``sections`` on a machine that has a CUDA GPU and native bf16."""
    import torch

    from wronai.config import load_config
    from wronai.runtime import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "_device_name", lambda d: "a test device")
    monkeypatch.setattr(hardware, "_bf16_ok", lambda d: True)
    cfg = load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"}, **sections})
    return hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
