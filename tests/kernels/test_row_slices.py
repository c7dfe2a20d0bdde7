"""4-bit layers dequantized in row slices: the same products and gradients as bitsandbytes' whole weights."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from conftest import (
    assert_same_as_reference,
    assert_same_loss_and_gradients,
    loss_and_gradients,
    make_config_dict,
    polish_batch,
    quantized_linear,
)
from wronai.config import load_config
from wronai.kernels import bnb as kbit_chunks
from wronai.model import loading
from wronai.model.lora import apply_lora
from wronai.model.tokenizer import load_tokenizer
from wronai.runtime import hardware


@pytest.mark.parametrize(
    ("rows", "cols", "quant_type", "nested", "bias", "chunk_rows", "shape"),
    [
        (300, 256, "nf4", True, False, 64, (3, 5)),  # chunks that do not divide the rows
        (300, 256, "fp4", True, True, 7, (4,)),
        (128, 64, "nf4", False, True, 1, (2, 3)),  # one row per chunk, scales not double-quantized
        (96, 128, "fp4", False, False, 1000, (6,)),  # one chunk larger than the weight
    ],
)
def test_chunked_linear_equals_bitsandbytes(rows, cols, quant_type, nested, bias, chunk_rows, shape):
    layer = quantized_linear(rows, cols, quant_type, nested, bias)
    state, chunk_bytes = layer.weight.quant_state, chunk_rows * cols * 4
    assert_same_as_reference(
        lambda x: kbit_chunks.chunked_4bit_linear(x, layer.weight.data, state, chunk_bytes, layer.bias),
        layer,
        torch.randn(*shape, cols),
        tol=1e-5,
    )


def test_block_scales_undo_double_quantization():
    import bitsandbytes.functional as bnbf

    layer = quantized_linear(128, 256, "nf4", True, False)
    state = layer.weight.quant_state
    scales = kbit_chunks.block_scales(state)
    assert scales.dtype == torch.float32 and scales.numel() == 128 * 256 // state.blocksize
    whole = bnbf.dequantize_4bit(layer.weight.data, state)
    rows = torch.ops.bitsandbytes.dequantize_4bit.default(
        layer.weight.data.reshape(-1), scales, state.blocksize, state.quant_type, [128, 256], torch.float32
    )
    assert torch.equal(whole, rows)


@pytest.mark.parametrize(
    ("rows", "cols", "chunkable"),
    [(128, 256, True), (128, 96, False)],  # 96 columns: a row is not a whole number of 64-value blocks
)
def test_chunkable_needs_rows_of_whole_blocks(rows, cols, chunkable):
    layer = quantized_linear(rows, cols, "nf4", True, False)
    assert kbit_chunks.chunkable(layer.weight.quant_state) is chunkable


def test_only_layers_larger_than_a_chunk_are_switched():
    small, large = quantized_linear(64, 64, "nf4", True, False), quantized_linear(256, 64, "nf4", True, False)
    model = torch.nn.Sequential(small, large)
    assert (
        kbit_chunks.chunk_4bit_layers(model, chunk_bytes=64 * 64 * 4) == 1
    )  # the 64x64 weight fits one chunk
    assert type(small) is bnb.nn.Linear4bit and type(large) is kbit_chunks.RowSlicedLinear4bit
    x = torch.randn(2, 64)
    torch.testing.assert_close(model(x), large(small(x)))


def test_4bit_model_with_chunked_layers_has_the_same_loss_and_gradients(
    tiny_model_dir, tmp_path, alpaca_file, monkeypatch
):
    """The tiny 4-bit Llama through WronAI's builders, chunked (16 rows at a time) and not."""
    calls: list[int] = []
    sliced = kbit_chunks.chunked_4bit_linear
    monkeypatch.setattr(
        kbit_chunks, "chunked_4bit_linear", lambda *args, **kw: calls.append(1) or sliced(*args, **kw)
    )
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", quantization={"load_in_4bit": True})
    cfg = load_config(data=raw)
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    tok, _ = load_tokenizer(cfg.model, cfg.polish)
    batch = polish_batch(tok)
    results = []
    for chunk_bytes in (0, 16 * 64 * 4):
        torch.manual_seed(0)
        base = loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan)
        model = apply_lora(
            base, cfg.lora.model_copy(update={"lora_dropout": 0.0}), [], gradient_checkpointing=True,
            dequantize_chunk_bytes=chunk_bytes,
        )  # fmt: skip
        switched = [m for m in model.modules() if isinstance(m, kbit_chunks.RowSlicedLinear4bit)]
        assert bool(switched) is bool(chunk_bytes)
        model.train()
        calls.clear()
        results.append(loss_and_gradients(model, batch))
        assert len(calls) == 2 * len(switched)  # each switched layer: forward + checkpointed recomputation
    assert_same_loss_and_gradients(results[1], results[0])


@pytest.mark.parametrize(
    ("sections", "chunk_bytes"),
    [
        ({}, 2 * 2**20),
        ({"quantization": {"dequantize_chunk_mib": 0}}, 0),  # whole weights, as bitsandbytes
        ({"quantization": {"dequantize_chunk_mib": 16}}, 16 * 2**20),
        ({"quantization": {"load_in_4bit": False}}, 0),
    ],
)
def test_plan_dequantizes_in_chunks_on_cpu(sections, chunk_bytes):
    data = {"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}, "hardware": {"device": "cpu"}}
    for group, values in sections.items():
        data.setdefault(group, {}).update(values)
    cfg = load_config(data=data)
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    assert plan.dequantize_chunk_bytes == chunk_bytes
    assert ("MiB at a time" in " ".join(plan.describe())) is bool(chunk_bytes)


def test_negative_chunk_size_is_refused():
    from wronai.errors import ConfigError

    with pytest.raises(ConfigError, match="quantization.dequantize_chunk_mib"):
        load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"},
                          "quantization": {"dequantize_chunk_mib": -1}})  # fmt: skip
