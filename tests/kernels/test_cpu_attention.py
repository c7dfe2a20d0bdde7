"""The compiled per-example attention kernel: sdpa's numbers, built once, refused when wrong or unbuildable."""

from __future__ import annotations

import sys

import pytest
import torch

from wronai.kernels import cpu_attention, native
from wronai.kernels.cpu_attention import attention, attention_kernel, examples_tensor, reference, self_check
from wronai.kernels.native import NativeBuildError, NativeKernel, build, find_compiler

needs_compiler = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def kernel():
    if find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    return attention_kernel()


def _qkv(batch, length, heads, kv, dim, layout, seed=0):
    """q, k, v as (batch, heads, positions, dim) views: transformers' layout (a transposed view of the
    projection's output) or contiguous."""
    gen = torch.Generator().manual_seed(seed)

    def make(h):
        if layout == "projection":
            return torch.randn(batch, length, h, dim, generator=gen).transpose(1, 2).requires_grad_()
        return torch.randn(batch, h, length, dim, generator=gen).requires_grad_()

    return make(heads), make(kv), make(kv)


CASES = [
    # lengths per row, each example's first position id per row (None = no shared prefix)
    pytest.param([[40]], [None], id="one-example"),
    pytest.param([[1, 7, 1, 31]], [None], id="single-tokens-and-odd-lengths"),
    pytest.param([[150, 10]], [None], id="longer-than-a-query-block"),
    pytest.param([[13, 64, 51], [128]], [None, None], id="two-rows"),
    pytest.param([[20, 30, 9, 69]], [[0, 6, 0, 6]], id="shared-prefix"),
    pytest.param([[10, 1, 117], [64, 64]], [[0, 9, 9], None], id="prefix-and-plain-rows"),
]


@needs_compiler
@pytest.mark.parametrize(("lengths", "prefixes"), CASES)
@pytest.mark.parametrize(("heads", "kv", "dim"), [(4, 2, 16), (6, 3, 64), (2, 1, 128), (3, 3, 32)])
@pytest.mark.parametrize("layout", ["projection", "contiguous"])
@pytest.mark.parametrize("kept", [True, False], ids=["P-kept", "P-recomputed"])
def test_output_and_gradients_equal_sdpa_per_example(
    kernel, lengths, prefixes, heads, kv, dim, layout, kept, monkeypatch
):
    """Both backwards: P kept by the forward, and recomputed from the log-sum-exp (too big to keep)."""
    monkeypatch.setattr(cpu_attention, "KEEP_PROBS_FACTOR", 4 if kept else 0)
    length = sum(lengths[0])
    q, k, v = _qkv(len(lengths), length, heads, kv, dim, layout)
    grad = torch.randn(
        len(lengths), length, heads, dim
    )  # the output's layout: (batch, positions, heads, dim)
    out = attention(kernel, q, k, v, examples_tensor(lengths, prefixes))
    assert out.shape == (len(lengths), length, heads, dim) and out.is_contiguous()
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = reference(q, k, v, lengths, prefixes)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    for name, a, b in zip("qkv", got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"d{name}")


@needs_compiler
def test_scale_and_no_grad_forward(kernel):
    lengths, prefixes = [[33, 20, 11]], [None]
    q, k, v = _qkv(1, 64, 4, 2, 32, "projection")
    with torch.no_grad():
        out = attention(kernel, q, k, v, examples_tensor(lengths, prefixes), scale=0.3)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference(q, k, v, lengths, prefixes, scale=0.3), rtol=1e-5, atol=2e-6)


def test_probabilities_are_kept_only_within_the_limit():
    examples = examples_tensor([[20, 30], [50]], [[0, 6], None])  # visible keys 20, 36, 50 -> 32, 48, 64
    offsets = cpu_attention.kept_probs_layout(examples, 2, 10**6)
    assert offsets.tolist() == [0, 640, 1280, 2720, 4160, 7360, 10560]
    assert cpu_attention.kept_probs_layout(examples, 2, 10559) is None


@needs_compiler
@pytest.mark.parametrize(
    ("lengths", "prefixes", "batch"),
    [
        pytest.param([[30, 30]], [None], 1, id="short-of-the-row"),
        pytest.param([[40, 30]], [None], 1, id="past-the-row"),
        pytest.param([[64], [64]], [None, None], 1, id="more-rows-than-the-batch"),
        pytest.param([[64]], [None], 2, id="a-row-left-out"),
    ],
)
def test_a_table_that_does_not_fit_the_batch_is_refused(kernel, lengths, prefixes, batch):
    q, k, v = _qkv(batch, 64, 2, 1, 16, "projection")
    with pytest.raises(ValueError, match="attention: "):
        attention(kernel, q, k, v, examples_tensor(lengths, prefixes))


def test_example_table():
    table = examples_tensor([[3, 2, 4], [5]], [[0, 2, 0], None]).view(-1, cpu_attention.FIELDS).tolist()
    # the second example continues the row's first 2 tokens: the first example shares them
    assert table == [[0, 0, 3, 0, 2], [0, 3, 2, 2, 0], [0, 5, 4, 0, 0], [1, 0, 5, 0, 0]]


@needs_compiler
def test_self_check_catches_a_wrong_kernel(kernel, monkeypatch):
    assert self_check(kernel) < cpu_attention.CHECK_TOLERANCE
    real = cpu_attention._forward

    def off_by_a_little(*args, **kwargs):
        out, *rest = real(*args, **kwargs)
        return out * 1.001, *rest

    monkeypatch.setattr(cpu_attention, "_forward", off_by_a_little)
    assert self_check(kernel) > cpu_attention.CHECK_TOLERANCE
    attention_kernel.cache_clear()
    try:
        with pytest.raises(NativeBuildError, match="differs from sdpa"):
            attention_kernel()
    finally:
        attention_kernel.cache_clear()


@needs_compiler
def test_built_once_then_loaded_from_the_cache(cache_dir, monkeypatch):
    first = build("attention")
    assert first.compiled and first.path.is_file() and cache_dir in first.path.parents
    again = build("attention")
    assert not again.compiled and again.path == first.path
    # other target flags are another library (a cache shared by two kinds of CPU keeps both)
    monkeypatch.setenv("WRONAI_NATIVE_FLAGS", "-O2")
    other = build("attention")
    assert other.path != first.path and "-O2" in other.flags and "-march=native" not in other.flags


def test_no_compiler_is_a_one_line_reason(monkeypatch):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    assert find_compiler() is None
    with pytest.raises(NativeBuildError, match=r"no C compiler found \(\$CC, cc, gcc or clang"):
        build("attention")


def test_a_compiler_that_fails_is_a_one_line_reason(tmp_path, monkeypatch):
    broken = tmp_path / "brokencc"
    broken.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\n"
                      "echo 'attention.c:1: error: this compiler is broken' >&2; exit 1\n")  # fmt: skip
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.raises(NativeBuildError, match="this compiler is broken") as err:
        build("attention")
    assert "\n" not in str(err.value)


@needs_compiler
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_the_kernel_runs_on_pytorchs_own_openmp_threads(kernel):
    """Built with -fopenmp next to a PyTorch that runs libgomp, the kernel links to that loaded library:
    one OpenMP runtime in the process (a second one's threads would compete with PyTorch's)."""
    if not cpu_attention.torch_runs_libgomp():
        pytest.skip("this PyTorch does not run GNU OpenMP")
    assert "-fopenmp" in kernel.built.flags
    with open("/proc/self/maps", encoding="utf-8") as maps:
        runtimes = {line.split()[-1] for line in maps if line.rstrip().endswith("libgomp.so.1")}
    assert len(runtimes) == 1, runtimes


@pytest.mark.parametrize(
    ("written", "device", "compiler", "expected"),
    [
        ("auto", "cpu", True, "auto"),
        ("auto", "cpu", False, "off"),  # no compiler: sdpa per example, with a note
        ("on", "cpu", False, "on"),  # asked for: the model set-up says why it cannot be built
        ("auto", "cuda", True, "off"),
        ("on", "cuda", True, "off"),
        ("off", "cpu", True, "off"),
    ],
)
@pytest.mark.parametrize(
    ("key", "line", "what"),
    [("native_attention", "attention kernel", "attention"), ("native_swiglu", "SwiGLU activation", "SwiGLU")],
)
def test_plan_resolves_the_setting(monkeypatch, written, device, compiler, expected, key, line, what):
    """Both compiled kernels' settings (attention, SwiGLU) resolve alike: the plan, its line, its notes."""
    import bitsandbytes  # noqa: F401  (imported before the plan pretends a GPU: it loads its CUDA ops then)

    from conftest import plan_with_gpu

    monkeypatch.setattr(native, "find_compiler", lambda: "/usr/bin/cc" if compiler else None)
    plan = plan_with_gpu(monkeypatch, hardware={"device": device, key: written})
    assert getattr(plan, key) == expected
    shown = next(x for x in plan.describe() if x.startswith(line))
    assert ("compiled kernel" in shown) is (expected != "off")
    notes = " ".join(plan.notes)
    assert (f"{what}: no C compiler found" in notes) is (
        written == "auto" and device == "cpu" and not compiler
    )
    assert (f"{key} is a CPU kernel — off on cuda" in notes) is (written == "on" and device == "cuda")


def test_unbuildable_kernel_falls_back_on_auto_and_stops_on_on(tiny_model_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    from wronai.errors import WronAIError
    from wronai.model.attention import NATIVE_ATTENTION, PACKED_SDPA, enable_packed_attention

    def unbuildable():
        raise NativeBuildError("no C compiler found ($CC, cc, gcc or clang on the PATH)")

    monkeypatch.setattr(cpu_attention, "attention_kernel", unbuildable)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert enable_packed_attention(model, "auto")
    assert model.config._attn_implementation == PACKED_SDPA
    with pytest.raises(
        WronAIError, match=r"hardware.native_attention: on.*no C compiler.*install a C compiler"
    ):
        enable_packed_attention(model, "on")
    if find_compiler() is not None:  # the kernel's own loader again: the model switches to it
        monkeypatch.undo()
        assert enable_packed_attention(model, "auto")
        assert model.config._attn_implementation == NATIVE_ATTENTION


@needs_compiler
def test_kernel_is_not_used_where_it_does_not_apply(kernel, monkeypatch):
    """Dropout, head dims that are not a multiple of 16, sliding windows: sdpa per example, as before."""
    from wronai.model.attention import LENGTHS_KWARG, native_packed_attention

    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    module = torch.nn.Module().train()
    lengths = {LENGTHS_KWARG: [[5, 7]]}
    q16, q8 = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 8)
    native_packed_attention(module, q16, q16, q16, None, **lengths)
    assert len(calls) == 1
    native_packed_attention(module, q16, q16, q16, None, dropout=0.1, **lengths)
    native_packed_attention(module, q8, q8, q8, None, **lengths)
    native_packed_attention(module, q16, q16, q16, None, sliding_window=4, **lengths)
    native_packed_attention(module, q16.double(), q16.double(), q16.double(), None, **lengths)
    assert len(calls) == 1
    module.eval()  # dropout is off in eval
    native_packed_attention(module, q16, q16, q16, None, dropout=0.1, **lengths)
    assert len(calls) == 2


@needs_compiler
def test_a_packed_cli_run_trains_with_the_kernel_to_the_same_losses(tmp_path, tiny_model_dir, capfd):
    """`wronai train` on a CPU with packing: auto runs the compiled kernel (the plan says so), and the
    losses are sdpa's to float rounding."""
    import json

    from conftest import train_via_cli
    from wronai.cli import main

    losses = {}
    for setting in ("off", "auto"):
        out = train_via_cli(
            tmp_path / setting, tiny_model_dir, rows=40, data={"packing": True, "eval_fraction": 0.0},
            hardware={"native_attention": setting},
            training={"max_steps": 4, "save_strategy": "no", "logging_steps": 1, "per_device_train_batch_size": 2},
        )  # fmt: skip
        assert ("attention: wronai_native_attention" in capfd.readouterr().err) is (setting == "auto")
        assert main(["validate", str(tmp_path / setting / "run.yaml")]) == 0
        shown = capfd.readouterr()
        assert ("attention kernel (packed rows): WronAI's compiled kernel" in shown.out + shown.err) is (
            setting == "auto"
        )
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses[setting] = [h["loss"] for h in history if "loss" in h]
    assert len(losses["auto"]) == 4
    assert losses["auto"] == pytest.approx(losses["off"], rel=1e-4)


@needs_compiler
def test_shared_prefix_gradients_are_summed_without_a_race(kernel):
    """Many examples add to the row's shared prompt start (and the first example's own copy of it) from
    different threads at once: repeated, the key/value gradients stay the reference's — and bit for bit
    the same every time (summed in a fixed order, so a resumed run computes what the first one did)."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no race to catch")
    lengths = [[60] + [24] * 20]
    prefixes = [[0] + [16] * 20]
    q, k, v = _qkv(1, sum(lengths[0]), 4, 1, 64, "projection", seed=3)
    examples = examples_tensor(lengths, prefixes)
    grad = torch.randn(1, sum(lengths[0]), 4, 64)
    want = torch.autograd.grad(reference(q, k, v, lengths, prefixes), (k, v), grad)
    first = None
    for _ in range(40):
        got = torch.autograd.grad(attention(kernel, q, k, v, examples), (k, v), grad)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        first = first or got
        assert all(torch.equal(a, b) for a, b in zip(got, first, strict=True))


def test_unpacked_batches_never_build_the_kernel(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """Without packing there are no example boundaries: a bf16 CPU run switches to per-example attention
    (for its fp32 math) but neither builds nor names the compiled kernel."""
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM, TrainingArguments

    from wronai.model.attention import PACKED_SDPA
    from wronai.train import trainer as trainer_module

    def no_build():
        raise AssertionError("the kernel was built for unpacked batches")

    monkeypatch.setattr(cpu_attention, "attention_kernel", no_build)
    monkeypatch.setattr(trainer_module, "length_multiple", lambda args: 64)  # as on a bf16 CPU run
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], remove_unused_columns=False)
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}] * 4
    prepared = SimpleNamespace(packed=False, train=rows, eval=None)
    trainer_module.build_trainer(model, tiny_tokenizer, args, prepared, [], native_attention="auto")
    assert model.config._attn_implementation == PACKED_SDPA


@needs_compiler
def test_cc_with_a_wrapper_is_split_as_a_shell_would(tmp_path, monkeypatch):
    """``CC="ccache gcc"``: the wrapper runs the compiler with every flag (not the flags as a command)."""
    wrapper = tmp_path / "wrap"
    wrapper.write_text('#!/bin/sh\nexec "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", f"{wrapper} {find_compiler()}")
    built = build("attention")
    assert built.path.is_file() and built.compiler.startswith(str(wrapper) + " ")


@needs_compiler
def test_the_build_without_openmp_starts_its_own_threads_and_agrees(monkeypatch):
    """Where PyTorch does not run libgomp (macOS, Intel or LLVM OpenMP) the kernel is built without
    -fopenmp and runs its tasks on threads it starts itself: the same numbers."""
    from wronai.kernels.native import load

    library, built = load("attention", openmp=False)
    assert "-fopenmp" not in built.flags
    library.wronai_attention_forward.argtypes = cpu_attention._FORWARD_ARGS
    library.wronai_attention_backward.argtypes = cpu_attention._BACKWARD_ARGS
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # at least one thread started by the kernel
    try:
        assert self_check(NativeKernel(library, built)) < cpu_attention.CHECK_TOLERANCE
    finally:
        torch.set_num_threads(threads)
