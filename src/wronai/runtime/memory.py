"""`wronai plan`: GPU memory per device for a config, from the model's config.json alone (nothing downloaded).

The estimate adds, per GPU: frozen base weights (4-bit NF4 / 8-bit / 16/32-bit; FSDP and ZeRO-3 split them
across GPUs), the LoRA adapter with its fp32 gradients and AdamW states, activations for the configured
batch and sequence length (with or without gradient checkpointing), the logits of the loss, and a fixed CUDA
context. ``estimate(..., device="cpu")`` sizes a CPU run's peak RSS instead: no CUDA context, plus the heap
that glibc's malloc keeps after freeing activations and a small fixed runtime term.

A quantized model under FSDP or ZeRO-3 has a second peak, while loading: transformers reads the whole
4-bit model on every rank (onto its GPU), k-bit preparation casts the other weights to float32 and LoRA is
added, all before the Trainer shards anything. ``Estimate.load_peak`` is that peak per GPU and
``Estimate.peak`` (the larger of the two) is what the verdict and the advice use.
``benchmarks/plan_accuracy.py`` checks it against measured peaks (docs/distributed.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wronai.errors import WronAIError
from wronai.runtime import sharding

logger = logging.getLogger(__name__)

GIB = 2**30
CUDA_CONTEXT = 0.75 * GIB  # CUDA context + cuBLAS workspaces + allocator slack, measured on recent drivers
# CPU only, fitted to benchmarks/plan_accuracy.py (150M-1.1B Llama shapes, glibc malloc defaults): freed
# activation and dequantization buffers stay in the heap, ~0.6x the activations of all layers without
# gradient checkpointing (glibc raises its mmap threshold to 32 MiB, so smaller buffers come from the heap);
# plus first-step buffers (autograd, optimizer, OpenMP) of a few MiB.
CPU_HEAP_SLACK = 0.6
CPU_RUNTIME = 12 * 2**20
_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        cfg = {**cfg.get("text_config", {}), **cfg} if "hidden_size" not in cfg else cfg
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(
                hidden=hidden, intermediate=int(cfg.get("intermediate_size") or 4 * hidden), layers=int(cfg["num_hidden_layers"]),
                heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads), vocab=int(cfg["vocab_size"]),
                head_dim=int(cfg.get("head_dim") or hidden // heads), tied=bool(cfg.get("tie_word_embeddings", False)),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            raise WronAIError(
                f"model.name: config.json lacks {err} — wronai plan supports decoder-only (Llama-style) configs"
            ) from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection in one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:  # embeddings, output head, norms: never quantized
        return (
            self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * 2 * self.hidden + self.hidden
        )

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params


@dataclass(frozen=True)
class Settings:
    """The config values that move memory (one place, so advice can change them and re-estimate)."""

    quantization: str  # 4bit | 8bit | none
    double_quant: bool
    weight_bytes: int  # bytes per non-quantized weight (2 = bf16/fp16, 4 = fp32)
    compute_bytes: int  # bytes per activation value
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_dropout: bool
    batch: int
    seq: int
    accumulation: int
    gradient_checkpointing: bool
    strategy: str  # none | ddp | fsdp | deepspeed_zero2 | deepspeed_zero3
    nproc: int
    # bytes per embedding/head/norm weight next to quantized linears: 4 = PEFT's float32 copies,
    # 2 = kept in the checkpoint's 16-bit dtype (quantization.keep_embeddings_dtype, wronai.model.kbit)
    embedding_bytes: int = 4
    checkpoint_every: int = 1  # with gradient_checkpointing: every N-th decoder layer recomputed (1 = all)

    @classmethod
    def from_config(cls, config: Any, nproc: int = 1) -> Settings:
        """Settings on a bf16-capable GPU (what `wronai plan` sizes for)."""
        q, t = config.quantization, config.training
        weight_bytes = 4 if config.model.torch_dtype == "float32" else 2  # auto = bf16 on GPUs
        quant = "4bit" if q.load_in_4bit else "8bit" if q.load_in_8bit else "none"
        compute = (4 if q.bnb_4bit_compute_dtype == "float32" else 2) if quant == "4bit" else weight_bytes
        name = sharding.strategy(config.hardware)
        targets = config.lora.target_modules
        return cls(
            quantization=quant, double_quant=q.bnb_4bit_use_double_quant, weight_bytes=weight_bytes, compute_bytes=compute,
            lora_r=config.lora.r, lora_targets=tuple(_LINEAR_NAMES if targets == "all-linear" else targets),
            lora_dropout=config.lora.lora_dropout > 0, batch=t.per_device_train_batch_size, seq=config.data.max_seq_length,
            accumulation=t.gradient_accumulation_steps, gradient_checkpointing=t.gradient_checkpointing is True,
            checkpoint_every=t.checkpoint_every_n_layers,
            strategy="ddp" if name == "none" and nproc > 1 else name, nproc=nproc,
        )  # fmt: skip


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes per GPU during a training step
    trainable: int = 0
    total_params: int = 0
    # bytes per GPU right after loading, before FSDP/ZeRO-3 shard the weights (0 = loading stays below a step)
    load_peak: float = 0.0

    @property
    def total(self) -> float:
        """A training step's bytes per GPU (the sum of ``parts``)."""
        return sum(self.parts.values())

    @property
    def peak(self) -> float:
        """The most the run needs at once per GPU: a training step, or the load before sharding."""
        return max(self.total, self.load_peak)

    def without_context(self) -> float:
        return self.total - self.parts.get("CUDA context", 0.0)


def estimate(shape: ModelShape, s: Settings, *, cuda_context: bool = True, device: str = "cuda") -> Estimate:
    """Bytes per GPU for one training step of ``shape`` under settings ``s``.

    ``device="cpu"``: peak RSS increase of a CPU process instead (no CUDA context; heap slack and runtime
    terms added). The Python process with torch/transformers/peft loaded (~0.4 GiB) is not included.
    """
    n = max(1, s.nproc)
    shard_weights = s.strategy in ("fsdp", "deepspeed_zero3")
    shard_states = s.strategy in ("fsdp", "deepspeed_zero3", "deepspeed_zero2")
    quantized = s.quantization != "none"
    per_linear = {
        "4bit": 0.5 + (0.127 if s.double_quant else 0.5) / 8,
        "8bit": 1.0 + 4 / 4096,
        "none": float(s.weight_bytes),
    }[s.quantization]
    other_bytes = s.embedding_bytes if quantized else s.weight_bytes
    weights = shape.linear_params * per_linear + shape.other_params * other_bytes
    layer_weights = weights / shape.layers if shard_weights else 0.0
    if shard_weights:
        weights = weights / n + layer_weights  # own shard + one all-gathered layer at a time

    linears = shape.linears()
    lora = shape.layers * sum(
        s.lora_r * (a + b) for name, (a, b) in linears.items() if name in s.lora_targets
    )
    lora_weights = lora * 4 / (n if shard_weights else 1)
    lora_states = lora * (4 + 8) / (n if shard_states else 1)  # fp32 grads + AdamW exp_avg, exp_avg_sq

    tokens = s.batch * s.seq
    h, i, d = shape.hidden, shape.intermediate, s.compute_bytes
    kv = shape.kv_heads * shape.head_dim
    lora_in = sum(a for name, (a, _b) in linears.items() if name in s.lora_targets) if s.lora_dropout else 0
    per_layer = tokens * d * (10 * h + 2 * kv + 4 * i + lora_in)  # saved for backward by one decoder layer
    if s.gradient_checkpointing:
        # layers 0, N, 2N, … keep only their input; the others keep everything. Peak: the end of the forward,
        # or the recomputation of the highest checkpointed layer above the uncheckpointed ones below it
        every = max(1, s.checkpoint_every)
        recomputed = -(-shape.layers // every)
        held = max(shape.layers - recomputed, (every - 1) * (recomputed - 1) + 1)
        activations = held * per_layer + recomputed * tokens * h * d
    else:
        activations = shape.layers * per_layer
    # alive together at the loss's peak: the logits plus three fp32 tensors of their size (fp32 copy or
    # log-softmax output, and gradients); measured with transformers' loss: 14 bytes/logit in bf16, 16 in fp32
    logits = tokens * shape.vocab * (d + 12)
    dequant = (
        max(a * b for a, b in linears.values()) * d if quantized else 0
    )  # one dequantized weight at a time

    load_peak = 0.0
    if shard_weights and quantized:
        # before the Trainer shards anything every rank holds the whole model: transformers reads all 4-bit
        # weights on each rank (accelerate's rank-0-only FSDP loading skips bitsandbytes weights), k-bit
        # preparation casts the other weights to float32 (the 16-bit original of the largest alive meanwhile),
        # and LoRA's float32 weights are added; ``cuda_context`` as for a step
        whole = shape.linear_params * per_linear + shape.other_params * other_bytes
        largest = max(max(a * b for a, b in linears.values()), shape.vocab * shape.hidden) * s.weight_bytes
        load_peak = whole + largest + lora * 4
        if device != "cpu" and cuda_context:
            load_peak += CUDA_CONTEXT

    parts = {
        "base weights": weights,
        "LoRA weights": lora_weights,
        "LoRA grads + AdamW": lora_states,
        "activations": activations,
        "logits + loss": logits,
        "dequant buffer": dequant,
    }
    if device == "cpu":
        parts["CPU heap slack"] = CPU_HEAP_SLACK * shape.layers * per_layer
        parts["CPU runtime"] = CPU_RUNTIME
    elif cuda_context:
        parts["CUDA context"] = CUDA_CONTEXT
    return Estimate(parts=parts, trainable=lora, total_params=shape.total_params, load_peak=load_peak)


def parse_gpu_size(text: str) -> float:
    """'24GB', '80', '7.5GiB' -> bytes (GPU sizes are sold in GiB even when labelled GB)."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("gb").removesuffix("g").strip()
    try:
        value = float(raw)
    except ValueError:
        raise WronAIError(f"{text}: give the memory size like 8GB, 24GB or 80GB") from None
    return value * GIB


def read_model_config(config: Any) -> dict[str, Any]:
    """config.json of model.name: a local directory, the create_if_missing spec, or one file from the Hub."""
    name = config.model.name
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text(encoding="utf-8"))
    spec = config.model.create_if_missing
    if spec is not None and not local.exists():
        return {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
                "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
                "vocab_size": spec.vocab_size, "tie_word_embeddings": False}  # fmt: skip
    if local.exists():
        raise WronAIError(f"model.name: {name} has no config.json — point model.name at a model directory")
    return _hub_config(name, config.model.revision)


def _hub_config(repo_id: str, revision: str | None) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, filename="config.json", revision=revision)
    except Exception as err:  # offline, unknown repo, gated repo: all one line for the user
        kind = type(err).__name__
        offline = kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or isinstance(
            err, (ConnectionError, TimeoutError)
        )
        reason = (
            "offline or the Hub is unreachable"
            if offline
            else (str(err).strip().splitlines() or [kind])[0][:120]
        )
        raise WronAIError(
            f"model.name: cannot fetch config.json of {repo_id!r} from the Hugging Face Hub ({reason}) — "
            "connect to the network, or point model.name at a local directory holding config.json"
        ) from None
    return json.loads(Path(path).read_text(encoding="utf-8"))


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
    from wronai.runtime.activation_checkpointing import describe_checkpointing

    return describe_checkpointing(s.checkpoint_every if s.gradient_checkpointing else 0, layers)


def on_this_cpu(settings: Settings, config: Any) -> Settings:
    """Dtypes and quantization as the device plan resolves them on this machine's CPU (fp32 without native bf16)."""
    import torch

    from wronai.runtime.hardware import plan_device

    hardware = config.hardware.model_copy(update={"device": "cpu"})
    dp = plan_device(hardware, config.training, config.quantization, config.model)
    weight_bytes = 4 if dp.model_dtype == torch.float32 else 2
    quant = "4bit" if dp.quantization.startswith("4bit") else "none"
    compute = (4 if dp.compute_dtype == torch.float32 else 2) if quant == "4bit" else weight_bytes
    return replace(settings, weight_bytes=weight_bytes, compute_bytes=compute, quantization=quant)


def _embedding_bytes(config: Any, model_config: dict[str, Any]) -> int:
    """2 when a 4-bit run keeps the checkpoint's 16-bit embeddings (hardware.keeps_16bit_embeddings), else 4."""
    from wronai.runtime.hardware import keeps_16bit_embeddings

    stored = str(model_config.get("dtype") or model_config.get("torch_dtype") or "")
    keeps = keeps_16bit_embeddings(config.quantization, config.model, config.hardware)
    return 2 if keeps and stored in ("bfloat16", "float16") else 4


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def plan_config(config: Any, gpu: str = "24GB", nproc: int = 1, device: str = "cuda") -> tuple[Plan, str]:
    """``device="cpu"``: size a CPU run's peak RSS against ``gpu`` bytes of RAM."""
    model_config = read_model_config(config)
    shape = ModelShape.from_config(model_config)
    settings = Settings.from_config(config, nproc=nproc)
    settings = replace(settings, embedding_bytes=_embedding_bytes(config, model_config))
    if device == "cpu":
        settings = on_this_cpu(settings, config)
    budget = parse_gpu_size(gpu)
    auto = ""
    if config.training.gradient_checkpointing == "auto":  # as `wronai train` decides it, after loading
        from wronai.runtime.activation_checkpointing import (
            activation_bytes,
            auto_note,
            checkpointing_choice,
            describe_checkpointing,
        )

        free = budget - (
            estimate(shape, settings, device=device).total - activation_bytes(shape, settings, device)
        )
        every, why = checkpointing_choice(shape, settings, free, device)
        settings = replace(settings, gradient_checkpointing=every > 0, checkpoint_every=max(1, every))
        auto = auto_note(describe_checkpointing(every, shape.layers), why) + "\n"
    plan = make_plan(shape, settings, budget, device)
    return plan, render(plan, config.model.name, gpu) + auto
