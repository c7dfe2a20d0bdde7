"""The device plan: what the configured run will actually use on this machine.

CUDA, Apple MPS and CPU are detected; settings that cannot work on the chosen device (fp16 on CPU, paged
8-bit optimizers without CUDA, bf16 without hardware support, 4-bit on MPS) are replaced by what can,
with one note per replacement. On CUDA the config is used as written. ``wronai validate`` prints the plan.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wronai.config.schema import HardwareSection, ModelConfig, QuantizationSection, TrainingSection

logger = logging.getLogger(__name__)

_CUDA_ONLY_OPTIMIZERS = ("paged_", "_8bit", "_4bit", "bnb")


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
    fused_lora: bool = False  # LoRA layers computed by wronai.lora_fused (hardware.fused_lora)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"

    def describe(self) -> list[str]:
        return [
            f"device: {self.device} ({self.device_name})",
            f"mixed precision: {self.precision}; weights dtype: {_dtype_name(self.model_dtype)}",
            f"quantization: {self.quantization}"
            + (f" (compute dtype {_dtype_name(self.compute_dtype)})" if self.quantization != "none" else "")
            + ("; embeddings/head kept in the checkpoint's dtype" if self.keep_embeddings else "")
            + (
                f"; weights dequantized {self.dequantize_chunk_bytes / 2**20:g} MiB at a time"
                if self.dequantize_chunk_bytes
                else ""
            ),
            f"optimizer: {self.optimizer}",
            f"attention: {self.attn_implementation}",
            "LoRA layers: " + ("fused base + adapter step" if self.fused_lora else "PEFT's modules"),
        ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


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
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
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
    device = detect_device(hardware.device)
    if device == "cuda" and not torch.cuda.is_available():
        notes.append("hardware.device=cuda but no CUDA GPU is visible — using cpu")
        device = "cpu"
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        notes.append("hardware.device=mps but MPS is not available — using cpu")
        device = "cpu"
    bf16_ok = _bf16_ok(device)

    precision = "bf16" if training.bf16 else "fp16" if training.fp16 else "fp32"
    if precision == "fp16" and device == "cpu":
        precision = "bf16" if bf16_ok else "fp32"
        notes.append(f"training.fp16 needs a GPU — using {precision} on cpu")
    elif precision == "bf16" and not bf16_ok and device != "mps":
        notes.append(f"training.bf16 is not supported natively on this {device} — using fp32")
        precision = "fp32"
    elif precision == "bf16" and device == "mps":
        notes.append("training.bf16 mixed precision is not supported by the Trainer on mps — using fp32")
        precision = "fp32"

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

    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        quantization.bnb_4bit_compute_dtype
    ]
    if device != "cuda" and compute == torch.float16:
        compute = torch.bfloat16 if bf16_ok else torch.float32
        notes.append(
            f"quantization.bnb_4bit_compute_dtype=float16 is for GPUs — using {_dtype_name(compute)}"
        )
    elif compute == torch.bfloat16 and not bf16_ok:
        compute = torch.float32
        if quant.startswith("4bit"):
            notes.append(
                f"quantization.bnb_4bit_compute_dtype=bfloat16 is not supported on this {device} — using float32"
            )

    model_dtype = _model_dtype(model.torch_dtype, precision, bf16_ok, device, notes)

    optimizer = _optimizer(training.optim, device, notes)
    if optimizer == "adamw_torch_fused" and device == "cpu":
        optimizer = "adamw_torch"

    attn = model.attn_implementation
    if attn == "auto":
        attn = "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    elif attn == "flash_attention_2" and (device != "cuda" or importlib.util.find_spec("flash_attn") is None):
        notes.append(
            "model.attn_implementation=flash_attention_2 needs CUDA and the flash-attn package — using sdpa"
        )
        attn = "sdpa"

    pin = hardware.pin_memory if hardware.pin_memory is not None else device == "cuda"
    if pin and device != "cuda":
        notes.append("hardware.pin_memory only helps with CUDA — turned off")
        pin = False

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
        keep_embeddings=quant.startswith("4bit") and keeps_16bit_embeddings(quantization, model, hardware),
        dequantize_chunk_bytes=quantization.dequantize_chunk_mib * 2**20
        if quant.startswith("4bit") and device == "cpu"
        else 0,
        fused_lora=_fused_lora(hardware, device, notes),
    )


def _fused_lora(hardware: HardwareSection, device: str, notes: list[str]) -> bool:
    """hardware.fused_lora resolved: auto = CPU runs; never with parameters sharded across processes."""
    if hardware.distributed in ("fsdp", "deepspeed_zero3"):
        if hardware.fused_lora == "on":
            notes.append(f"hardware.fused_lora needs whole parameters — off under {hardware.distributed}")
        return False
    return hardware.fused_lora == "on" or (hardware.fused_lora == "auto" and device == "cpu")


def keeps_16bit_embeddings(
    quantization: QuantizationSection, model: ModelConfig, hardware: HardwareSection
) -> bool:
    """4-bit runs keep frozen embeddings/head 16-bit (wronai.kbit): asked for, dtype auto, not FSDP/ZeRO-3."""
    sharded = hardware.distributed in ("fsdp", "deepspeed_zero3")
    return quantization.keep_embeddings_dtype and model.torch_dtype == "auto" and not sharded


def _optimizer(requested: str, device: str, notes: list[str]) -> str:
    """bitsandbytes optimizers: 8-bit states run on CUDA and (bitsandbytes >= 0.45) on CPU; paging is CUDA-only."""
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


def apply_thread_settings(hardware: HardwareSection) -> None:
    """Set PyTorch's CPU thread count when configured (called once by the pipeline, never at import)."""
    if hardware.num_threads:
        torch.set_num_threads(hardware.num_threads)
