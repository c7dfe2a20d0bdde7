"""The memory estimate of a run (what `wronai plan` reports): bytes per GPU from the model's config.json alone.

The model's shape comes from its config.json (``read_model_config``: nothing but that file is downloaded),
the settings that move memory from the WronAI config (``Settings``, ``plan_settings``). The estimate adds, per GPU: frozen base weights (4-bit NF4 / 8-bit / 16/32-bit; FSDP and ZeRO-3 split them
across GPUs), the LoRA adapter with its fp32 gradients and AdamW states, activations for the configured
batch and sequence length (with or without gradient checkpointing), the logits of the loss, and a fixed CUDA
context. ``estimate(..., device="cpu")`` sizes a CPU run's peak RSS instead: no CUDA context, plus the heap
that glibc's malloc keeps after freeing activations and a small fixed runtime term.

A quantized model under FSDP or ZeRO-3 has a second peak, while loading: transformers reads the whole
4-bit model on every rank (onto its GPU), k-bit preparation casts the other weights to float32 and LoRA is
added, all before the Trainer shards anything. ``Estimate.load_peak`` is that peak per GPU and
``Estimate.peak`` (the larger of the two) is what the verdict and the advice use (``runtime.memory_plan``).
``benchmarks/plan_accuracy.py`` checks it against measured peaks (docs/distributed.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from wronai.errors import WronAIError
from wronai.runtime import sharding
from wronai.runtime.hardware import keeps_16bit_embeddings, plan_device

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
    # CPU, 4-bit: the weights are kept dequantized when they take at most this (quantization.keep_dequantized_mib)
    keep_dequantized_bytes: int = 0

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
            keep_dequantized_bytes=q.keep_dequantized_bytes,
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
    shard_weights = s.strategy in sharding.SHARDED
    shard_states = shard_weights or s.strategy == "deepspeed_zero2"
    whole = _weights(shape, s)
    # sharded: own shard + one all-gathered layer at a time
    weights = whole / n + whole / shape.layers if shard_weights else whole
    lora = _lora_params(shape, s)
    per_layer = _layer_activations(shape, s)
    linears = shape.linears()
    quantized = s.quantization != "none"
    parts = {
        "base weights": weights,
        "LoRA weights": lora * 4 / (n if shard_weights else 1),
        "LoRA grads + AdamW": lora * (4 + 8) / (n if shard_states else 1),  # fp32 grads + exp_avg, exp_avg_sq
        "activations": _activations(shape, s, per_layer),
        # alive together at the loss's peak: the logits plus three fp32 tensors of their size (fp32 copy or
        # log-softmax output, and gradients); measured with transformers' loss: 14 bytes/logit in bf16, 16 in fp32
        "logits + loss": s.batch * s.seq * shape.vocab * (s.compute_bytes + 12),
        # one dequantized weight at a time
        "dequant buffer": max(a * b for a, b in linears.values()) * s.compute_bytes if quantized else 0,
    }
    kept = shape.linear_params * s.compute_bytes  # every 4-bit weight dequantized
    if device == "cpu" and s.quantization == "4bit" and kept <= s.keep_dequantized_bytes:
        parts["dequant buffer"] = 0
        parts["kept dequantized weights"] = kept  # wronai.kernels.dequantized
    if device == "cpu":
        parts["CPU heap slack"] = CPU_HEAP_SLACK * shape.layers * per_layer
        parts["CPU runtime"] = CPU_RUNTIME
    elif cuda_context:
        parts["CUDA context"] = CUDA_CONTEXT
    load_peak = 0.0
    if shard_weights and quantized:
        load_peak = _sharded_load_peak(shape, s, whole, lora, device != "cpu" and cuda_context)
    return Estimate(parts=parts, trainable=lora, total_params=shape.total_params, load_peak=load_peak)


def _weights(shape: ModelShape, s: Settings) -> float:
    """Bytes of the whole frozen base model as it is held for training."""
    per_linear = {
        "4bit": 0.5 + (0.127 if s.double_quant else 0.5) / 8,
        "8bit": 1.0 + 4 / 4096,
        "none": float(s.weight_bytes),
    }[s.quantization]
    other_bytes = s.embedding_bytes if s.quantization != "none" else s.weight_bytes
    return shape.linear_params * per_linear + shape.other_params * other_bytes


def _lora_params(shape: ModelShape, s: Settings) -> int:
    return shape.layers * sum(
        s.lora_r * (a + b) for name, (a, b) in shape.linears().items() if name in s.lora_targets
    )


def _layer_activations(shape: ModelShape, s: Settings) -> int:
    """Bytes one decoder layer saves for backward."""
    kv = shape.kv_heads * shape.head_dim
    linears = shape.linears()
    lora_in = sum(a for name, (a, _b) in linears.items() if name in s.lora_targets) if s.lora_dropout else 0
    h, i = shape.hidden, shape.intermediate
    return s.batch * s.seq * s.compute_bytes * (10 * h + 2 * kv + 4 * i + lora_in)


def _activations(shape: ModelShape, s: Settings, per_layer: int) -> float:
    """Saved activations at their peak, with or without gradient checkpointing."""
    if not s.gradient_checkpointing:
        return shape.layers * per_layer
    # layers 0, N, 2N, … keep only their input; the others keep everything. Peak: the end of the forward,
    # or the recomputation of the highest checkpointed layer above the uncheckpointed ones below it
    every = max(1, s.checkpoint_every)
    recomputed = -(-shape.layers // every)
    held = max(shape.layers - recomputed, (every - 1) * (recomputed - 1) + 1)
    return held * per_layer + recomputed * s.batch * s.seq * shape.hidden * s.compute_bytes


def _sharded_load_peak(shape: ModelShape, s: Settings, whole: float, lora: int, cuda_context: bool) -> float:
    """A quantized model under FSDP/ZeRO-3 before the Trainer shards anything: every rank holds the whole
    model (transformers reads all 4-bit weights on each rank; accelerate's rank-0-only FSDP loading skips
    bitsandbytes weights), k-bit preparation casts the other weights to float32 (the 16-bit original of the
    largest alive meanwhile), and LoRA's float32 weights are added."""
    largest = (
        max(max(a * b for a, b in shape.linears().values()), shape.vocab * shape.hidden) * s.weight_bytes
    )
    return whole + largest + lora * 4 + (CUDA_CONTEXT if cuda_context else 0.0)


def read_model_config(config: Any, *, local_only: bool = False) -> dict[str, Any]:
    """config.json of model.name: a local directory, the create_if_missing spec, or one file from the Hub
    (``local_only``: from the Hub's cache on this machine only, never the network)."""
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
    return _hub_config(name, config.model.revision, local_only)


def _hub_config(repo_id: str, revision: str | None, local_only: bool = False) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(
            repo_id, filename="config.json", revision=revision, local_files_only=local_only
        )
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


def on_this_cpu(settings: Settings, config: Any) -> Settings:
    """Dtypes and quantization as the device plan resolves them on this machine's CPU (fp32 without native bf16)."""
    hardware = config.hardware.model_copy(update={"device": "cpu"})
    dp = plan_device(hardware, config.training, config.quantization, config.model)
    weight_bytes = 4 if dp.model_dtype == torch.float32 else 2
    quant = "4bit" if dp.quantization.startswith("4bit") else "none"
    compute = (4 if dp.compute_dtype == torch.float32 else 2) if quant == "4bit" else weight_bytes
    return replace(settings, weight_bytes=weight_bytes, compute_bytes=compute, quantization=quant)


def _embedding_bytes(config: Any, model_config: dict[str, Any]) -> int:
    """2 when a 4-bit run keeps the checkpoint's 16-bit embeddings (hardware.keeps_16bit_embeddings), else 4."""
    stored = str(model_config.get("dtype") or model_config.get("torch_dtype") or "")
    keeps = keeps_16bit_embeddings(config.quantization, config.model, config.hardware)
    return 2 if keeps and stored in ("bfloat16", "float16") else 4


def plan_settings(
    config: Any, model_config: dict[str, Any], nproc: int = 1, device: str = "cuda"
) -> Settings:
    """The settings `wronai plan` sizes ``config`` with (``device="cpu"``: dtypes as this machine's CPU plan has them)."""
    settings = replace(
        Settings.from_config(config, nproc=nproc), embedding_bytes=_embedding_bytes(config, model_config)
    )
    return on_this_cpu(settings, config) if device == "cpu" else settings
