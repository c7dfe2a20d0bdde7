"""Fused LoRA layers: the same outputs, input gradients and adapter gradients as PEFT's modules."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    assert_same_loss_and_gradients,
    loss_and_gradients,
    make_config_dict,
    polish_batch,
    quantized_linear,
)
from wronai.config import load_config
from wronai.kernels import fused_lora
from wronai.model import loading
from wronai.model.lora import apply_lora
from wronai.model.tokenizer import load_tokenizer
from wronai.runtime import hardware

FUSED = tuple(fused_lora.SWAPS.values())


class Wrapper(torch.nn.Module):
    def __init__(self, proj: torch.nn.Module, four_bit: bool) -> None:
        super().__init__()
        self.proj = proj
        self.is_loaded_in_4bit = four_bit  # PEFT wraps bitsandbytes layers of 4-bit models only


def lora_layer(base: str, dropout: float = 0.0, **lora):
    """A PEFT model around one 128 -> 192 linear layer of the given kind, with a non-zero lora_B."""
    from peft import LoraConfig, get_peft_model

    if base == "dense":
        torch.manual_seed(0)
        proj: torch.nn.Module = torch.nn.Linear(128, 192, bias=True)
    else:
        quant_type, nested, bias = {"nf4": ("nf4", True, False), "fp4": ("fp4", False, True)}[base]
        proj = quantized_linear(192, 128, quant_type, nested, bias)
    model = get_peft_model(
        Wrapper(proj, base != "dense"),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"], **lora),
    )
    layer = model.base_model.model.proj
    torch.manual_seed(1)
    for name in layer.lora_B:
        torch.nn.init.normal_(layer.lora_B[name].weight, std=0.1)
    return model, layer


def forward_backward(layer, x: torch.Tensor, seed: int = 3):
    """Output, input gradient and adapter gradients of one forward/backward of ``layer``."""
    params = [p for p in layer.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = layer(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
    return out.detach(), x.grad, [p.grad.clone() for p in params]


@pytest.fixture
def fused_calls(monkeypatch):
    calls: list[int] = []
    apply = fused_lora._LoraLinear.apply
    monkeypatch.setattr(fused_lora._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize(
    ("base", "dropout", "chunk_rows", "lora", "shape"),
    [
        ("nf4", 0.0, 0, {}, (3, 5)),  # double-quantized scales, whole weight
        ("fp4", 0.0, 0, {}, (7,)),  # plain scales, a frozen bias
        ("nf4", 0.0, 50, {}, (2, 4)),  # row slices (quantization.dequantize_chunk_mib) that do not divide 192
        ("nf4", 0.2, 0, {}, (4, 6)),  # dropout: the same mask from the same generator
        ("fp4", 0.1, 64, {"use_rslora": True}, (2, 9)),  # scaling 8 / sqrt(4): not a power of two
        ("dense", 0.0, 0, {}, (3, 5)),  # a non-quantized base with a bias
        ("dense", 0.3, 0, {}, (11,)),
    ],
)
def test_fused_layer_equals_peft(base, dropout, chunk_rows, lora, shape, fused_calls, monkeypatch):
    from wronai.kernels import bnb as kbit_chunks

    model, layer = lora_layer(base, dropout, **lora)
    if chunk_rows:
        layer.base_layer.chunk_bytes = chunk_rows * 128 * 4
    model.train()
    x = torch.randn(*shape, 128)
    reference = forward_backward(layer, x)
    assert fused_lora.fuse_lora_layers(model, check=False) == 1
    slices: list[int] = []  # rows of every 4-bit slice dequantized (forward and backward)
    rows = kbit_chunks.FourBitRows.rows
    monkeypatch.setattr(
        kbit_chunks.FourBitRows,
        "rows",
        lambda self, t, a, b, d: slices.append(b - a) or rows(self, t, a, b, d),
    )
    fused = forward_backward(layer, x)
    assert len(fused_calls) == 1
    if base != "dense":  # whole weight: once forward, once backward; else row slices, each way
        step = chunk_rows or 192
        assert slices == [min(step, 192 - start) for start in range(0, 192, step)] * 2
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], reference[1], rtol=1e-5, atol=1e-5)
    assert len(fused[2]) == len(reference[2]) == 2  # lora_A and lora_B
    for got, want in zip(fused[2], reference[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_input_without_gradient_gets_none_and_adapter_still_trains(fused_calls):
    model, layer = lora_layer("nf4")
    fused_lora.fuse_lora_layers(model, check=False)
    x = torch.randn(4, 128)  # e.g. the embeddings' output when nothing before the first layer is trained
    layer(x).sum().backward()
    assert fused_calls and x.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters() if p.requires_grad)


def test_eval_mode_turns_dropout_off(fused_calls):
    model, layer = lora_layer("nf4", dropout=0.5)
    fused_lora.fuse_lora_layers(model, check=False)
    model.eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        first, second = layer(x), layer(x)
        reference = fused_lora.stock_forward(layer, x)
    assert len(fused_calls) == 2
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-5)


def _merged(model, layer):
    model.merge_adapter()


def _two_adapters(model, layer):
    from peft import LoraConfig

    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    model.base_model.set_adapter(["default", "second"])


def _trained_bias(model, layer):
    layer.base_layer.bias.requires_grad_(True)


@pytest.mark.parametrize(
    ("base", "lora", "change"),
    [
        ("fp4", {}, _merged),
        ("fp4", {}, _two_adapters),
        ("fp4", {"use_dora": True}, None),  # a LoRA variant
        ("dense", {}, _trained_bias),  # lora.bias: all
    ],
)
def test_what_the_fused_step_does_not_cover_runs_through_peft(base, lora, change, fused_calls):
    model, layer = lora_layer(base, **lora)
    if change is not None:
        change(model, layer)
    fused_lora.fuse_lora_layers(model, check=False)
    x = torch.randn(2, 128)
    out = layer(x)
    assert not fused_calls
    torch.testing.assert_close(out, fused_lora.stock_forward(layer, x), rtol=0, atol=0)


def test_disabled_adapters_mixed_dtypes_and_extra_arguments_run_through_peft(fused_calls):
    model, layer = lora_layer("nf4")
    fused_lora.fuse_lora_layers(model, check=False)
    x = torch.randn(2, 128)
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    layer(x, adapter_names=["default", "default"])
    layer(x.to(torch.bfloat16))  # a bf16 input into fp32 adapters, no autocast: PEFT casts back and forth
    assert not fused_calls
    layer(x)
    assert len(fused_calls) == 1


@pytest.mark.parametrize(
    ("base", "dropout", "input_dtype"),
    [("nf4", 0.0, torch.float32), ("fp4", 0.2, torch.float32), ("dense", 0.0, torch.float32),
     ("dense", 0.1, torch.bfloat16)],
)  # fmt: skip
def test_fused_layer_under_autocast_equals_peft(base, dropout, input_dtype, fused_calls):
    """bf16 autocast (what the Trainer turns on for bf16 on CPUs that have it, and on GPUs): the matmuls and
    the output in bf16, as autocast's linear layers give it (bitsandbytes' 4-bit layer would cast it back to
    fp32), every gradient in the dtype PEFT's layer gives it."""
    model, layer = lora_layer(base, dropout)
    model.train()
    x = torch.randn(3, 4, 128).to(input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = forward_backward(layer, x)
        fused_lora.fuse_lora_layers(model, check=False)
        fused = forward_backward(layer, x)
    assert len(fused_calls) == 1
    assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == reference[1].dtype == input_dtype
    assert [g.dtype for g in fused[2]] == [g.dtype for g in reference[2]] == [torch.float32] * 2
    for got, want in zip([*fused[:2], *fused[2]], [*reference[:2], *reference[2]], strict=True):
        error = (got.float() - want.float()).norm() / want.float().norm()
        assert error < 1e-2  # bf16 rounding in a different order; a wrong scale or mask is off by far more


def _bf16_casts(seen: list):
    """A dispatch mode that appends the shape of every tensor cast to bf16 to ``seen``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                seen.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    return Casts()


@pytest.mark.parametrize(("dropout", "casts"), [(0.0, 1), (0.2, 2)])
def test_fp32_input_is_cast_to_autocast_dtype_once_without_dropout(dropout, casts):
    """Without dropout the matmul's input and the adapter's saved input are one bf16 cast of x (a second
    cast of the same tensor was a wasted pass per layer); with dropout the dropped-out input is its own."""
    model, layer = lora_layer("nf4", dropout)
    model.train()
    fused_lora.fuse_lora_layers(model, check=False)
    x = torch.randn(3, 4, 128, requires_grad=True)
    seen: list[tuple[int, ...]] = []

    with torch.autocast("cpu", dtype=torch.bfloat16), _bf16_casts(seen):
        layer(x)
    assert layer.fused_calls == 1
    assert sum(s in ((12, 128), (3, 4, 128)) for s in seen) == casts


def test_layers_reading_the_same_input_cast_it_once():
    """q, k and v (gate and up) read one tensor: it is cast to the autocast dtype once, for all of them; a
    tensor changed in place since is cast again; results and gradients are those of separate casts."""
    model, layer = lora_layer("nf4", 0.0)
    model.train()
    fused_lora.fuse_lora_layers(model, check=False)
    seen: list[tuple[int, ...]] = []

    base = torch.randn(3, 4, 128)
    x = base.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _bf16_casts(seen):
            first, second = layer(x), layer(x)
        shared = torch.autograd.grad((first.float().sum() + 2 * second.float().sum()), x)[0]
        assert [s for s in seen if s[0] == 3] == [(3, 4, 128)]
        x2 = base.clone().requires_grad_(True)
        separate = torch.autograd.grad(layer(x2).float().sum() + 2 * layer(x2.clone()).float().sum(), x2)[0]
        assert torch.equal(first, layer(base.clone()))
        assert torch.allclose(shared, separate, rtol=1e-6, atol=1e-6)
        seen.clear()
        with torch.no_grad():
            y = base.clone()
            layer(y)
            y.mul_(2)
            with _bf16_casts(seen):
                again = layer(y)
        assert [s for s in seen if s[0] == 3] == [(3, 4, 128)]
        assert torch.equal(again, layer(base * 2))


@pytest.mark.parametrize(
    ("quantization", "checkpointing"),
    [({"load_in_4bit": True}, True), ({"load_in_4bit": True, "dequantize_chunk_mib": 0}, False),
     ({"load_in_4bit": False}, True)],
)  # fmt: skip
def test_model_through_wronai_builders_has_the_same_loss_and_gradients(
    tiny_model_dir, tmp_path, alpaca_file, quantization, checkpointing, fused_calls
):
    """The tiny Llama prepared by load_base_model + apply_lora, fused and not, with dropout on."""
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", quantization=quantization)
    cfg = load_config(data=raw)
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    tok, _ = load_tokenizer(cfg.model, cfg.polish)
    batch = polish_batch(tok)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        base = loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan)
        model = apply_lora(
            base, cfg.lora.model_copy(update={"lora_dropout": 0.1}), [], gradient_checkpointing=checkpointing,
            keep_embeddings=plan.keep_embeddings, dequantize_chunk_bytes=plan.dequantize_chunk_bytes and 16 * 64 * 4,
            fused_lora=fused,
        )  # fmt: skip
        layers = [m for m in model.modules() if isinstance(m, FUSED)]
        assert len(layers) == (14 if fused else 0)  # 2 decoder layers × 7 linear layers
        model.train()
        fused_calls.clear()
        torch.manual_seed(5)
        results.append(loss_and_gradients(model, batch))
        assert len(fused_calls) == len(layers) * (2 if checkpointing else 1)  # + recomputation
    assert_same_loss_and_gradients(results[1], results[0])


def test_model_under_bf16_autocast_has_the_same_loss_and_gradients(
    tiny_model_dir, tmp_path, alpaca_file, fused_calls
):
    """The tiny 4-bit Llama under bf16 autocast (training.bf16 where the CPU has it): every LoRA layer fused,
    loss and gradients as PEFT's up to bf16 rounding."""
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", quantization={"load_in_4bit": True})
    cfg = load_config(data=raw)
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    batch = polish_batch(load_tokenizer(cfg.model, cfg.polish)[0])
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        base = loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan)
        model = apply_lora(base, cfg.lora, [], gradient_checkpointing=0, fused_lora=fused).train()
        fused_calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_gradients(model, batch))
        assert len(fused_calls) == (14 if fused else 0)
    (loss, grads), (ref_loss, ref_grads) = results[1], results[0]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    assert grads.keys() == ref_grads.keys() and ref_grads
    for name, want in ref_grads.items():
        assert grads[name].dtype == want.dtype
        assert (grads[name] - want).norm() <= 2e-2 * want.norm() + 1e-6, name


@pytest.mark.parametrize(
    ("hardware_section", "fused", "note"),
    [
        ({"device": "cpu"}, True, None),  # auto
        ({"device": "cpu", "fused_lora": "off"}, False, None),
        ({"device": "cpu", "fused_lora": "on"}, True, None),
        ({"device": "cpu", "fused_lora": "on", "distributed": "deepspeed_zero3"}, False, "whole parameters"),
        ({"device": "cpu", "distributed": "deepspeed_zero3"}, False, None),
    ],
)
def test_plan_fuses_lora_layers_on_cpu(hardware_section, fused, note):
    cfg = load_config(
        data={"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}, "hardware": hardware_section}
    )
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    assert plan.fused_lora is fused
    assert ("fused base + adapter" in " ".join(plan.describe())) is fused
    assert any(note in n for n in plan.notes) if note else not any("fused_lora" in n for n in plan.notes)


def test_bad_fused_lora_value_names_the_key():
    from wronai.errors import ConfigError

    with pytest.raises(ConfigError, match="hardware.fused_lora"):
        load_config(data={"model": {"name": "o/m"}, "data": {"dataset_name": "o/d"},
                          "hardware": {"fused_lora": "yes please"}})  # fmt: skip


def test_pipeline_fuses_the_lora_layers_of_the_model_it_loads(tiny_model_dir, alpaca_file, tmp_path):
    from wronai.recipe import Pipeline

    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", hardware={"device": "cpu"})
    model = Pipeline(load_config(data=raw)).load_model()
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert len(lora_layers) == 14 and all(isinstance(m, FUSED) for m in lora_layers)
    assert "FusedLora4bit" in str(model)  # what runs shows in print(model)


def test_an_untested_peft_version_keeps_peft_modules(monkeypatch, caplog):
    model, _ = lora_layer("nf4")
    monkeypatch.setattr(fused_lora.peft, "__version__", "1.2.0")
    assert fused_lora.fuse_lora_layers(model) == 0
    assert not any(isinstance(m, FUSED) for m in model.modules())
    assert "outside the versions" in caplog.text


def test_start_up_check_puts_peft_modules_back_on_a_mismatch(monkeypatch, caplog):
    """The first layer's fused output is compared with PEFT's: a wrong fused step is never installed."""
    model, layer = lora_layer("nf4")
    real = fused_lora._fused_call
    monkeypatch.setattr(
        fused_lora, "_fused_call", lambda layer, x: None if (out := real(layer, x)) is None else out * 1.01
    )
    assert fused_lora.fuse_lora_layers(model) == 0
    assert not isinstance(layer, FUSED)
    assert "output differs from PEFT's" in caplog.text
    monkeypatch.setattr(fused_lora, "_fused_call", real)
    assert fused_lora.fuse_lora_layers(model) == 1 and isinstance(layer, FUSED)
