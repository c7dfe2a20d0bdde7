"""The compiled SwiGLU kernel: PyTorch's silu · up, forward and backward, swapped into Llama-style MLPs."""

from __future__ import annotations

import platform

import pytest
import torch

from wronai.kernels import swiglu
from wronai.kernels.native import NativeBuildError, NativeKernel, find_compiler, load

needs_compiler = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def kernel():
    if find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    return swiglu.swiglu_kernel()


def _reference(gate, up, grad):
    g, u = gate.float().requires_grad_(), up.float().requires_grad_()
    out = torch.nn.functional.silu(g) * u
    return (out, *torch.autograd.grad(out, (g, u), grad.float()))


def _ours(kernel, gate, up, grad):
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = swiglu.swiglu(kernel, g, u)
    return (out, *torch.autograd.grad(out, (g, u), grad))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 517, 129), (1, 300, 1024)])
def test_output_and_gradients_are_pytorchs(kernel, dtype, shape):
    """Every element, in sizes that are and are not multiples of the kernel's chunks and below and above
    its threshold for threads; values out to where a naive sigmoid's exp overflows."""
    gen = torch.Generator().manual_seed(1)
    gate = (torch.randn(shape, generator=gen) * 6).to(dtype)
    gate.view(-1)[:3] = torch.tensor([-95.0, 95.0, 0.0])[: gate.numel()]
    up, grad = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    got, want = _ours(kernel, gate, up, grad), _reference(gate, up, grad)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype and a.shape == gate.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
        else:  # rounded once from float32: within half a bf16 step of the exact value
            torch.testing.assert_close(a.float(), b, rtol=4e-3, atol=1e-5)


@needs_compiler
def test_results_do_not_depend_on_the_thread_count(kernel):
    gen = torch.Generator().manual_seed(2)
    gate, up, grad = (torch.randn(3, 333, 1000, generator=gen).to(torch.bfloat16) for _ in range(3))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(_ours(kernel, gate, up, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@needs_compiler
def test_the_self_check_refuses_a_wrong_kernel(kernel):
    """A kernel 0.1% off (a product scaled) fails the check that guards first use."""

    import ctypes

    class Off:
        """The real kernel, its float32 forward results 0.1% larger."""

        def wronai_swiglu_forward(self, gate, up, out, n, bf16, threads):
            code = kernel.library.wronai_swiglu_forward(gate, up, out, n, bf16, threads)
            if not bf16:
                values = (ctypes.c_float * n).from_address(out)
                for i in range(n):
                    values[i] *= 1.001
            return code

        def wronai_swiglu_backward(self, *args):
            return kernel.library.wronai_swiglu_backward(*args)

    assert all(error <= swiglu.CHECK_TOLERANCE[d] for d, error in swiglu.self_check(kernel).items())
    errors = swiglu.self_check(NativeKernel(Off(), kernel.built))  # type: ignore[arg-type]
    assert errors[torch.float32] > swiglu.CHECK_TOLERANCE[torch.float32]


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 instruction-set flag")
def test_the_portable_build_agrees(monkeypatch):
    """The plain-C path as an AVX2-only CPU builds it (no AVX-512, no bf16 instructions), on threads of its
    own (no OpenMP): the same numbers as PyTorch's."""
    monkeypatch.setenv("WRONAI_NATIVE_FLAGS", "-march=x86-64-v3")
    library, built = load("swiglu", openmp=False)
    assert "-march=x86-64-v3" in built.flags and "-fopenmp" not in built.flags
    library.wronai_swiglu_forward.argtypes = [
        swiglu._P,
        swiglu._P,
        swiglu._P,
        swiglu._I64,
        swiglu._INT,
        swiglu._INT,
    ]
    library.wronai_swiglu_backward.argtypes = [swiglu._P] * 5 + [swiglu._I64, swiglu._INT, swiglu._INT]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        errors = swiglu.self_check(NativeKernel(library, built))
    finally:
        torch.set_num_threads(threads)
    assert all(errors[d] <= swiglu.CHECK_TOLERANCE[d] for d in errors)


def _tiny_lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False
    )
    return get_peft_model(model, config)


@needs_compiler
@pytest.mark.parametrize("autocast", [False, True])
def test_swapped_mlps_give_the_stock_loss_and_gradients(tiny_model_dir, autocast):
    """The tiny Llama with LoRA on the MLP: every MLP swapped (still a LlamaMLP, shown in print(model)),
    the loss and every adapter gradient as before, in float32 and under bf16 autocast; unswapped again,
    the stock class is back."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = _tiny_lora_model(tiny_model_dir)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        if fused:
            assert swiglu.fuse_swiglu(model, "on") == model.config.num_hidden_layers
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results.append((loss.detach(), grads))
    mlps = [m for m in model.modules() if isinstance(m, LlamaMLP)]
    assert all(type(m).__name__ == "FusedLlamaMLP" for m in mlps) and "FusedLlamaMLP" in str(model)
    assert swiglu.fused_swiglu_calls(model) == len(mlps)
    tol = 3e-2 if autocast else 1e-5
    torch.testing.assert_close(results[1][0], results[0][0], rtol=tol, atol=tol)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        assert ((a - b).norm() / b.norm()).item() < tol
    assert swiglu.unfuse_swiglu(model) == len(mlps)
    assert all(type(m) is LlamaMLP for m in mlps)


def test_only_llama_mlps_with_a_silu_are_recognised(tiny_model_dir):
    from transformers import LlamaForCausalLM
    from transformers.activations import GELUActivation

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    mlp = model.model.layers[0].mlp
    assert swiglu.is_llama_mlp(mlp)
    mlp.act_fn = GELUActivation()
    assert not swiglu.is_llama_mlp(mlp)

    class Other(type(mlp)):  # same parts, another computation
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    other = model.model.layers[1].mlp
    other.__class__ = Other
    assert not swiglu.is_llama_mlp(other)


@needs_compiler
def test_calls_the_kernel_does_not_cover_take_the_stock_forward(tiny_model_dir, kernel):
    """float64 activations run PyTorch's silu and mul, with the same result; float32 ones the kernel."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).double()
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.float64)
    want = mlp(x)
    assert swiglu.fuse_swiglu(model, "auto") > 0
    assert torch.equal(mlp(x), want) and mlp.fused_calls == 0
    model.float()
    mlp(x.float())
    assert mlp.fused_calls == 1


def test_unbuildable_kernel_falls_back_on_auto_and_stops_on_on(tiny_model_dir, monkeypatch, caplog):
    from transformers import LlamaForCausalLM

    from wronai.errors import WronAIError

    def unbuildable():
        raise NativeBuildError("no C compiler found ($CC, cc, gcc or clang on the PATH)")

    monkeypatch.setattr(swiglu, "swiglu_kernel", unbuildable)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with caplog.at_level("WARNING"):
        assert swiglu.fuse_swiglu(model, "auto") == 0
    assert "SwiGLU: no C compiler found" in caplog.text and "hardware.native_swiglu" in caplog.text
    assert not any(isinstance(m, swiglu.FusedSwiGLU) for m in model.modules())
    with pytest.raises(WronAIError, match=r"hardware.native_swiglu: on.*no C compiler.*install a C compiler"):
        swiglu.fuse_swiglu(model, "on")


@needs_compiler
def test_a_cli_run_trains_with_the_kernel_to_the_same_losses(tmp_path, tiny_model_dir, capfd):
    """`wronai train` on a CPU: auto swaps the kernel in (the plan and the log say so), and the losses are
    PyTorch's to float rounding."""
    import json

    from conftest import train_via_cli
    from wronai.cli import main

    losses = {}
    for setting in ("off", "auto"):
        out = train_via_cli(
            tmp_path / setting, tiny_model_dir, rows=40, data={"eval_fraction": 0.0},
            hardware={"native_swiglu": setting},
            training={"max_steps": 4, "save_strategy": "no", "logging_steps": 1, "per_device_train_batch_size": 2},
        )  # fmt: skip
        assert ("MLPs compute silu(gate) · up by the compiled kernel" in capfd.readouterr().err) is (
            setting == "auto"
        )
        assert main(["validate", str(tmp_path / setting / "run.yaml")]) == 0
        shown = capfd.readouterr()
        assert ("SwiGLU activation: WronAI's compiled kernel" in shown.out + shown.err) is (setting == "auto")
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses[setting] = [h["loss"] for h in history if "loss" in h]
    assert len(losses["auto"]) == 4
    assert losses["auto"] == pytest.approx(losses["off"], rel=1e-4)
