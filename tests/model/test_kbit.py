"""4-bit preparation that keeps 16-bit embeddings/head: same numbers as PEFT's float32 copies, half the bytes."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import (
    assert_same_as_reference,
    assert_same_loss_and_gradients,
    loss_and_gradients,
    make_config_dict,
    polish_batch,
)
from wronai.config import load_config
from wronai.model import kbit
from wronai.recipe import Pipeline


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny test model saved as bf16 weights, as most Hub checkpoints are."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16") / "model"
    shutil.copytree(tiny_model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def pipeline_for(model_dir, tmp_path, alpaca_file, keep: bool, **lora):
    raw = make_config_dict(
        model_dir,
        alpaca_file,
        tmp_path / f"out-{keep}",
        quantization={"load_in_4bit": True, "keep_embeddings_dtype": keep},
    )
    raw["lora"] = {**raw.get("lora", {}), "lora_dropout": 0.0, **lora}
    return Pipeline(load_config(data=raw))


@pytest.mark.parametrize(
    ("weight_dtype", "compute_dtype", "keepable"),
    [
        (torch.bfloat16, torch.float32, True),
        (torch.float16, torch.float32, True),
        (torch.bfloat16, torch.bfloat16, True),
        (torch.float16, torch.bfloat16, False),  # fp16 -> bf16 would round: PEFT's float32 copy instead
        (torch.float32, torch.float32, False),  # nothing to save
    ],
)
def test_keepable_dtype(weight_dtype, compute_dtype, keepable):
    assert kbit.keepable_dtype(weight_dtype, compute_dtype) is keepable


@pytest.mark.parametrize(
    ("shape", "vocab", "chunk_rows", "bias"),
    [
        ((7, 16), 50, None, False),
        ((2, 5, 16), 50, 8, False),  # chunks that do not divide the rows
        ((2, 5, 16), 50, 1, True),
        ((3, 16), 9, 100, True),  # one chunk larger than the matrix
    ],
)
def test_upcast_linear_equals_a_float32_copy(monkeypatch, shape, vocab, chunk_rows, bias):
    torch.manual_seed(0)
    weight = torch.randn(vocab, shape[-1]).to(torch.bfloat16)
    b = torch.randn(vocab).to(torch.bfloat16) if bias else None
    if chunk_rows is not None:
        monkeypatch.setattr(kbit, "CHUNK_BYTES", chunk_rows * shape[-1] * 4)
    out = assert_same_as_reference(
        lambda x: kbit.upcast_linear(x, weight, b),
        lambda x: torch.nn.functional.linear(x, weight.float(), None if b is None else b.float()),
        torch.randn(*shape),
        tol=1e-6,
    )
    assert out.dtype == torch.float32


def test_upcast_linear_refuses_trainable_weights():
    with pytest.raises(ValueError, match="frozen"):
        kbit.upcast_linear(torch.randn(2, 4), torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True))


def test_4bit_keeps_bf16_embeddings_with_the_same_numbers(bf16_model_dir, tmp_path, alpaca_file):
    import bitsandbytes as bnb

    kept = pipeline_for(bf16_model_dir, tmp_path, alpaca_file, keep=True)
    upcast = pipeline_for(bf16_model_dir, tmp_path, alpaca_file, keep=False)
    models = [kept.load_model(), upcast.load_model()]
    embed, head = models[0].get_input_embeddings(), models[0].get_output_embeddings()
    assert embed.weight.dtype == head.weight.dtype == torch.bfloat16
    assert models[1].get_input_embeddings().weight.dtype == torch.float32  # PEFT's preparation
    four_bit = [m for m in models[0].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.weight.quant_state.dtype == torch.float32 for m in four_bit)  # no bf16 rounding
    norms = [p for n, p in models[0].named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    batch = polish_batch(kept.tokenizer)
    outs = []
    for model in models:
        model.train()
        outs.append(loss_and_gradients(model, batch))
    assert_same_loss_and_gradients(outs[0], outs[1])
    out = models[0](**batch)
    assert out.logits.dtype == torch.float32  # computed in the compute dtype, not bf16
    prompt = kept.tokenizer(["Warszawa jest"], return_tensors="pt")
    greedy = []
    for model in models:  # generation (KV cache, one token at a time) goes through the same head
        model.eval()
        with torch.no_grad():
            greedy.append(model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=True))
    assert torch.equal(greedy[0], greedy[1]) and greedy[0].shape[1] > prompt["input_ids"].shape[1]


def test_4bit_kept_embeddings_train_and_stay_frozen(bf16_model_dir, tmp_path, alpaca_file):
    pipeline = pipeline_for(bf16_model_dir, tmp_path, alpaca_file, keep=True)
    model = pipeline.load_model()
    embed_before = model.get_input_embeddings().weight.detach().clone()
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = pipeline.tokenizer(["Warszawa jest stolicą Polski."], return_tensors="pt")
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n].detach(), v) for n, v in lora_before.items())
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_trained_head_is_cast_to_float32(bf16_model_dir, tmp_path, alpaca_file):
    pipeline = pipeline_for(bf16_model_dir, tmp_path, alpaca_file, keep=True, modules_to_save=["lm_head"])
    model = pipeline.load_model()
    assert model.get_input_embeddings().weight.dtype == torch.float32
    trained = [p for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)


def test_plan_counts_16bit_embeddings(bf16_model_dir, tmp_path, alpaca_file):
    from wronai.runtime.memory_plan import plan_config

    sizes = []
    for keep in (True, False):
        raw = make_config_dict(
            bf16_model_dir,
            alpaca_file,
            tmp_path / "o",
            quantization={"load_in_4bit": True, "keep_embeddings_dtype": keep},
        )
        plan, _ = plan_config(load_config(data=raw))
        sizes.append(plan.estimate.parts["base weights"])
    shape_vocab_hidden = 500 * 64 * 2  # untied embedding + head of the tiny model
    assert sizes[1] - sizes[0] >= shape_vocab_hidden * 2  # 2 bytes less per parameter


def test_cli_run_with_8bit_optimizer_on_cpu_and_kept_embeddings(bf16_model_dir, tmp_path):
    """The classic default `optim: paged_adamw_8bit` trains on CPU as 8-bit AdamW; the adapter loads in stock PEFT."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import train_via_cli

    out = train_via_cli(
        tmp_path, bf16_model_dir, rows=40, training={"optim": "paged_adamw_8bit", "max_steps": 4}
    )
    provenance = json.loads((out / "provenance.json").read_text())
    assert "adamw_8bit" in json.dumps(provenance)
    losses = [
        e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e
    ]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # finite, one per step
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bf16_model_dir), out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the optimizer moved it


def test_8bit_optimizer_states_are_8bit_on_cpu(bf16_model_dir, tmp_path, alpaca_file):
    raw = make_config_dict(
        bf16_model_dir, alpaca_file, tmp_path / "out", training={"optim": "paged_adamw_8bit", "max_steps": 2}
    )
    # bitsandbytes keeps 32-bit states for tensors under 4096 elements: r=64 makes lora_A 64 x 64
    raw["lora"].update(r=64, lora_alpha=128)
    pipeline = Pipeline(load_config(data=raw))
    trainer = pipeline.build_trainer()
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert type(optimizer).__module__.startswith("bitsandbytes")
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    assert any(t.dtype == torch.uint8 for t in states)  # quantized moments, not fp32 AdamW
