"""`wronai plan`: will a config's run fit? The estimate against the memory, the settings to change, the report.

``plan_config`` reads the model's config.json and the settings (``runtime.memory``), resolves
``training.gradient_checkpointing: auto`` as `wronai train` would, and ``make_plan`` says whether the peak
fits and, if not, which changes (greedily, the one that saves most first) make it fit; ``render`` writes
the report `wronai plan` prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from wronai.errors import WronAIError
from wronai.runtime.activation_checkpointing import (
    activation_bytes,
    auto_note,
    checkpointing_choice,
    describe_checkpointing,
)
from wronai.runtime.batch import BatchChoice
from wronai.runtime.batch import resolve as resolve_batch
from wronai.runtime.memory import (
    GIB,
    Estimate,
    ModelShape,
    Settings,
    estimate,
    plan_settings,
    read_model_config,
)

logger = logging.getLogger(__name__)


def parse_gpu_size(text: str) -> float:
    """'24GB', '80', '7.5GiB' -> bytes (GPU sizes are sold in GiB even when labelled GB)."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("gb").removesuffix("g").strip()
    try:
        value = float(raw)
    except ValueError:
        raise WronAIError(f"{text}: give the memory size like 8GB, 24GB or 80GB") from None
    return value * GIB


@dataclass
class Plan:
    shape: ModelShape
    settings: Settings
    estimate: Estimate
    gpu_bytes: float
    advice: list[str]
    device: str = "cuda"  # "cpu": estimate is peak RSS, gpu_bytes is RAM

    @property
    def fits(self) -> bool:
        return self.estimate.peak <= self.gpu_bytes


def _variants(s: Settings, device: str = "cuda") -> list[tuple[str, Settings]]:
    out = []
    if not s.gradient_checkpointing:
        out.append(("set training.gradient_checkpointing: true", replace(s, gradient_checkpointing=True)))
    elif s.checkpoint_every > 1:
        out.append(("set training.checkpoint_every_n_layers: 1", replace(s, checkpoint_every=1)))
    if s.quantization != "4bit":
        out.append(
            (
                "set quantization.load_in_4bit: true (QLoRA)",
                replace(s, quantization="4bit", double_quant=True),
            )
        )
    if s.batch > 1:
        b = max(1, s.batch // 2)
        acc = s.accumulation * s.batch // b
        out.append((f"set training.per_device_train_batch_size: {b} and gradient_accumulation_steps: {acc} (same global batch)",
                    replace(s, batch=b, accumulation=acc)))  # fmt: skip
    if s.seq > 512:
        out.append((f"set data.max_seq_length: {s.seq // 2}", replace(s, seq=s.seq // 2)))
    if s.strategy not in ("fsdp", "deepspeed_zero3") and s.nproc > 1:
        if device == "cpu":  # accelerate turns FSDP on only for GPUs; ZeRO-3 shards on CPU too
            out.append(
                (
                    f"set hardware.distributed: deepspeed_zero3 (shard the weights over {s.nproc} processes)",
                    replace(s, strategy="deepspeed_zero3"),
                )
            )
        else:
            out.append(
                (
                    f"set hardware.distributed: fsdp (shard the weights over {s.nproc} GPUs)",
                    replace(s, strategy="fsdp"),
                )
            )
    if s.lora_r > 16:
        out.append(("set lora.r: 16", replace(s, lora_r=16)))
    return out


def make_plan(shape: ModelShape, settings: Settings, gpu_bytes: float, device: str = "cuda") -> Plan:
    est = estimate(shape, settings, device=device)
    advice: list[str] = []
    if est.peak > gpu_bytes:
        current, peak = settings, est.peak
        for _ in range(6):  # greedy: the change that saves most, until it fits
            options = [
                (estimate(shape, v, device=device).peak, text, v) for text, v in _variants(current, device)
            ]
            if not options or min(o[0] for o in options) >= peak:  # nothing left lowers the peak
                break
            peak, text, current = min(options, key=lambda o: o[0])
            advice.append(f"{text} -> {peak / GIB:.1f} GiB")
            if peak <= gpu_bytes:
                break
        final = estimate(shape, current, device=device)
        if final.peak > gpu_bytes:
            if final.load_peak > final.total:  # more GPUs do not help: each loads the whole quantized model
                where = "GPUs with more memory (each holds the whole quantized model while it loads)"
            elif device == "cpu":
                where = "more RAM"
            else:
                where = "a GPU with more memory, more GPUs with hardware.distributed: fsdp"
            advice.append(f"still too large: use {where}, or a smaller model")
    return Plan(shape, settings, est, gpu_bytes, advice, device)


def render(plan: Plan, model_name: str, gpu_label: str) -> str:
    s, e = plan.settings, plan.estimate
    cpu = plan.device == "cpu"
    lines = [
        f"model: {model_name} — {_count(e.total_params)} parameters ({plan.shape.layers} layers, hidden {plan.shape.hidden}, vocab {plan.shape.vocab})",
        f"run: {s.quantization} weights, LoRA r={s.lora_r} on {len(s.lora_targets)} module types ({_count(e.trainable)} trainable), "
        f"batch {s.batch} × seq {s.seq}, gradient checkpointing {_checkpointing_text(s, plan.shape.layers)}, "
        f"{s.nproc} {'process' if cpu else 'GPU'}(s), strategy {s.strategy}",
        "peak RSS increase per process (CPU; + ~0.4 GiB for Python and the libraries):"
        if cpu
        else "memory per GPU:",
        *[f"  {name:<20} {value / GIB:7.2f} GiB" for name, value in e.parts.items()],
        f"  {'total':<20} {e.total / GIB:7.2f} GiB",
    ]
    if e.load_peak > e.total:
        where = "process" if cpu else "GPU"
        lines.append(
            f"  {'load peak':<20} {e.load_peak / GIB:7.2f} GiB  (each {where} holds the whole "
            f"{s.quantization} model until {s.strategy} shards it)"
        )
    verdict = "fits" if plan.fits else "does NOT fit"
    target = f"in {gpu_label} of RAM" if cpu else f"on a {gpu_label} GPU"
    lines.append(
        f"{verdict} {target} ({plan.gpu_bytes / GIB:.0f} GiB): {100 * e.peak / plan.gpu_bytes:.0f}% used"
    )
    lines += [f"  to fit: {a}" for a in plan.advice]
    return "\n".join(lines) + "\n"


def _checkpointing_text(s: Settings, layers: int) -> str:
    return describe_checkpointing(s.checkpoint_every if s.gradient_checkpointing else 0, layers)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def plan_config(config: Any, gpu: str = "24GB", nproc: int = 1, device: str = "cuda") -> tuple[Plan, str]:
    """``device="cpu"``: size a CPU run's peak RSS against ``gpu`` bytes of RAM."""
    model_config = read_model_config(config)
    shape = ModelShape.from_config(model_config)
    budget = parse_gpu_size(gpu)
    config, batch = _resolve_batch(config, model_config, shape, budget, nproc, device)
    settings = plan_settings(config, model_config, nproc, device)
    auto = "".join(f"{note}\n" for note in batch.notes)
    if config.training.gradient_checkpointing == "auto":  # as `wronai train` decides it, after loading
        free = budget - (
            estimate(shape, settings, device=device).total - activation_bytes(shape, settings, device)
        )
        every, why = checkpointing_choice(shape, settings, free, device)
        settings = replace(settings, gradient_checkpointing=every > 0, checkpoint_every=max(1, every))
        auto += auto_note(describe_checkpointing(every, shape.layers), why) + "\n"
    plan = make_plan(shape, settings, budget, device)
    return plan, render(plan, config.model.name, gpu) + auto


def _resolve_batch(
    config: Any, model_config: dict[str, Any], shape: ModelShape, budget: float, nproc: int, device: str
) -> tuple[Any, BatchChoice]:
    """``training.per_device_train_batch_size: auto`` as `wronai train` decides it, against ``budget`` less
    what a step holds besides its activations."""
    ones = config.training.model_copy(
        update={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1}
    )
    one = plan_settings(config.model_copy(update={"training": ones}), model_config, nproc, device)
    static = estimate(shape, one, device=device).total - activation_bytes(shape, one, device)
    return resolve_batch(config, device, model_config, free_bytes=budget - static)
