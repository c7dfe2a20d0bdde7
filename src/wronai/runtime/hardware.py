"""The device plan: what the configured run will actually use on this machine.

CUDA, Apple MPS and CPU are detected; settings that cannot work on the chosen device (fp16 on CPU, paged
8-bit optimizers without CUDA, bf16 without hardware support, 4-bit on MPS) are replaced by what can,
with one note per replacement. On CUDA the config is used as written. ``wronai validate`` prints the plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wronai.config.sections.model import ModelConfig, QuantizationSection
from wronai.config.sections.run import HardwareSection
from wronai.config.sections.training import TrainingSection

if TYPE_CHECKING:
    from wronai.config import WronAIConfig

logger = logging.getLogger(__name__)

_CUDA_ONLY_OPTIMIZERS = ("paged_", "_8bit", "_4bit", "bnb")
COMPUTE_KEY = "quantization.bnb_4bit_compute_dtype"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class DevicePlan:
    device: str  # cpu | cuda | mps
    device_name: str
    precision: str  # bf16 | fp16 | fp32  (mixed-precision mode of the Trainer)
    model_dtype: torch.dtype  # dtype of non-quantized weights
    quantization: str  # 4bit-nf4 | 4bit-fp4 | 8bit | none
    compute_dtype: torch.dtype  # dtype 4-bit weights are dequantized to
    optimizer: str
    attn_implementation: str
    pin_memory: bool
    notes: list[str] = field(default_factory=list)
    keep_embeddings: bool = False  # 4-bit: frozen embeddings/head stay in the checkpoint's 16-bit dtype
    # 4-bit on CPU: frozen weights dequantized in row slices of this many bytes (0 = whole weights)
    dequantize_chunk_bytes: int = 0
    # 4-bit on CPU: weights kept dequantized when all of them take at most this many bytes (0 = never)
    keep_dequantized_bytes: int = 0
    fused_lora: bool = False  # LoRA layers computed by wronai.kernels.fused_lora (hardware.fused_lora)
    fused_rms_norm: bool = False  # norms computed by wronai.kernels.rms_norm (hardware.fused_rms_norm)
    fused_rotary: bool = False  # RoPE computed by wronai.kernels.rotary (hardware.fused_rotary)
    # per-example attention by the compiled kernel (hardware.native_attention resolved: auto | on | off)
    native_attention: str = "off"
    # SwiGLU's silu(gate) * up by the compiled kernel (hardware.native_swiglu resolved: auto | on | off)
    native_swiglu: str = "off"
    # packed batches compute their examples' common prompt start once (hardware.shared_prefix)
    shared_prefix: bool = False
    # head and loss computed by wronai.kernels.cross_entropy (hardware.fused_cross_entropy)
    fused_cross_entropy: bool = False
    # hardware.last_layer_trained_only resolved for this device and setup ("off" where it cannot apply);
    # "auto" leaves CPU half-precision runs out (``last_layer_trained_only``), decided after autotune
    last_layer_rows: str = "off"
    cpu: CpuCapability | None = None  # what each source says of the CPU (CPU runs)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"

    @property
    def last_layer_trained_only(self) -> bool:
        """The last decoder layer's position-wise parts at trained positions only (wronai.train.last_layer).
        Not by default under bf16/fp16 autocast on a CPU: there each new number of rows is a new oneDNN
        matmul kernel kept in memory — on the speed benchmark +175 MB of peak RSS (1.21 against 1.03 GB)
        and no faster (80 steps: 32.6 against 30.7 s; fp32: 3.5–4% faster)."""
        cpu_half = self.device == "cpu" and self.precision in ("bf16", "fp16")
        return self.last_layer_rows == "on" or (self.last_layer_rows == "auto" and not cpu_half)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the Trainer's mixed precision autocasts to (None = fp32, no autocast)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def _dequantized(self) -> str:
        """How the plan dequantizes 4-bit weights on a CPU (kept within a budget, else row slices)."""
        ways = [
            *([f"kept dequantized if they take at most {self.keep_dequantized_bytes / 2**20:g} MiB"] if self.keep_dequantized_bytes else []),
            *([f"dequantized {self.dequantize_chunk_bytes / 2**20:g} MiB at a time"] if self.dequantize_chunk_bytes else []),
        ]  # fmt: skip
        return "; weights " + ", else ".join(ways) if ways else ""

    def describe(self) -> list[str]:
        return [
            f"device: {self.device} ({self.device_name})",
            f"mixed precision: {self.precision}; weights dtype: {_dtype_name(self.model_dtype)}",
            f"quantization: {self.quantization}"
            + (f" (compute dtype {_dtype_name(self.compute_dtype)})" if self.quantization != "none" else "")
            + ("; embeddings/head kept in the checkpoint's dtype" if self.keep_embeddings else "")
            + self._dequantized(),
            f"optimizer: {self.optimizer}",
            f"attention: {self.attn_implementation}",
            "LoRA layers: " + ("fused base + adapter step" if self.fused_lora else "PEFT's modules"),
            "RMSNorm: " + ("fused step" if self.fused_rms_norm else "transformers' modules"),
            "rotary embedding: " + ("fused step" if self.fused_rotary else "transformers' function"),
            "attention kernel (packed rows): "
            + (
                "WronAI's compiled kernel, every example of a layer in one call (built with the C compiler at "
                "first use, checked against sdpa)"
                if self.native_attention != "off"
                else "PyTorch's sdpa, one call per example"
            ),
            "SwiGLU activation: "
            + (
                "WronAI's compiled kernel, one pass forward and one backward (built with the C compiler at "
                "first use, checked against PyTorch's)"
                if self.native_swiglu != "off"
                else "PyTorch's silu and mul"
            ),
            "packed batches: "
            + (
                "a prompt start all their examples share computed once"
                if self.shared_prefix
                else "every example computes its own prompt start"
            ),
            "loss: "
            + (
                "output head + cross-entropy in one fused step"
                if self.fused_cross_entropy
                else "the head's logits, then cross-entropy"
            ),
            "last decoder layer: "
            + (
                "query/output projections and MLP at trained positions only"
                if self.last_layer_trained_only
                else "every part at every position"
                + (
                    " (hardware.last_layer_trained_only: auto leaves out bf16/fp16 on a CPU: every new row count "
                    "is a new oneDNN kernel kept in memory)"
                    if self.last_layer_rows == "auto"
                    else ""
                )
            ),
            *([self.cpu.describe()] if self.cpu is not None else []),
        ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


# oneDNN instruction sets below AVX512_CORE_BF16: capped at one of them (``ONEDNN_MAX_CPU_ISA``, formerly
# ``DNNL_MAX_CPU_ISA``), oneDNN computes bf16 matmuls without the CPU's bf16 instructions
_ONEDNN_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def onednn_isa_cap() -> str | None:
    """The instruction set oneDNN is capped at below bf16 (``ONEDNN_MAX_CPU_ISA``/``DNNL_MAX_CPU_ISA``), else None.

    torch runs CPU bf16 matmuls through oneDNN; capped below AVX512_CORE_BF16 it emulates them (~1 GFLOP/s on
    the speed benchmark's EPYC, against 430 native), whatever /proc/cpuinfo lists.
    """
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip().upper()
        if value:
            return value if value in _ONEDNN_BELOW_BF16 else None
    return None


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX) and torch's oneDNN may use it; emulated
    bf16 is slower than fp32.

    This one answer decides precision, compute dtype and kernels for CPU runs (``cpu_capability`` shows what
    torch and bitsandbytes each say next to it).
    """
    flags = bool(_cpuinfo_flags() & set(_NATIVE_BF16_FLAGS))
    return flags and torch.backends.mkldnn.is_available() and onednn_isa_cap() is None


@dataclass(frozen=True)
class CpuCapability:
    """What /proc/cpuinfo, torch and bitsandbytes each say about this CPU, and the one decision WronAI takes."""

    native_bf16: bool  # WronAI's decision (cpu_supports_bf16)
    cpuinfo: tuple[str, ...]  # the native-bf16 flags /proc/cpuinfo lists
    torch: str  # torch.backends.cpu.get_cpu_capability()
    bitsandbytes: str  # what bitsandbytes' native library says (its packed 4-bit inference format)

    # oneDNN capped below bf16 by ONEDNN_MAX_CPU_ISA on a CPU with bf16 flags (onednn_isa_cap): why it has none
    onednn_cap: str | None = None

    def describe(self) -> str:
        flags = " ".join(self.cpuinfo) or "none"
        cap = (
            f"; oneDNN capped at {self.onednn_cap} (ONEDNN_MAX_CPU_ISA): bf16 emulated"
            if self.onednn_cap
            else ""
        )
        return (
            f"cpu: native bf16 {'yes' if self.native_bf16 else 'no'} (/proc/cpuinfo: {flags}{cap}; torch: "
            f"{self.torch}; bitsandbytes avx512bf16: {self.bitsandbytes}; its packed 4-bit format: never "
            "while training, inference only where checked)"
        )


@functools.lru_cache(maxsize=1)
def cpu_capability() -> CpuCapability:
    """The CPU as torch, bitsandbytes and /proc/cpuinfo see it (bitsandbytes asked only when installed).

    Asked once per process: ``plan_device`` runs several times per command (preflight, the pipeline)."""
    try:
        torch_says = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        torch_says = "unknown"
    bnb_says = "not installed"
    if importlib.util.find_spec("bitsandbytes") is not None:
        from wronai.kernels import bnb

        bnb_says = bnb.native_avx512bf16()
    flags = tuple(f for f in _NATIVE_BF16_FLAGS if f in _cpuinfo_flags())
    # the cap is recorded only where it takes bf16 instructions away (an AVX2-only CPU has none to lose)
    cap = onednn_isa_cap() if flags else None
    return CpuCapability(cpu_supports_bf16(), flags, torch_says, bnb_says, cap)


def detect_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _device_name(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s)"
    if device == "mps":
        return "Apple GPU"
    return f"{os.cpu_count()} cores, native bf16: {'yes' if cpu_supports_bf16() else 'no'}"


def _bf16_ok(device: str) -> bool:
    """Native bf16 on this device: CUDA from compute capability 8.0 (Ampere; T4/V100 only emulate it)."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device == "cpu":
        return cpu_supports_bf16()
    return False


def plan_device(
    hardware: HardwareSection,
    training: TrainingSection,
    quantization: QuantizationSection,
    model: ModelConfig,
) -> DevicePlan:
    """Resolve device, precision, quantization, optimizer and attention for this machine."""
    notes: list[str] = []
    device = _available_device(hardware.device, notes)
    bf16_ok = _bf16_ok(device)
    precision = _precision(training, device, bf16_ok, notes)
    quant = _quantization(quantization, device, notes)
    compute = _compute_dtype(_DTYPES[quantization.bnb_4bit_compute_dtype], device, precision, bf16_ok)
    note = compute_note(quantization, quant, compute, device, bf16_ok)
    notes += [note] if note else []
    model_dtype = _model_dtype(model.torch_dtype, precision, bf16_ok, device, notes)
    optimizer = _optimizer(training.optim, device, notes)
    attn = _attention(model.attn_implementation, device, notes)
    pin = _pin_memory(hardware, device, notes)
    cpu_4bit = quant.startswith("4bit") and device == "cpu"
    return DevicePlan(
        device=device,
        device_name=_device_name(device),
        precision=precision,
        model_dtype=model_dtype,
        quantization=quant,
        compute_dtype=compute,
        optimizer=optimizer,
        attn_implementation=attn,
        pin_memory=pin,
        notes=notes,
        # WronAI's CPU kernels (kept 16-bit head in row slices, row-sliced 4-bit weights) are measured on
        # CPUs only: on a GPU the stock bitsandbytes/PEFT path runs
        keep_embeddings=cpu_4bit and keeps_16bit_embeddings(quantization, model, hardware),
        dequantize_chunk_bytes=quantization.dequantize_chunk_mib * 2**20 if cpu_4bit else 0,
        keep_dequantized_bytes=quantization.keep_dequantized_bytes if cpu_4bit else 0,
        fused_lora=_fused("fused_lora", hardware, device, notes),
        fused_rms_norm=_fused("fused_rms_norm", hardware, device, notes),
        fused_rotary=_on_cpu_by_default(hardware.fused_rotary, device),
        native_attention=_native(
            "native_attention",
            hardware,
            device,
            notes,
            "attention: no C compiler found ($CC, cc, gcc or clang) — PyTorch's sdpa per example",
        ),
        native_swiglu=_native(
            "native_swiglu",
            hardware,
            device,
            notes,
            "SwiGLU: no C compiler found ($CC, cc, gcc or clang) — PyTorch's silu and mul",
        ),
        shared_prefix=_on_cpu_by_default(hardware.shared_prefix, device),
        fused_cross_entropy=_at_trained_positions("fused_cross_entropy", hardware, training, device, notes),
        last_layer_rows=hardware.last_layer_trained_only
        if _at_trained_positions("last_layer_trained_only", hardware, training, device, notes)
        else "off",
        cpu=dataclasses.replace(cpu_capability(), native_bf16=bf16_ok) if device == "cpu" else None,
    )


def _native(name: str, hardware: HardwareSection, device: str, notes: list[str], without: str) -> str:
    """hardware.<name>, a compiled CPU kernel's setting, resolved: "off" where it cannot run (not a CPU run;
    auto without a C compiler, with a note saying what runs instead: ``without``), else the setting (whether
    the kernel builds is known when the model is set up)."""
    from wronai.kernels.native import find_compiler

    setting = getattr(hardware, name)
    if setting == "off" or (setting == "auto" and device != "cpu"):
        return "off"
    if device != "cpu":
        notes.append(f"hardware.{name} is a CPU kernel — off on {device}")
        return "off"
    if setting == "auto" and find_compiler() is None:
        notes.append(f"{without}; install gcc for WronAI's compiled kernel (hardware.{name})")
        return "off"
    return setting


def _on_cpu_by_default(setting: str, device: str) -> bool:
    """An ``auto|on|off`` speed setting whose ``auto`` is on for CPU runs only (measured there)."""
    return setting == "on" or (setting == "auto" and device == "cpu")


def _available_device(requested: str, notes: list[str]) -> str:
    """hardware.device, or the CPU when the device asked for is not there."""
    device = detect_device(requested)
    if device == "cuda" and not torch.cuda.is_available():
        notes.append("hardware.device=cuda but no CUDA GPU is visible — using cpu")
        device = "cpu"
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        notes.append("hardware.device=mps but MPS is not available — using cpu")
        device = "cpu"
    return device


def _precision(training: TrainingSection, device: str, bf16_ok: bool, notes: list[str]) -> str:
    """The Trainer's mixed precision: training.bf16/fp16 where the device runs it, else what it can."""
    precision = "bf16" if training.bf16 else "fp16" if training.fp16 else "fp32"
    if precision == "fp16" and device == "cpu":
        precision = "bf16" if bf16_ok else "fp32"
        notes.append(f"training.fp16 needs a GPU — using {precision} on cpu")
    elif precision == "bf16" and not bf16_ok and device == "cuda":
        notes.append("training.bf16 needs a GPU with native bf16 (compute capability 8.0+) — using fp16")
        precision = "fp16"
    elif precision == "bf16" and not bf16_ok and device != "mps":
        cap = cpu_capability().onednn_cap if device == "cpu" else None
        why = (
            f" (oneDNN is capped at {cap} by ONEDNN_MAX_CPU_ISA; unset it to use the CPU's bf16)"
            if cap
            else ""
        )
        notes.append(f"training.bf16 is not supported natively on this {device}{why} — using fp32")
        precision = "fp32"
    elif precision == "bf16" and device == "mps":
        notes.append("training.bf16 mixed precision is not supported by the Trainer on mps — using fp32")
        precision = "fp32"
    return precision


def _pin_memory(hardware: HardwareSection, device: str, notes: list[str]) -> bool:
    pin = hardware.pin_memory if hardware.pin_memory is not None else device == "cuda"
    if pin and device != "cuda":
        notes.append("hardware.pin_memory only helps with CUDA — turned off")
        pin = False
    return pin


def _quantization(quantization: QuantizationSection, device: str, notes: list[str]) -> str:
    quant = "none"
    if quantization.load_in_4bit:
        quant = f"4bit-{quantization.bnb_4bit_quant_type}"
    elif quantization.load_in_8bit:
        quant = "8bit"
    if quant != "none" and importlib.util.find_spec("bitsandbytes") is None:
        notes.append(
            "quantization needs bitsandbytes, which is not installed — loading unquantized (pip install bitsandbytes)"
        )
        quant = "none"
    if quant != "none" and device == "mps":
        notes.append("bitsandbytes quantization does not run on mps — loading unquantized")
        quant = "none"
    if quant == "8bit" and device == "cpu":
        notes.append(
            "8-bit (LLM.int8) training needs CUDA — loading unquantized on cpu (use load_in_4bit for QLoRA on CPU)"
        )
        quant = "none"
    return quant


def _compute_dtype(requested: torch.dtype, device: str, precision: str, bf16_ok: bool) -> torch.dtype:
    """The dtype 4-bit weights are dequantized to and multiplied in.

    On a CPU it follows the mixed precision: bf16 under bf16 autocast, else float32 — a bf16 compute dtype
    outside autocast would make every LoRA layer mix dtypes (fused layers decline it, row slices would
    accumulate in bf16, the kept embedding's output would stay bf16 while PEFT's is float32). On CUDA the
    config is used, with fp16 where the GPU has no native bf16; elsewhere float32.
    """
    if device == "cuda":
        return torch.float16 if requested == torch.bfloat16 and not bf16_ok else requested
    if device == "cpu":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    return torch.float32 if requested != torch.float32 else requested


def compute_note(
    quantization: QuantizationSection, quant: str, compute: torch.dtype, device: str, bf16_ok: bool
) -> str | None:
    """Why the 4-bit compute dtype is not the one the config wrote; None when it is, when the key was left at
    its default (the plan's quantization line shows the dtype taken) or when the plan (``quant``) is not 4-bit."""
    requested = _DTYPES[quantization.bnb_4bit_compute_dtype]
    written = "bnb_4bit_compute_dtype" in quantization.model_fields_set
    if not quant.startswith("4bit") or not written or compute == requested:
        return None
    key = f"{COMPUTE_KEY}={_dtype_name(requested)}"
    if requested == torch.float16 and device != "cuda":
        return f"{key} is for GPUs — using {_dtype_name(compute)}"
    if requested == torch.bfloat16 and not bf16_ok:
        return f"{key} is not supported on this {device} — using {_dtype_name(compute)}"
    return (
        f"{key}: on {device} 4-bit layers compute in the mixed-precision dtype — using {_dtype_name(compute)}"
        + (" (training.bf16: true computes in bfloat16)" if compute == torch.float32 else "")
    )


def with_compute_note(plan: DevicePlan, quantization: QuantizationSection) -> DevicePlan:
    """``plan`` with its compute-dtype note made again for its compute dtype (after autotune changed it)."""
    bf16_ok = plan.cpu.native_bf16 if plan.cpu is not None else _bf16_ok(plan.device)
    note = compute_note(quantization, plan.quantization, plan.compute_dtype, plan.device, bf16_ok)
    kept = [n for n in plan.notes if not n.startswith(COMPUTE_KEY + "=")]
    return dataclasses.replace(plan, notes=[*kept, *([note] if note else [])])


def _flash_attention_problem() -> str | None:
    """Why flash-attention 2 cannot run on this CUDA device (None = it can)."""
    if torch.cuda.get_device_capability(0) < (8, 0):
        return "needs compute capability 8.0+ (Ampere or newer)"
    try:
        import flash_attn  # noqa: F401
    except Exception as err:  # a broken build or another package of that name: any import failure
        return f"flash_attn does not import ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


def _attention(requested: str, device: str, notes: list[str]) -> str:
    """auto = flash-attention 2 where it runs (CUDA, capability 8.0+, flash_attn imports), else sdpa."""
    if requested not in ("auto", "flash_attention_2"):
        return requested
    installed = importlib.util.find_spec("flash_attn") is not None
    if device != "cuda" or not installed:
        if requested == "flash_attention_2":
            notes.append(
                "model.attn_implementation=flash_attention_2 needs CUDA and the flash-attn package — using sdpa"
            )
        return "sdpa"
    problem = _flash_attention_problem()
    if problem is None:
        return "flash_attention_2"
    notes.append(f"flash-attention 2 {problem} — using sdpa (model.attn_implementation)")
    return "sdpa"


def _fused(name: str, hardware: HardwareSection, device: str, notes: list[str]) -> bool:
    """hardware.<name>, a fused-kernel setting (auto | on | off), resolved: auto = CPU runs; never with
    parameters sharded across processes (FSDP, ZeRO-3), where a layer holds only a piece of its weights."""
    setting = getattr(hardware, name)
    if hardware.distributed in ("fsdp", "deepspeed_zero3"):
        if setting == "on":
            notes.append(f"hardware.{name} needs whole parameters — off under {hardware.distributed}")
        return False
    return setting == "on" or (setting == "auto" and device == "cpu")


def _at_trained_positions(
    name: str, hardware: HardwareSection, training: TrainingSection, device: str, notes: list[str]
) -> bool:
    """hardware.<name> resolved for a setting that works where the loss is computed at trained positions
    only (fused_cross_entropy, last_layer_trained_only)."""
    if not training.trained_logits_only:
        if getattr(hardware, name) == "on":
            notes.append(
                f"hardware.{name} works at trained positions only — off with training.trained_logits_only=false"
            )
        return False
    return _fused(name, hardware, device, notes)


def keeps_16bit_embeddings(
    quantization: QuantizationSection, model: ModelConfig, hardware: HardwareSection
) -> bool:
    """4-bit runs keep frozen embeddings/head 16-bit (wronai.model.kbit): asked for, dtype auto, not FSDP/ZeRO-3."""
    sharded = hardware.distributed in ("fsdp", "deepspeed_zero3")
    return quantization.keep_embeddings_dtype and model.torch_dtype == "auto" and not sharded


def _optimizer(requested: str, device: str, notes: list[str]) -> str:
    """auto: fused AdamW where torch has the kernel (CPU, CUDA), else the per-tensor one. bitsandbytes
    optimizers: 8-bit states run on CUDA and (bitsandbytes >= 0.45) on CPU; paging is CUDA-only."""
    if requested == "auto":
        return _auto_optimizer(device, notes)
    if requested == "adamw_torch_fused" and device not in _FUSED_ADAMW_DEVICES:
        notes.append(f"training.optim=adamw_torch_fused has no kernel on {device} — using adamw_torch")
        return "adamw_torch"
    if device == "cuda" or not any(tag in requested for tag in _CUDA_ONLY_OPTIMIZERS):
        return requested
    if device == "cpu" and importlib.util.find_spec("bitsandbytes") is not None:
        if "8bit" in requested:
            chosen = requested.replace("paged_", "")
            if chosen != requested:
                notes.append(
                    f"training.optim={requested}: paging is for GPU memory — using {chosen} (8-bit states) on cpu"
                )
            return chosen
        if requested.startswith("paged_") and "32bit" in requested:
            notes.append(f"training.optim={requested}: paging is for GPU memory — using adamw_torch on cpu")
            return "adamw_torch"
    notes.append(f"training.optim={requested} needs CUDA (bitsandbytes) — using adamw_torch on {device}")
    return "adamw_torch"


def with_decided_optimizer(config: WronAIConfig, plan: DevicePlan) -> WronAIConfig:
    """``config`` with ``training.optim: auto`` replaced by the optimizer the plan took, so
    that the run saves it and a resumed run keeps it (``train.resume.keep_decided``); else ``config``."""
    if config.training.optim != "auto":
        return config
    training = config.training.model_copy(update={"optim": plan.optimizer})
    return config.model_copy(update={"training": training})


# devices with torch's fused AdamW kernel (``torch.optim.AdamW(fused=True)``; CPU since torch 2.4)
_FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _auto_optimizer(device: str, notes: list[str]) -> str:
    """``training.optim: auto``: AdamW in one fused kernel per parameter where torch has it — the same update,
    without the ~10 tensor operations per parameter of the per-tensor loop (on a CPU, with no foreach
    kernels, that loop is what ``adamw_torch`` runs)."""
    if device in _FUSED_ADAMW_DEVICES:
        notes.append("training.optim: auto -> adamw_torch_fused (AdamW in one kernel per parameter)")
        return "adamw_torch_fused"
    notes.append(f"training.optim: auto -> adamw_torch (no fused AdamW kernel on {device})")
    return "adamw_torch"


def _model_dtype(requested: str, precision: str, bf16_ok: bool, device: str, notes: list[str]) -> torch.dtype:
    if requested == "auto":
        if precision == "fp16":
            return torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if dtype == torch.float16 and device != "cuda":
        notes.append(f"model.torch_dtype=float16 is for GPUs — using float32 weights on {device}")
        return torch.float32
    if dtype == torch.bfloat16 and not bf16_ok:
        notes.append(
            f"model.torch_dtype=bfloat16 is not supported natively on this {device} — using float32 weights"
        )
        return torch.float32
    return dtype


@contextlib.contextmanager
def thread_settings(hardware: HardwareSection) -> Iterator[None]:
    """PyTorch's CPU thread count ``hardware.num_threads`` inside the block (when configured), the previous
    count after it."""
    previous = torch.get_num_threads()
    if hardware.num_threads:
        torch.set_num_threads(hardware.num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
