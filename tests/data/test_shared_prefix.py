"""A prompt start every example of a packed batch repeats, computed once: the layout, the attention that
reads it, the same loss and gradients, the token count and the plan (hardware.shared_prefix)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import plan_with_gpu, train_via_cli
from wronai.config import load_config
from wronai.data.collate import PackedCollator, pack_examples
from wronai.data.prefix import share_prefix, shared_prefix_length
from wronai.data.tokenize import IGNORE_INDEX
from wronai.errors import WronAIError
from wronai.kernels.native import find_compiler
from wronai.model.attention import LENGTHS_KWARG, PREFIX_KWARG, enable_packed_attention, packed_sdpa
from wronai.train.throughput import count_tokens

X = IGNORE_INDEX
HEAD = [11, 12, 13, 14, 15, 16]  # a template's opening, the same in every example


def _example(body: list[int], prompt: int) -> dict[str, list[int]]:
    """HEAD + body; the first ``prompt`` tokens of the whole example are untrained."""
    ids = HEAD + body
    return {"input_ids": ids, "labels": [X] * prompt + ids[prompt:]}


def _examples(gen: torch.Generator | None = None, count: int = 9) -> list[dict[str, list[int]]]:
    gen = gen or torch.Generator().manual_seed(3)
    out = []
    for i in range(count):
        body = torch.randint(
            20, 90, (int(torch.randint(3, 30, (1,), generator=gen)),), generator=gen
        ).tolist()
        out.append(_example(body, len(HEAD) + 1 + i % 3))
    return out


@pytest.mark.parametrize(
    ("examples", "expected"),
    [
        pytest.param([([1, 2, 3, 4, 5], [X] * 4 + [5]), ([1, 2, 3, 9, 9], [X] * 4 + [9])], 3, id="common-prompt-start"),
        # the token after the prefix is predicted from the prefix's last token: it must be a prompt token
        pytest.param([([1, 2, 3, 4, 5], [X, X, 3, 4, 5]), ([1, 2, 3, 4, 6], [X] * 4 + [6])], 1, id="stops-before-a-trained-label"),
        pytest.param([([1, 2, 3], [X] * 3), ([1, 2, 3, 4], [X] * 4)], 2, id="every-example-keeps-a-token"),
        pytest.param([([1, 2, 3], [X] * 3), ([7, 2, 3], [X] * 3)], 0, id="different-first-tokens"),
        pytest.param([([1, 2, 3], [X] * 3)], 0, id="one-example"),
    ],
)  # fmt: skip
def test_shared_prefix_length(examples, expected):
    assert shared_prefix_length(examples) == expected


def test_one_row_keeps_every_example_whole_in_content():
    examples = _examples()
    rows = pack_examples(examples, 64)
    assert len(rows) >= 2
    shared = share_prefix(rows)
    assert shared is not None
    row, prefix = shared
    assert prefix == len(HEAD)
    assert len(row["input_ids"]) == sum(len(e["input_ids"]) for e in examples) - prefix * (len(examples) - 1)
    # cut the row back into examples by their position ids: the first keeps the prefix, the others
    # continue it (positions from `prefix`) and put back together are the packed examples
    starts = [i for i, p in enumerate(row["position_ids"]) if i == 0 or p != row["position_ids"][i - 1] + 1]
    assert [row["position_ids"][s] for s in starts] == [0] + [prefix] * (len(examples) - 1)
    packed = [e for r in rows for e in _packed_examples(r)]
    for (start, end), (ids, labels) in zip(zip(starts, [*starts[1:], None]), packed, strict=True):
        head = [] if start == 0 else row["input_ids"][:prefix]
        assert head + row["input_ids"][start:end] == ids
        assert row["labels"][start] == X and row["labels"][start + 1 : end] == labels[len(head) + 1 :]


def _packed_examples(row: dict) -> list[tuple[list[int], list[int]]]:
    pos = row["position_ids"]
    starts = [i for i, p in enumerate(pos) if p == 0]
    return [(row["input_ids"][s:e], row["labels"][s:e]) for s, e in zip(starts, [*starts[1:], None])]


def test_too_short_a_prefix_keeps_the_rows():
    rows = pack_examples([_example([30 + i, 40], 7) for i in range(4)], 32)
    assert share_prefix(rows, min_tokens=len(HEAD) + 1) is None
    assert share_prefix(rows, min_tokens=len(HEAD)) is not None


def test_collator_shares_packed_training_rows_only():
    rows = pack_examples(_examples(), 64)
    shared = PackedCollator(pad_token_id=0, with_boundaries=True, share_prefix=True)(rows)
    plain = PackedCollator(pad_token_id=0, with_boundaries=True)(rows)
    assert shared["input_ids"].shape[0] == 1 < plain["input_ids"].shape[0]
    assert shared[PREFIX_KWARG] == [[0] + [len(HEAD)] * 8]
    assert PREFIX_KWARG not in plain  # batches that share nothing look as they did
    assert [len(r) for r in shared[LENGTHS_KWARG]] == [9]
    # the trained tokens are the same ones
    assert sorted(shared["labels"][shared["labels"] != X].tolist()) == sorted(
        plain["labels"][plain["labels"] != X].tolist()
    )
    # tokens/s counts each example's own tokens, the prefix included
    assert (
        count_tokens(shared, (), 0)
        == count_tokens(plain, (), 0)
        == sum(len(e["input_ids"]) for e in _examples())
    )
    # no boundaries (no per-example attention) or evaluation rows (no position ids): a row per example, as before
    no_bounds = PackedCollator(pad_token_id=0, share_prefix=True)(rows)
    assert no_bounds["input_ids"].shape == plain["input_ids"].shape and PREFIX_KWARG not in no_bounds
    evals = [{k: e[k] for k in ("input_ids", "labels")} for e in _examples()[:3]]
    assert (
        PackedCollator(pad_token_id=0, with_boundaries=True, share_prefix=True)(evals)["input_ids"].shape[0]
        == 3
    )


def _gqa_llama(native: str = "off"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa", use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper weights: attending to the wrong keys would visibly change the loss
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    assert enable_packed_attention(model, native)
    return model.train()


@pytest.mark.parametrize(
    ("autocast", "multiple"),
    [(None, None), (torch.bfloat16, 64)],  # bf16 CPU runs pad rows to a multiple of 64 (a padding block)
    ids=["fp32", "bf16-autocast-padded"],
)
@pytest.mark.parametrize(
    "native",
    ["off", pytest.param("auto", marks=pytest.mark.skipif(find_compiler() is None, reason="no C compiler"))],
)
def test_same_loss_and_gradients_as_every_example_its_own_prefix(autocast, multiple, native):
    """Against sdpa with every example its own prefix; the shared layout by sdpa or the compiled kernel."""
    rows = pack_examples(_examples(count=12), 64)
    results = []
    for share in (False, True):
        model = _gqa_llama(native if share else "off")
        collator = PackedCollator(
            pad_token_id=0, pad_to_multiple_of=multiple, with_boundaries=True, share_prefix=share
        )
        batch = collator(rows)
        if share and multiple:
            assert (
                batch["input_ids"].shape[1] % multiple == 0 and batch[PREFIX_KWARG][0][-1] == 0
            )  # pad block
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(**batch).loss
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad for n, p in model.named_parameters()}, batch["input_ids"].numel())
        )
    (loss, grads, positions), (ref_loss, ref_grads, ref_positions) = results[1], results[0]
    assert positions < ref_positions - 10 * len(HEAD)
    tol = 1e-5 if autocast is None else 2e-2
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for name, grad in grads.items():  # the prefix's gradient sums every example's share of it
        torch.testing.assert_close(grad, ref_grads[name], rtol=tol * 10, atol=tol, msg=name)


def test_attention_refuses_a_layout_it_cannot_read():
    q = torch.randn(1, 2, 12, 8)
    lengths = {LENGTHS_KWARG: [[6, 3, 3]]}
    module = torch.nn.Module()
    with pytest.raises(WronAIError, match="hardware.shared_prefix: off"):  # two different prefixes
        packed_sdpa(module, q, q, q, None, **lengths, **{PREFIX_KWARG: [[0, 2, 3]]})
    with pytest.raises(WronAIError, match="hardware.shared_prefix: off"):  # attention weights asked for
        packed_sdpa(module, q, q, q, None, output_attentions=True, **lengths, **{PREFIX_KWARG: [[0, 2, 2]]})
    out, _ = packed_sdpa(module, q, q, q, None, **lengths, **{PREFIX_KWARG: [[0, 2, 2]]})
    assert out.shape == (1, 12, 2, 8)


@pytest.mark.parametrize(
    ("written", "device", "expected"),
    [("auto", "cpu", True), ("auto", "cuda", False), ("on", "cuda", True), ("off", "cpu", False)],
)
def test_plan_shares_prefixes_on_cpu_runs(monkeypatch, written, device, expected):
    plan = plan_with_gpu(monkeypatch, hardware={"device": device, "shared_prefix": written})
    assert plan.shared_prefix is expected
    assert (
        "packed batches: a prompt start all their examples share computed once" in plan.describe()
    ) is expected


def test_a_bad_setting_is_one_line_naming_the_key():
    with pytest.raises(WronAIError, match="shared_prefix"):
        load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"},
                          "hardware": {"shared_prefix": "yes please"}})  # fmt: skip


def test_a_packed_cli_run_shares_the_template_opening(tmp_path, tiny_model_dir, capfd):
    """The Polish Alpaca template's opening is shared by every example of a batch on a CPU: the same losses
    as without it, and the run still counts every example's own tokens (tokens/s stays dataset tokens/s)."""
    runs = {}
    for setting in ("off", "auto"):
        out = train_via_cli(
            tmp_path / setting, tiny_model_dir, rows=40, data={"packing": True, "eval_fraction": 0.0},
            hardware={"shared_prefix": setting},
            training={"max_steps": -1, "num_train_epochs": 1, "save_strategy": "no", "logging_steps": 1,
                      "per_device_train_batch_size": 2},
        )  # fmt: skip
        shared = (
            "tokens of every example (the same prompt start) computed once per batch"
            in capfd.readouterr().err
        )
        assert shared is (setting == "auto")
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        runs[setting] = [
            (h["loss"], h["tokens_seen"], h.get("tokens_shared")) for h in history if "loss" in h
        ]
    assert len(runs["auto"]) == len(runs["off"]) >= 5
    for (loss, seen, shared), (ref_loss, ref_seen, ref_shared) in zip(runs["auto"], runs["off"], strict=True):
        assert seen == ref_seen
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        assert ref_shared is None and 0 < shared < seen / 3  # logged where tokens were computed once


def test_the_log_counts_shared_tokens_and_a_resumed_run_continues_the_count():
    from types import SimpleNamespace

    from wronai.train.throughput import ThroughputMemoryCallback

    rows = pack_examples(_examples(), 64)
    batch = PackedCollator(pad_token_id=0, with_boundaries=True, share_prefix=True)(rows)
    callback = ThroughputMemoryCallback()
    earlier = [{"loss": 1.0, "step": 5, "tokens_seen": 1000.0, "tokens_shared": 40.0}]
    state = SimpleNamespace(log_history=earlier, global_step=6)
    callback.on_train_begin(None, state, None, processing_class=SimpleNamespace(pad_token_id=0))
    callback._pre_forward(torch.nn.Linear(1, 1).train(), (), batch)
    logs = {"loss": 0.5}
    callback.on_log(SimpleNamespace(), state, None, logs=logs)
    assert logs["tokens_seen"] == 1000 + sum(len(e["input_ids"]) for e in _examples())
    assert logs["tokens_shared"] == 40 + len(HEAD) * (len(_examples()) - 1)
