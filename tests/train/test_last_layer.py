"""The last decoder layer's query/output projections and MLP at trained positions only: the same loss and
gradients, fewer rows computed, a start-up check that catches a model it would be wrong for, and the plan."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import collate_as, make_config_dict, plan_with_gpu, run_outcome, tiny_llama
from wronai.config import load_config
from wronai.data.collate import PaddingCollator
from wronai.data.tokenize import IGNORE_INDEX
from wronai.errors import WronAIError
from wronai.runtime import hardware
from wronai.train.last_layer import last_layer_parts, last_layer_problem
from wronai.train.loss import trained_positions_loss

X = IGNORE_INDEX


def _model(tiny_model_dir, lora: bool = True):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(tiny_model_dir)
    if lora:  # B initialised non-zero: gradients reach every adapter matrix
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model.train()


def _examples():
    gen = torch.Generator().manual_seed(5)
    out = []
    for n in (11, 30, 6, 19, 24):
        ids = torch.randint(5, 400, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [X] * (n // 2) + ids[n // 2 :]})
    return out


def _rows_seen(parts):
    """Rows each part's forward computed (batch × positions of the input its forward ran on: a forward hook
    sees the input the pre-hooks handed it)."""
    seen: list[int] = []
    for part in parts:
        part.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0] * args[0].shape[1]))
    return seen


def test_the_parts_are_the_last_layers_query_output_and_mlp(tiny_model_dir):
    model = _model(tiny_model_dir)
    last = model.get_base_model().model.layers[-1]
    parts, why = last_layer_parts(model)
    assert why is None
    assert parts == [last.self_attn.q_proj, last.self_attn.o_proj, last.mlp]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("multiple", [None, 64])
@pytest.mark.parametrize("fused", [False, True], ids=["head-then-loss", "fused-head-and-loss"])
def test_loss_and_gradients_equal_the_stock_forward_with_fewer_rows(tiny_model_dir, layout, multiple, fused):
    batch = collate_as(layout, _examples())
    stock_model, model = _model(tiny_model_dir), _model(tiny_model_dir)
    stock = stock_model(**batch).loss
    parts, _ = last_layer_parts(model)
    seen = _rows_seen(parts)
    ours = trained_positions_loss(model, batch, multiple=multiple, fused=fused, last_layer=parts)
    trained = int((batch["labels"][:, 1:] != X).sum())
    rows = trained if multiple is None else min(-(-trained // multiple) * multiple, batch["labels"].numel())
    assert seen == [rows] * 3 and trained < batch["labels"].numel()
    torch.testing.assert_close(ours, stock, rtol=1e-6, atol=1e-6)
    stock.backward()
    ours.backward()
    grads = 0
    for (name, p), q in zip(stock_model.named_parameters(), model.parameters(), strict=True):
        if p.requires_grad:
            grads += 1
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert grads == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    # the hooks are gone after the call: a plain forward computes every row
    model(**{k: v for k, v in batch.items() if k != "labels"})
    assert seen[-3:] == [batch["labels"].numel()] * 3


def _mixing_model(tiny_model_dir):
    """A model whose final norm mixes positions (each adds the mean of all before it): an untrained
    position's last-layer output reaches a trained position's logits, so the shortcut would be wrong."""

    class MixingNorm(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, hidden):
            steps = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
            return self.norm(hidden + hidden.cumsum(dim=1) / steps)

    model = _model(tiny_model_dir)
    inner = model.get_base_model().model
    inner.norm = MixingNorm(inner.norm)
    return model


def test_the_start_up_check_passes_a_llama_and_catches_a_model_that_mixes_positions(tiny_model_dir):
    batch = PaddingCollator(pad_token_id=0)(_examples())
    model = _model(tiny_model_dir)
    state = torch.random.get_rng_state()
    assert last_layer_problem(model, batch, last_layer_parts(model)[0]) is None
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random numbers are untouched
    assert all(p.grad is None for p in model.parameters())
    mixing = _mixing_model(tiny_model_dir)
    assert (
        last_layer_problem(mixing, batch, last_layer_parts(mixing)[0])
        == "loss differs from the stock forward's"
    )


def test_a_part_called_on_other_shapes_is_reported_not_raised(tiny_model_dir):
    batch = PaddingCollator(pad_token_id=0)(_examples())
    model = _model(tiny_model_dir)
    head = model.get_base_model().lm_head  # called on the trained rows only, not one row per position
    assert "was not called on one hidden state per position" in last_layer_problem(model, batch, [head])


def test_a_part_returning_more_than_one_tensor_is_a_one_line_error_naming_the_key():
    from wronai.train.last_layer import trained_rows_only

    class Pair(torch.nn.Module):
        def forward(self, hidden):
            return hidden, hidden

    part, mask = Pair(), torch.tensor([[True, False, True]])
    with trained_rows_only([part], mask), pytest.raises(WronAIError, match="last_layer_trained_only=off"):
        part(torch.ones(1, 3, 4))
    assert part(torch.ones(1, 3, 4))[0].shape == (1, 3, 4)  # the hooks are removed on the way out


@pytest.mark.parametrize(("mixing", "kept"), [(False, True), (True, False)])
def test_the_trainer_checks_once_and_computes_every_position_on_a_mismatch(
    tmp_path, tiny_model_dir, caplog, mixing, kept
):
    from transformers import TrainingArguments

    from wronai.train.trainer import GuardedTrainer

    net = _mixing_model(tiny_model_dir) if mixing else _model(tiny_model_dir)
    trainer = GuardedTrainer(
        model=net, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    )
    trainer.trained_logits_only = True
    trainer.last_layer_parts = parts = last_layer_parts(net)[0]
    seen = _rows_seen(parts[-1:])
    batch = PaddingCollator(pad_token_id=0)(_examples())
    with caplog.at_level(logging.INFO, logger="wronai.train.trainer"):
        first = trainer.compute_loss(net, batch)
        second = trainer.compute_loss(net, batch)
    assert (trainer.last_layer_parts == parts) is kept
    assert caplog.text.count("last decoder layer:") == 1  # checked once
    assert ("computed at every position — loss differs" in caplog.text) is not kept
    every, trained = batch["labels"].numel(), int((batch["labels"][:, 1:] != X).sum())
    # the check's two passes (8 of its 16 positions trained), then each step's
    assert seen == [16, 8] + [trained if kept else every] * 2
    stock = net(**batch).loss
    torch.testing.assert_close(first, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("every_n", "recomputed"), [(1, True), (2, False)])
def test_not_where_gradient_checkpointing_recomputes_the_last_layer(tiny_model_dir, every_n, recomputed):
    """Its recomputation in the backward would run without the hooks; transformers 5 can skip the last layer."""
    from wronai.model.kbit import enable_gradient_checkpointing

    model = _model(tiny_model_dir, lora=False)
    enable_gradient_checkpointing(model, every_n)  # layers 0, N, 2N, …: of 2 layers, N=2 leaves the last
    parts, why = last_layer_parts(model)
    assert (parts == []) is recomputed
    assert (why == "the last decoder layer is recomputed by gradient checkpointing") is recomputed


def test_a_model_without_decoder_layers_gives_the_reason():
    parts, why = last_layer_parts(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert parts == [] and why == "the model has no `layers` list of decoder layers"


def test_training_is_the_same_with_and_without(tmp_path, tiny_model_dir, capsys):
    """Three optimizer steps of the 4-bit pipeline with gradient accumulation: the same per-step losses and
    adapters; the plan and the log say which ran."""

    from conftest import train_via_cli

    runs = {}
    for setting in ("auto", "off"):
        capsys.readouterr()  # the CLI logs to stderr (its logging setup replaces pytest's log capture)
        out = train_via_cli(
            tmp_path / setting, tiny_model_dir, rows=40,
            hardware={"device": "cpu", "last_layer_trained_only": setting},
            training={"max_steps": 3, "gradient_accumulation_steps": 2, "save_strategy": "no",
                      "eval_strategy": "no", "per_device_train_batch_size": 2},
        )  # fmt: skip
        # the start-up check passed on the 4-bit model and the run kept it
        log = capsys.readouterr().err
        assert ("at trained positions only (hardware.last_layer_trained_only)" in log) is (setting == "auto")
        assert "computed at every position" not in log
        runs[setting] = run_outcome(out)
    (losses_on, adapter_on, plan_on), (losses_off, adapter_off, plan_off) = runs.values()
    on_line = "last decoder layer: query/output projections and MLP at trained positions only"
    assert on_line in plan_on and on_line not in plan_off
    assert len(losses_on) == 3
    assert losses_on == pytest.approx(losses_off, rel=1e-5)
    for key in adapter_off:
        torch.testing.assert_close(adapter_on[key], adapter_off[key], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    ("written", "device", "distributed", "logits_only", "bf16", "expected"),
    [
        ("auto", "cpu", "none", True, False, True),
        ("off", "cpu", "none", True, False, False),
        ("auto", "cpu", "none", True, True, False),  # bf16 on a CPU: a oneDNN kernel per row count
        ("on", "cpu", "none", True, True, True),
        ("auto", "cuda", "none", True, True, False),  # a GPU keeps the stock forward unless asked
        ("on", "cuda", "none", True, True, True),
        ("on", "cpu", "fsdp", True, False, False),  # sharded weights: never
        ("on", "cpu", "none", False, False, False),  # it works at trained positions only
        ("auto", "cpu", "none", False, False, False),
    ],
)
def test_plan(monkeypatch, written, device, distributed, logits_only, bf16, expected):
    plan = plan_with_gpu(
        monkeypatch, training={"trained_logits_only": logits_only, "bf16": bf16},
        hardware={"device": device, "last_layer_trained_only": written, "distributed": distributed},
    )  # fmt: skip
    assert plan.precision == ("bf16" if bf16 else "fp32")
    assert plan.last_layer_trained_only is expected
    line = "last decoder layer: query/output projections and MLP at trained positions only"
    assert (line in plan.describe()) is expected
    left_out = any("auto leaves out bf16/fp16 on a CPU" in line for line in plan.describe())
    assert left_out is (written == "auto" and device == "cpu" and bf16 and logits_only)
    assert any(
        "last_layer_trained_only works at trained positions only — off with training.trained_logits_only=false"
        in n
        for n in plan.notes
    ) is (written == "on" and not logits_only)


def test_autotune_choosing_bf16_on_a_cpu_leaves_it_out_of_auto():
    """The precision autotune decides after the plan: the property follows it."""
    import dataclasses

    cfg = load_config(
        data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"}, "hardware": {"device": "cpu"}}
    )
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    assert plan.last_layer_trained_only
    assert not dataclasses.replace(plan, precision="bf16").last_layer_trained_only
    assert dataclasses.replace(plan, precision="bf16", last_layer_rows="on").last_layer_trained_only


def test_a_bad_setting_is_one_line_naming_the_key(tiny_model_dir, alpaca_file, tmp_path):
    raw = make_config_dict(
        tiny_model_dir, alpaca_file, tmp_path / "out", hardware={"last_layer_trained_only": "yes"}
    )
    with pytest.raises(WronAIError, match="last_layer_trained_only"):
        load_config(data=raw)


def test_not_for_a_mixture_of_experts_that_counts_every_position_in_its_router_loss():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
    )  # fmt: skip
    parts, why = last_layer_parts(MixtralForCausalLM(config))
    assert parts == [] and "router loss" in why
    config.output_router_logits = False
    assert len(last_layer_parts(MixtralForCausalLM(config))[0]) == 3
