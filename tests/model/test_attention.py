"""Per-example attention for packed rows: same numbers as running each example alone, at per-example cost."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wronai.data.collate import PackedCollator, pack_examples
from wronai.data.tokenize import IGNORE_INDEX
from wronai.kernels.native import find_compiler
from wronai.model.attention import (
    LENGTHS_KWARG,
    NATIVE_ATTENTION,
    PACKED_SDPA,
    cpu_half_attention,
    enable_packed_attention,
    example_lengths,
    packed_sdpa,
    sequence_boundaries,
)
from wronai.model.kbit import enable_gradient_checkpointing

X = IGNORE_INDEX
# per-example attention by sdpa, and by the compiled kernel where this machine can build it
NATIVE = [
    "off",
    pytest.param("auto", marks=pytest.mark.skipif(find_compiler() is None, reason="no C compiler")),
]


@pytest.mark.parametrize(
    ("positions", "expected"),
    [
        pytest.param([[0, 1, 2, 3]], [0, 4], id="one-example"),
        pytest.param([[0, 1, 0, 1, 2]], [0, 2, 5], id="two-examples"),
        pytest.param([[0, 1, 2], [0, 0, 1]], [0, 3, 4, 6], id="row-start-is-a-boundary"),
        pytest.param([[0, 1, 2], [3, 4, 5]], [0, 3, 6], id="continuing-positions-still-split-by-row"),
        pytest.param([[0], [0]], [0, 1, 2], id="single-tokens"),
        pytest.param([[0, 1, 2, 0, 1, 0]], [0, 3, 5, 6], id="pad-block-is-its-own-example"),
        pytest.param([[5, 6, 0, 1]], [0, 2, 4], id="not-starting-at-zero"),
    ],
)
def test_sequence_boundaries(positions, expected):
    bounds = sequence_boundaries(torch.tensor(positions))
    assert bounds.dtype == torch.int32
    assert bounds.tolist() == expected


@pytest.mark.parametrize(
    ("bounds", "batch", "length", "expected"),
    [
        pytest.param([0, 4], 1, 4, [[4]], id="one-example"),
        pytest.param([0, 2, 5], 1, 5, [[2, 3]], id="two-examples"),
        pytest.param([0, 3, 4, 6], 2, 3, [[3], [1, 2]], id="two-rows"),
        pytest.param([0, 1, 2], 2, 1, [[1], [1]], id="single-tokens"),
        pytest.param([0, 5, 6], 2, 3, [[3], [2, 1]], id="example-crossing-a-row-end-is-cut"),
    ],
)
def test_example_lengths(bounds, batch, length, expected):
    rows = example_lengths(torch.tensor(bounds, dtype=torch.int32), batch, length)
    assert rows == expected
    assert [sum(r) for r in rows] == [length] * batch
    assert example_lengths(bounds, batch, length) == expected  # the same from plain ints


def test_collator_adds_boundaries_only_when_asked():
    rows = pack_examples([{"input_ids": list(range(n)), "labels": list(range(n))} for n in (3, 2, 4)], 5)
    plain = PackedCollator(pad_token_id=0)(rows)
    assert "cu_seq_lens_q" not in plain and LENGTHS_KWARG not in plain
    batch = PackedCollator(pad_token_id=0, with_boundaries=True)(rows)
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist()
    lengths = (batch["cu_seq_lens_q"][1:] - batch["cu_seq_lens_q"][:-1]).tolist()
    assert sum(lengths) == batch["input_ids"].numel()
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths) == 4
    # the per-row example lengths as plain Python ints, for the attention calls (no device sync there)
    per_row = batch[LENGTHS_KWARG]
    assert per_row == example_lengths(batch["cu_seq_lens_q"], *batch["input_ids"].shape)
    assert [n for row in per_row for n in row] == lengths
    assert all(type(n) is int for row in per_row for n in row)


def _model(tiny_model_dir):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # sharper weights so attention to another example would visibly change the output
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2 if "embed" in name else 0.15)
    model.config.use_cache = False
    return model


@pytest.fixture(scope="module")
def packed_rows():
    gen = torch.Generator().manual_seed(1)
    examples = []
    for n in (7, 30, 12, 1, 50, 9, 23, 40, 3):
        ids = torch.randint(5, 400, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]})
    rows = pack_examples(examples, 64)
    assert len(rows) >= 3 and any(r["position_ids"].count(0) >= 3 for r in rows)
    return examples, rows


def test_enable_switches_only_sdpa_models(tiny_model_dir):
    from transformers import LlamaForCausalLM

    model = _model(tiny_model_dir)
    assert enable_packed_attention(model) is True
    assert model.config._attn_implementation == PACKED_SDPA
    eager = LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert enable_packed_attention(eager) is False
    assert eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("native", NATIVE)
def test_packed_logits_equal_each_example_alone(tiny_model_dir, packed_rows, native):
    examples, rows = packed_rows
    model = _model(tiny_model_dir).eval()
    enable_packed_attention(model, native)
    assert model.config._attn_implementation == (NATIVE_ATTENTION if native == "auto" else PACKED_SDPA)
    batch = PackedCollator(pad_token_id=0, with_boundaries=True)(rows)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        model.set_attn_implementation("sdpa")
        length = batch["input_ids"].shape[1]
        bounds = batch["cu_seq_lens_q"].tolist()
        checked = 0
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            row, s, e = start // length, start % length, start % length + end - start
            ids = batch["input_ids"][
                row, s:e
            ]  # an example, or a row's pad block (also attends only to itself)
            alone = model(input_ids=ids[None]).logits[0]
            torch.testing.assert_close(logits[row, s:e], alone, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= len(examples)


@pytest.mark.parametrize("native", NATIVE)
def test_packed_gradients_equal_the_masked_path(tiny_model_dir, packed_rows, native):
    """Backward too: the per-example path gives the same loss and gradients as transformers' block-diagonal mask."""
    _, rows = packed_rows

    def loss_and_grads(per_example: bool):
        model = _model(tiny_model_dir).train()
        enable_gradient_checkpointing(model)
        if per_example:
            assert enable_packed_attention(model, native)
        batch = PackedCollator(pad_token_id=0, with_boundaries=per_example)(rows)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_calls_read_no_tensor_back_to_the_host(
    tiny_model_dir, tiny_tokenizer, packed_rows, monkeypatch
):
    """The cut points come once per batch from the collator: no attention call reads a boundary tensor back
    (on CUDA each .tolist()/.item() waits for the GPU: once per layer per step), also after the Trainer's
    input preparation; every example still gets its own sdpa call."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from wronai.train.trainer import build_trainer

    _, rows = packed_rows
    model = _model(tiny_model_dir).eval()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], remove_unused_columns=False)
    trainer = build_trainer(
        model, tiny_tokenizer, args, SimpleNamespace(packed=True, train=rows, eval=None), []
    )
    batch = trainer._prepare_inputs(trainer.data_collator(rows))  # what compute_loss hands the model
    per_row = batch[LENGTHS_KWARG]
    assert isinstance(per_row, list) and all(type(n) is int for row in per_row for n in row)
    watched = {id(batch["cu_seq_lens_q"]), id(batch["cu_seq_lens_k"])}
    reads: list[str] = []
    for name in ("tolist", "item", "numpy", "cpu", "__int__", "__index__", "__iter__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            if id(self) in watched:
                reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    assert reads == []
    assert len(calls) == model.config.num_hidden_layers * sum(len(row) for row in per_row)  # per example


def test_boundaries_off_the_cpu_without_lengths_fall_back_to_sdpa():
    """Without the collator's lengths a boundary tensor on a device is never read back: plain sdpa runs
    (a meta tensor stands in for a CUDA one — reading it back raises)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module().eval()
    module.is_causal = True
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen) for _ in range(3))
    ref, _ = sdpa_attention_forward(module, q, k, v, None)
    on_device = torch.tensor([0, 2, 6], dtype=torch.int32, device="meta")
    out, _ = packed_sdpa(module, q, k, v, None, cu_seq_lens_q=on_device, cu_seq_lens_k=on_device)
    torch.testing.assert_close(out, ref)
    # with the lengths the boundary tensor is not needed: two examples, each causal on its own
    split, _ = packed_sdpa(module, q, k, v, None, cu_seq_lens_q=on_device, **{LENGTHS_KWARG: [[2, 4]]})
    torch.testing.assert_close(
        split[:, 2:], sdpa_attention_forward(module, q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], None)[0]
    )
    assert not torch.allclose(split[:, 2:], ref[:, 2:])


def test_without_boundaries_it_is_plain_sdpa_generation_included(tiny_model_dir, tiny_tokenizer):
    model = _model(tiny_model_dir).eval()
    model.config.use_cache = True
    prompts = tiny_tokenizer(
        ["Ala ma kota", "Dzień dobry, jak się masz? Bardzo"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        ref_logits = model(**prompts).logits
        ref = model.generate(
            **prompts, max_new_tokens=8, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id
        )
        enable_packed_attention(model)
        logits = model(**prompts).logits
        out = model.generate(
            **prompts, max_new_tokens=8, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id
        )
    torch.testing.assert_close(logits, ref_logits)
    assert out.tolist() == ref.tolist()


def test_trainer_uses_per_example_attention_for_packed_data(tiny_model_dir, tiny_tokenizer):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from wronai.train.trainer import build_trainer

    model = _model(tiny_model_dir)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], remove_unused_columns=False)
    rows = pack_examples([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}] * 4, 8)
    prepared = SimpleNamespace(packed=True, train=rows, eval=None)
    trainer = build_trainer(model, tiny_tokenizer, args, prepared, [])
    assert trainer.data_collator.with_boundaries is True
    assert model.config._attn_implementation == PACKED_SDPA
    unpacked = SimpleNamespace(packed=False, train=rows, eval=None)
    assert not hasattr(
        build_trainer(_model(tiny_model_dir), tiny_tokenizer, args, unpacked, []).data_collator,
        "with_boundaries",
    )


def test_packed_collator_takes_unpacked_eval_rows():
    """The eval split is never packed, yet the Trainer uses one collator: rows without position ids are one example each."""
    rows = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8, 9], "labels": [X, 9]}]
    batch = PackedCollator(pad_token_id=0, with_boundaries=True)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6]
    assert batch["labels"].tolist() == [[X, 6, 7], [X, 9, X]]


def test_packed_training_with_evaluation_end_to_end(tmp_path, tiny_model_dir):
    import json

    from conftest import train_via_cli

    out = train_via_cli(
        tmp_path, tiny_model_dir, rows=40, data={"packing": True, "eval_fraction": 0.2},
        training={"max_steps": 3, "eval_steps": 3, "save_strategy": "no", "per_device_train_batch_size": 2},
    )  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in h for h in history)


class _SdpaDtypes(TorchDispatchMode):
    """The dtypes the aten attention kernels receive — below autocast, so what really runs."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["bf16-queries", "fp32-queries-under-bf16-autocast"])
def test_cpu_half_attention_runs_in_fp32(case):
    """bf16 attention on a CPU is slower for short examples and caches kernels per length for good: both the
    per-example and the plain path compute it in fp32 and hand back bf16, as sdpa would."""
    module = torch.nn.Module().eval()
    module.is_causal = True
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 8, generator=gen) for _ in range(3))
    lengths = {LENGTHS_KWARG: [[10, 30], [25, 15]]}
    ref_split, _ = packed_sdpa(module, q, k, v, None, **lengths)
    ref_plain, _ = packed_sdpa(module, q, k, v, None)
    half = case == "bf16-queries"
    inputs = [t.bfloat16() for t in (q, k, v)] if half else [q, k, v]
    context = contextlib.nullcontext() if half else torch.autocast("cpu", dtype=torch.bfloat16)
    with _SdpaDtypes() as mode, context:
        split, _ = packed_sdpa(module, *inputs, None, **lengths)
        plain, _ = packed_sdpa(module, *inputs, None)
    assert len(mode.dtypes) == 5 and set(mode.dtypes) == {torch.float32}
    assert split.dtype == plain.dtype == torch.bfloat16
    tol = {"atol": 2e-2, "rtol": 2e-2} if half else {}  # bf16 inputs: rounded once on the way in
    torch.testing.assert_close(split, ref_split.bfloat16(), **tol)
    torch.testing.assert_close(plain, ref_plain.bfloat16(), **tol)


def test_half_attention_off_the_cpu_is_left_alone():
    assert cpu_half_attention(torch.empty(1, dtype=torch.bfloat16, device="meta")) is None
    assert cpu_half_attention(torch.empty(1)) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_half_attention(torch.empty(1)) is torch.bfloat16


@pytest.mark.parametrize("bf16", [True, False])
def test_bf16_cpu_batches_have_few_lengths_and_fp32_attention(tiny_model_dir, tiny_tokenizer, bf16):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from wronai.train.trainer import CPU_HALF_LENGTH_MULTIPLE, build_trainer

    args = TrainingArguments(
        output_dir="unused", use_cpu=True, bf16=bf16, report_to=[], remove_unused_columns=False
    )
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}] * 4
    for packed in (True, False):
        model = _model(tiny_model_dir)
        data = rows if not packed else pack_examples(rows, 8)
        prepared = SimpleNamespace(packed=packed, train=data, eval=None)
        trainer = build_trainer(model, tiny_tokenizer, args, prepared, [])
        collator = trainer.data_collator
        assert collator.pad_to_multiple_of == (CPU_HALF_LENGTH_MULTIPLE if bf16 else None)
        assert collator(data)["input_ids"].shape[1] == (
            CPU_HALF_LENGTH_MULTIPLE if bf16 else len(data[0]["input_ids"])
        )
        switched = model.config._attn_implementation == PACKED_SDPA
        assert switched == (packed or bf16)
        seen: list[int] = []  # the head's positions: bucketed on bf16 CPU runs, exactly the trained ones else
        model.lm_head.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.shape[1]))
        ids = list(range(5, 45))  # 2 rows of 80 positions, 4 x 9 of them trained
        answers = [{"input_ids": ids, "labels": [X] * 30 + ids[30:]}] * 4
        batch = PackedCollator(pad_token_id=0)(pack_examples(answers, 80))  # unpadded
        trained = int((batch["labels"][:, 1:] != X).sum())
        trainer.compute_loss(model, batch)
        assert trained < CPU_HALF_LENGTH_MULTIPLE < batch["input_ids"].numel()
        assert seen == [CPU_HALF_LENGTH_MULTIPLE if bf16 else trained]
