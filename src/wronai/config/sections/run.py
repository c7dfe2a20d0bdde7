"""The groups around the training run: `logging` (console, trackers, report), `hardware`, `extensions` (your code)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from wronai.config.sections.base import Section


class LoggingSection(Section):
    """Console, TensorBoard and Weights & Biases logging."""

    report_to: list[Literal["none", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],  # type: ignore[arg-type]
        description="Trackers: tensorboard, wandb, or none (a list or a single name).",
    )
    wandb_project: str = Field("wronai", description="W&B project name.")
    wandb_run_name: str = Field(
        "wronai-{timestamp}", description="Run name; `{timestamp}` becomes YYYYmmdd-HHMMSS."
    )
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="auto = online when an API key is configured, else offline (never a login prompt).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Console log level.")
    logging_dir: str | None = Field(None, description="TensorBoard/W&B directory; null = <output_dir>/logs.")
    report: bool = Field(
        True,
        description="Write report.html (loss, learning rate, throughput, memory plots), PNGs and a model card at the end of training.",
    )
    report_samples: bool = Field(
        True, description="Include answers generated for a few fixed Polish prompts in the report."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_as_list(cls, value: Any) -> Any:
        if value is None:
            return ["none"]
        return [value] if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class HardwareSection(Section):
    """Device choice and memory/dataloader settings."""

    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto = CUDA if present, else Apple MPS, else CPU."
    )
    max_memory: str | dict[str, str] | None = Field(
        None,
        description="Memory cap per device for loading, e.g. `7GiB` (each GPU) or {0: 7GiB, cpu: 30GiB}. (Old: max_memory_mb.)",
    )
    cpu_offload: bool = Field(
        False, description="Let layers that do not fit on the GPU stay on the CPU in fp32 (slow; 8-bit only)."
    )
    dataloader_num_workers: int = Field(0, ge=0, description="Background processes loading batches.")
    pin_memory: bool | None = Field(
        None, description="Pin host memory for faster GPU copies; null = on for CUDA, off elsewhere."
    )
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for PyTorch; null = PyTorch's default (all cores)."
    )
    return_freed_memory: Literal["auto", "on", "off"] = Field(
        "auto",
        description="CPU runs on Linux (glibc): on = give freed memory back to the OS instead of keeping it in the C heap — "
        "buffers of 4 MiB and more are mapped and unmapped (mallopt M_MMAP_THRESHOLD), and between decoder layers "
        "(forward and backward) the heap's free pages are handed back once RSS grew by 16 MiB (malloc_trim). Lowers "
        "the training peak of a 1.1B QLoRA run by ~20% (benchmarks/memory_qlora.py) for some page faults per step. "
        "off = keep freed buffers (up to 32 MiB each, heap top not trimmed) for the next step: no page faults to "
        "touch a step's activations again, a few % more peak RSS. auto = on for CPU runs of models with at least "
        "0.5B parameters, off below.",
    )
    fused_lora: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compute each LoRA layer (frozen base weight + adapter) in one fused step instead of PEFT's chain "
        "of modules: the base matmul, then the adapter added in place (addmm), no copy of the base output, one "
        "autograd node — the same numbers and the same saved adapter, ~7% less time per CPU step "
        "(docs/benchmarks.md). PEFT's own forward still runs what it does not cover (DoRA, several active "
        "adapters, trained biases, mixed dtypes, autocast). auto = on for CPU runs without FSDP/ZeRO-3; on = "
        "also on GPUs (not measured there).",
    )
    fused_rms_norm: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compute transformers' RMSNorm (Llama's, and the norms of every model whose norm is the same "
        "code: Mistral, Qwen, Phi-3, Granite, …) in one autograd step (wronai.kernels.rms_norm) instead of five "
        "operations and their five backwards: the same numbers to ~1e-6, ~6% less time per bf16 CPU step of the "
        "speed benchmark, fp32 steps within noise (docs/benchmarks.md); checked at start against transformers' "
        "own forward. auto = on for CPU runs without FSDP/ZeRO-3; on = also on GPUs (not measured there); "
        "off = transformers' norms.",
    )
    fused_rotary: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compute the rotary position embedding (RoPE) of q and k in one autograd step "
        "(wronai.kernels.rotary) instead of transformers' six operations and their backwards, for every model "
        "whose attention calls Llama's apply_rotary_pos_emb (Mistral, Qwen2/3, Granite, …): the same numbers to "
        "~5e-7, ~2% less time per fp32 CPU step of the speed benchmark (docs/benchmarks.md); checked at start "
        "against transformers' function. auto = on for CPU runs; on = also on GPUs (not measured there); off = "
        "transformers' function.",
    )
    native_attention: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compute per-example causal attention (packed rows) with WronAI's compiled CPU kernel "
        "(wronai.kernels.cpu_attention): every example of a layer in one call, forward and backward, instead of "
        "one PyTorch flash-attention call per example, whose 32-query blocks run short examples at a fifth of "
        "the matmul peak — ~2x faster attention, the same numbers to ~1e-6 (float32), ~10% less time per CPU "
        "step of the speed benchmark (docs/benchmarks.md). Built from its C source with the system compiler "
        "($CC, cc, gcc or clang; -O3 -march=native) at first use, about a second, cached in "
        "$WRONAI_CACHE_DIR or ~/.cache/wronai; checked against sdpa before use. auto = CPU runs where a C "
        "compiler is found (else sdpa per example, with a note); on = fail when it cannot be built; "
        "off = sdpa per example.",
    )
    native_swiglu: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compute the SwiGLU activation of Llama-style MLPs (silu(gate) · up: Llama, Mistral, Qwen2/3, "
        "… — every model whose MLP forward is Llama's code with a SiLU) with WronAI's compiled CPU kernel "
        "(wronai.kernels.swiglu): one pass over memory forward and one backward, instead of PyTorch's silu and "
        "mul forward and three operations backward over the model's largest activations — the same numbers "
        "(float32 to ~1e-6; bf16 rounded once instead of twice), one activation fewer kept for the backward "
        "(docs/benchmarks.md). Built from its C source with the system compiler at first use, like "
        "hardware.native_attention, and checked against PyTorch's before use. auto = CPU runs where a C "
        "compiler is found (else PyTorch's operations, with a note); on = fail when it cannot be built; off = "
        "PyTorch's operations.",
    )
    shared_prefix: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compute a prompt start that every example of a packed batch repeats (a template's "
        "'### Instrukcja:', a chat template's system turn with the same system prompt) once per batch instead of "
        "once per example (wronai.data.prefix): the batch becomes one row in which every example after the first "
        "attends to the first example's copy of it. The same batches, loss and gradients (to float rounding); the "
        "layers run on prefix × (examples - 1) fewer positions — 7.9% on the speed benchmark (8 of ~110 tokens): "
        "6.6-9.9% less operation time per fp32 CPU step, a wall-clock effect within these machines' noise "
        "(docs/benchmarks.md); more with longer shared prompts and wider models. Needs packing and per-example attention "
        "(model.attn_implementation: auto); only prompt tokens are shared. auto = on for CPU runs; on = also on GPUs "
        "(not measured there); off = every example computes its own prefix.",
    )
    fused_cross_entropy: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compute the output head and the token cross-entropy in one step (wronai.kernels.cross_entropy), "
        "a chunk of positions at a time, with the gradient made in the forward: no positions × vocabulary logits, "
        "log-softmax or gradient tensors kept for the backward (2.5 GB each for 4096 positions of a 152k "
        "vocabulary), the same loss to ~1e-6 (fp32). Needs training.trained_logits_only; checked at start against "
        "the stock loss on the model itself (a model that scales or caps its logits keeps the stock loss). auto = "
        "on for CPU runs without FSDP/ZeRO-3; on = also on GPUs (not measured there); off = the head's logits.",
    )
    last_layer_trained_only: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compute the last decoder layer's query and output projections and its MLP only at trained "
        "positions (answers, not prompts): their outputs elsewhere never reach the loss, so the loss and gradients "
        "are the same (to float rounding), for ~90% of that layer's matmuls at untrained positions — 3.5-4% of a "
        "step of the speed benchmark's 6-layer model with 61% of positions trained, about (1 - trained share) / "
        "layers on others (wronai.train.last_layer, docs/benchmarks.md). Needs training.trained_logits_only; not "
        "where gradient checkpointing recomputes the last layer; checked at start against the stock forward on the "
        "model itself. auto = on for fp32 CPU runs without FSDP/ZeRO-3 (under bf16 autocast on a CPU each new row count "
        "is a new oneDNN kernel kept in memory: +175 MB, no faster); on = also there and on GPUs (not measured); "
        "off = the whole layer at every position.",
    )
    autotune: bool = Field(
        True,
        description="CPU runs: time, for about 1.5 s at start, one decoder layer of the model for what the plan cannot "
        "know — bf16 autocast vs fp32 (native-bf16 CPUs, when training.bf16/fp16 are not written), the fused LoRA step "
        "vs PEFT's (hardware.fused_lora: auto), 4-bit row slices vs whole weights — and take the faster; the decision "
        "is logged, saved as wronai_autotune.json in the run and its checkpoints, and reused by --resume. false = the "
        "plan's own choices, never timed.",
    )
    distributed: Literal["none", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "none",
        description="Multi-process strategy under `wronai train --nproc N` / torchrun: none (plain DDP when launched with several processes), ddp, fsdp (shards 4-bit weights; CUDA only), deepspeed_zero2, deepspeed_zero3 (CUDA or CPU; needs deepspeed). See docs/distributed.md.",
    )
    distributed_config: str | None = Field(
        None,
        description="Path to an accelerate config YAML (distributed_type FSDP/DEEPSPEED/MULTI_GPU) or a DeepSpeed JSON; used when distributed is none, and its fsdp_config / DeepSpeed settings replace WronAI's defaults.",
    )

    @field_validator("max_memory", mode="before")
    @classmethod
    def _keys_as_str(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return value


class ExtensionsSection(Section):
    """Your own code, plugged in by import path `package.module:name` (files next to the config work too)."""

    tokenizer_hook: str | None = Field(
        None,
        description="Function(tokenizer, config) -> tokenizer, applied right after the tokenizer is loaded.",
    )
    data_hook: str | None = Field(
        None,
        description="Function(row: dict) -> dict | None, applied to each raw row before formatting; return None to drop the row (counted).",
    )
    callbacks: list[str] = Field(
        default_factory=list,
        description="transformers TrainerCallback classes (or factories) added to the Trainer.",
    )
