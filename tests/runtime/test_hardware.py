"""Device plan: what each device gets, and what is replaced (with a note) where it cannot work."""

from __future__ import annotations

import pytest
import torch

from wronai.config import load_config
from wronai.runtime import hardware


def plan_for(monkeypatch, device: str, bf16_ok: bool, quantization: dict | None = None, **training):
    # load (and import transformers/bitsandbytes) before pretending to have a GPU
    raw = {"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}, "training": training}
    cfg = load_config(data={**raw, "quantization": quantization or {}})
    monkeypatch.setattr(hardware, "detect_device", lambda requested="auto": device)
    monkeypatch.setattr(hardware, "_bf16_ok", lambda d: bf16_ok)
    monkeypatch.setattr(hardware, "_device_name", lambda d: "test")
    if device == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if device == "mps":
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    return hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)


CASES = [
    # device, native bf16, training settings, expected (precision, optimizer, quantization, compute dtype), note fragment
    (
        "cuda",
        True,
        {"bf16": True, "optim": "paged_adamw_8bit"},
        ("bf16", "paged_adamw_8bit", "4bit-nf4", torch.bfloat16),
        None,
    ),
    (
        "cuda",
        False,
        {"fp16": True, "optim": "paged_adamw_32bit"},
        ("fp16", "paged_adamw_32bit", "4bit-nf4", torch.float16),  # T4/V100: fp16 compute, as QLoRA there
        None,
    ),
    (
        "cuda",
        False,
        {"bf16": True},
        ("fp16", "adamw_torch_fused", "4bit-nf4", torch.float16),
        "training.bf16 needs a GPU with native bf16",
    ),
    (
        "cpu",
        True,
        {},  # native bf16 but fp32 mixed precision: 4-bit layers compute in float32 (fused LoRA, row slices)
        ("fp32", "adamw_torch_fused", "4bit-nf4", torch.float32),
        None,  # the default compute dtype (not written): the plan's quantization line shows the one taken
    ),
    (
        "cpu",
        False,
        {"bf16": True, "optim": "paged_adamw_8bit"},
        ("fp32", "adamw_8bit", "4bit-nf4", torch.float32),
        "paging is for GPU memory",
    ),
    (
        "cpu",
        False,
        {"optim": "paged_adamw_32bit"},
        ("fp32", "adamw_torch", "4bit-nf4", torch.float32),
        "paging is for GPU memory",
    ),
    ("cpu", False, {"optim": "adamw_8bit"}, ("fp32", "adamw_8bit", "4bit-nf4", torch.float32), None),
    ("cpu", False, {"optim": "paged_lion_8bit"}, ("fp32", "lion_8bit", "4bit-nf4", torch.float32), "paging"),
    ("cpu", True, {"bf16": True}, ("bf16", "adamw_torch_fused", "4bit-nf4", torch.bfloat16), None),
    (
        "cpu",
        True,
        {"fp16": True},
        ("bf16", "adamw_torch_fused", "4bit-nf4", torch.bfloat16),
        "training.fp16 needs a GPU",
    ),
    (
        "cpu",
        False,
        {"fp16": True},
        ("fp32", "adamw_torch_fused", "4bit-nf4", torch.float32),
        "training.fp16 needs a GPU",
    ),
    # optim: auto (the default) is AdamW's fused kernel where torch has one; a written optimizer is kept
    ("cpu", False, {}, ("fp32", "adamw_torch_fused", "4bit-nf4", torch.float32), "auto -> adamw_torch_fused"),
    ("cpu", False, {"optim": "adamw_torch"}, ("fp32", "adamw_torch", "4bit-nf4", torch.float32), None),
    (
        "cpu",
        False,
        {"optim": "adamw_torch_fused"},
        ("fp32", "adamw_torch_fused", "4bit-nf4", torch.float32),
        None,
    ),
    ("mps", False, {}, ("fp32", "adamw_torch", "none", torch.float32), "no fused AdamW kernel on mps"),
    (
        "mps",
        False,
        {"optim": "adamw_torch_fused"},
        ("fp32", "adamw_torch", "none", torch.float32),
        "has no kernel on mps",
    ),
    (
        "mps",
        False,
        {"bf16": True, "optim": "adamw_bnb_8bit"},
        ("fp32", "adamw_torch", "none", torch.float32),
        "does not run on mps",
    ),
]


@pytest.mark.parametrize(("device", "bf16_ok", "training", "expected", "note"), CASES)
def test_plan(monkeypatch, device, bf16_ok, training, expected, note):
    plan = plan_for(monkeypatch, device, bf16_ok, **training)
    assert (plan.precision, plan.optimizer, plan.quantization, plan.compute_dtype) == expected
    if note:
        assert any(note in n for n in plan.notes), plan.notes
    if device == "cuda" and bf16_ok:
        assert plan.notes == []  # on CUDA the config is used as written


@pytest.mark.parametrize(
    ("bf16", "written", "note"),
    [
        (False, None, None),  # the default is not something the user wrote: no note
        (False, "bfloat16", "quantization.bnb_4bit_compute_dtype=bfloat16: on cpu 4-bit layers compute in the "
         "mixed-precision dtype — using float32 (training.bf16: true computes in bfloat16)"),
        (False, "float32", None),  # used as written
        (True, "float32", "quantization.bnb_4bit_compute_dtype=float32: on cpu 4-bit layers compute in the "
         "mixed-precision dtype — using bfloat16"),
        (True, "bfloat16", None),
    ],
)  # fmt: skip
def test_the_compute_dtype_note_is_for_a_written_value_not_followed(monkeypatch, bf16, written, note):
    quantization = {"bnb_4bit_compute_dtype": written} if written else {}
    plan = plan_for(monkeypatch, "cpu", True, quantization, bf16=bf16)
    notes = [n for n in plan.notes if n.startswith(hardware.COMPUTE_KEY)]
    assert notes == ([note] if note else [])


def test_8bit_on_cpu_falls_back_with_note(monkeypatch):
    monkeypatch.setattr(hardware, "detect_device", lambda requested="auto": "cpu")
    cfg = load_config(
        data={
            "model": {"name": "m/m"},
            "data": {"dataset_name": "d/d"},
            "quantization": {"load_in_4bit": False, "load_in_8bit": True},
        }
    )
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    assert plan.quantization == "none"
    assert any("8-bit" in n for n in plan.notes)


def test_flash_attention_needs_cuda(monkeypatch):
    monkeypatch.setattr(hardware, "detect_device", lambda requested="auto": "cpu")
    cfg = load_config(
        data={
            "model": {"name": "m/m", "attn_implementation": "flash_attention_2"},
            "data": {"dataset_name": "d/d"},
        }
    )
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    assert plan.attn_implementation == "sdpa"
    assert any("flash_attention_2" in n for n in plan.notes)


def test_describe_names_everything_validate_prints(monkeypatch):
    plan = plan_for(monkeypatch, "cpu", False)
    text = "\n".join(plan.describe())
    for word in ("device:", "mixed precision:", "quantization:", "optimizer:", "attention:"):
        assert word in text


def test_real_machine_plan_is_consistent():
    cfg = load_config(
        data={"model": {"name": "m/m"}, "data": {"dataset_name": "d/d"}, "training": {"bf16": True}}
    )
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    if plan.device == "cpu":
        assert plan.bf16 == hardware.cpu_supports_bf16()


@pytest.mark.parametrize(
    ("sections", "keep"),
    [
        ({}, True),
        ({"quantization": {"keep_embeddings_dtype": False}}, False),
        ({"model": {"name": "org/m", "torch_dtype": "float32"}}, False),  # an explicit dtype is obeyed
        ({"quantization": {"load_in_4bit": False}}, False),
        ({"hardware": {"distributed": "deepspeed_zero3"}}, False),  # sharded weights: PEFT's preparation
    ],
)
def test_plan_keeps_16bit_embeddings_for_4bit(sections, keep):
    data = {"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}}
    for group, values in sections.items():
        data.setdefault(group, {}).update(values)
    cfg = load_config(data=data)
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    assert plan.keep_embeddings is keep
    assert ("kept in the checkpoint's dtype" in " ".join(plan.describe())) is keep


def test_cuda_bf16_means_native_bf16(monkeypatch):
    """T4/V100 emulate bf16 (torch.cuda.is_bf16_supported() is True there): only native bf16 counts."""
    seen = []
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: seen.append(including_emulation) or including_emulation,
    )
    assert hardware._bf16_ok("cuda") is False and seen == [False]


def test_wronai_cpu_kernels_are_off_on_cuda(monkeypatch):
    plan = plan_for(monkeypatch, "cuda", True, bf16=True)
    assert (plan.keep_embeddings, plan.dequantize_chunk_bytes, plan.fused_lora) == (False, 0, False)
    cpu = plan_for(monkeypatch, "cpu", True, bf16=True)
    assert cpu.keep_embeddings and cpu.dequantize_chunk_bytes and cpu.fused_lora


def _flash_installed(monkeypatch, importable: BaseException | None, capability=(8, 0)):
    import importlib.util
    import sys
    import types

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if importable is None:
        monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    else:

        class Failing(types.ModuleType):
            def __getattr__(self, name):
                raise importable

        finder = types.SimpleNamespace(
            find_spec=lambda name, path=None, target=None: (
                (_ for _ in ()).throw(importable) if name == "flash_attn" else None
            )
        )
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])


@pytest.mark.parametrize(
    ("capability", "error", "expected", "note"),
    [
        ((8, 0), None, "flash_attention_2", None),
        ((7, 5), None, "sdpa", "compute capability 8.0"),  # T4: flash-attention 2 needs Ampere
        ((9, 0), ImportError("undefined symbol: _ZN3c10"), "sdpa", "does not import"),  # a broken build
        ((9, 0), RuntimeError("another package named flash_attn"), "sdpa", "does not import"),
    ],
)
def test_flash_attention_only_where_it_runs(monkeypatch, capability, error, expected, note):
    _flash_installed(monkeypatch, error, capability)
    plan = plan_for(monkeypatch, "cuda", True)
    assert plan.attn_implementation == expected
    notes = [n for n in plan.notes if "flash" in n]
    assert (len(notes) == 1 and note in notes[0]) if note else notes == []


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU whose /proc/cpuinfo lists AVX512-BF16, with no oneDNN cap in the environment (cached capability
    cleared before and after)."""
    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    hardware.cpu_capability.cache_clear()
    yield monkeypatch
    hardware.cpu_capability.cache_clear()


@pytest.mark.parametrize(
    ("variable", "value", "native"),
    [
        (None, None, True),
        ("ONEDNN_MAX_CPU_ISA", "AVX2", False),  # the AVX2-only emulation of docs/benchmarks.md
        ("ONEDNN_MAX_CPU_ISA", "avx512_core", False),  # names are case-insensitive
        ("DNNL_MAX_CPU_ISA", "AVX512_CORE_VNNI", False),  # the older name
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", True),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", True),
        ("ONEDNN_MAX_CPU_ISA", "ALL", True),
    ],
)
def test_onednn_capped_below_bf16_is_not_native_bf16(bf16_cpu, variable, value, native):
    if variable:
        bf16_cpu.setenv(variable, value)
    assert hardware.cpu_supports_bf16() is native
    assert hardware.onednn_isa_cap() == (None if native else value.upper())


def test_a_capped_onednn_plans_fp32_and_says_why(bf16_cpu):
    bf16_cpu.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cfg = load_config(
        data={"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}, "training": {"bf16": True}}
    )
    bf16_cpu.setattr(hardware, "detect_device", lambda requested="auto": "cpu")
    plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    assert plan.precision == "fp32"
    assert any("capped at AVX2 by ONEDNN_MAX_CPU_ISA" in note for note in plan.notes)
    text = "\n".join(plan.describe())
    assert "native bf16 no" in text and "oneDNN capped at AVX2" in text
    bf16_cpu.delenv("ONEDNN_MAX_CPU_ISA")
    hardware.cpu_capability.cache_clear()
    uncapped = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    assert uncapped.precision == "bf16" and "native bf16 yes" in "\n".join(uncapped.describe())


def test_a_cap_on_a_cpu_without_bf16_is_not_blamed(bf16_cpu):
    """On an AVX2-only CPU the cap changes nothing: the note does not tell the user to unset it."""
    bf16_cpu.setattr(hardware, "_cpuinfo_flags", lambda: {"avx2"})
    bf16_cpu.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.cpu_capability().onednn_cap is None
    notes: list[str] = []
    cfg = load_config(
        data={"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}, "training": {"bf16": True}}
    )
    assert hardware._precision(cfg.training, "cpu", hardware.cpu_supports_bf16(), notes) == "fp32"
    assert notes == ["training.bf16 is not supported natively on this cpu — using fp32"]
