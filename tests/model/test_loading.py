"""Model preparation: pad token, Polish special tokens + embedding rows, 4-bit layers, LoRA."""

from __future__ import annotations

import pytest
import torch

from conftest import make_config_dict
from wronai.config import load_config
from wronai.errors import WronAIError
from wronai.model import loading
from wronai.model.embeddings import resize_embeddings
from wronai.model.kbit import gradient_checkpointing_on
from wronai.model.lora import apply_lora
from wronai.model.tokenizer import set_pad_token
from wronai.recipe import Pipeline
from wronai.runtime.hardware import plan_device


def config(tiny_model_dir, tmp_path, alpaca_file, **sections):
    return load_config(data=make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", **sections))


@pytest.mark.parametrize("four_bit", [True, False], ids=["qlora-4bit", "lora-fp32"])
def test_gradient_checkpointing_is_on_without_deprecated_calls(
    tiny_model_dir, tmp_path, alpaca_file, four_bit
):
    """transformers 5 deprecates gradient_checkpointing_enable (FutureWarning): WronAI uses the new name."""
    import warnings

    cfg = config(tiny_model_dir, tmp_path, alpaca_file, quantization={"load_in_4bit": four_bit})
    plan = plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    base = loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing_enable.*")
        model = apply_lora(base, cfg.lora, [], gradient_checkpointing=True)
    assert gradient_checkpointing_on(model)


def test_pad_token_prefers_unk_and_never_breaks_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.pad_token is None
    set_pad_token(tok)
    assert tok.pad_token == tok.unk_token != tok.eos_token
    tok2 = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok2.unk_token = None
    set_pad_token(tok2)
    assert tok2.pad_token == tok2.eos_token


@pytest.mark.parametrize("four_bit", [True, False], ids=["qlora-4bit", "lora-fp32"])
def test_lora_trains_only_adapters(tiny_model_dir, tmp_path, alpaca_file, four_bit):
    cfg = config(tiny_model_dir, tmp_path, alpaca_file, quantization={"load_in_4bit": four_bit})
    pipeline = Pipeline(cfg)
    model = pipeline.load_model()
    import bitsandbytes as bnb

    has_4bit = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert has_4bit is four_bit
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not p.requires_grad and p.dtype.is_floating_point
    }
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = pipeline.tokenizer(["Warszawa jest stolicą Polski."], return_tensors="pt")
    for _ in range(2):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n].detach(), v) for n, v in trainable.items() if "lora_B" in n)
    assert all(torch.equal(after[n].detach(), v) for n, v in frozen.items())


def test_polish_tokens_added_trained_saved_and_reloaded(tiny_model_dir, tmp_path, alpaca_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config(
        tiny_model_dir, tmp_path, alpaca_file,
        polish={"add_polish_tokens": True},
        training={"max_steps": 3, "learning_rate": 5e-2, "eval_strategy": "no", "save_strategy": "no"},
        data={"prompt_template": "<polish><question>{instruction}</question>\n<answer>"},
    )  # fmt: skip
    from wronai.recipe import run

    result = run(cfg)
    out = result.output_dir
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.convert_tokens_to_ids(["<polish>", "<answer>"])
    assert all(i >= 500 for i in ids)  # new ids past the base vocabulary
    assert tok.tokenize("<polish>")[0] == "<polish>"  # a single token, not split

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old_rows = base.get_input_embeddings().weight.detach().clone()
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, out)
    emb = model.get_input_embeddings()
    weight = emb.weight if hasattr(emb, "weight") else emb.token_adapter.base_layer.weight
    merged = model.merge_and_unload().get_input_embeddings().weight
    mean = old_rows.mean(dim=0)
    # the new rows were trained (moved away from their mean initialisation) and saved with the adapter
    assert not torch.allclose(merged[ids[0]], mean, atol=1e-4)
    assert weight.shape[0] == len(tok)
    # the old rows are untouched
    assert torch.allclose(merged[: old_rows.shape[0]], old_rows, atol=1e-6)


def test_resize_initialises_new_rows_at_mean(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    new_ids = resize_embeddings(model, old.shape[0] + 3)
    assert new_ids == [old.shape[0], old.shape[0] + 1, old.shape[0] + 2]
    rows = model.get_input_embeddings().weight[new_ids]
    assert torch.allclose(rows, old.mean(dim=0).expand(3, -1), atol=1e-6)


def test_bad_target_modules_is_a_clear_error(tiny_model_dir, tmp_path, alpaca_file):
    cfg = config(tiny_model_dir, tmp_path, alpaca_file, lora={"target_modules": ["c_attn"]})
    with pytest.raises(WronAIError, match="lora.target_modules"):
        Pipeline(cfg).load_model()


def test_local_model_dir_without_weights(tmp_path, alpaca_file):
    (tmp_path / "empty").mkdir()
    cfg = load_config(data=make_config_dict(tmp_path / "empty", alpaca_file, tmp_path / "out"))
    with pytest.raises(WronAIError, match="does not hold a loadable tokenizer"):
        Pipeline(cfg).load_tokenizer()


def test_quantization_config_follows_plan(tiny_model_dir, tmp_path, alpaca_file):
    cfg = config(tiny_model_dir, tmp_path, alpaca_file, quantization={"bnb_4bit_use_double_quant": True})
    plan = plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    bnb = loading.quantization_config(cfg.quantization, plan, cfg.hardware)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == plan.compute_dtype
    assert bnb.bnb_4bit_quant_storage == torch.uint8  # one process: bitsandbytes' packed bytes
    # FSDP shards the 4-bit weights with the others, so they are stored in the model's dtype
    sharded = cfg.hardware.model_copy(update={"distributed": "fsdp"})
    assert (
        loading.quantization_config(cfg.quantization, plan, sharded).bnb_4bit_quant_storage
        == plan.model_dtype
    )
