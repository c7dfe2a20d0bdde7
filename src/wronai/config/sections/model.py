"""The `model`, `lora` and `quantization` groups: the base model, its adapter and how its weights are stored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from wronai.config.sections.base import Section

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


_DTYPE_ALIASES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float": "float32",
}


def _normalize_dtype(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip().lower().removeprefix("torch.")
        return _DTYPE_ALIASES.get(value, value)
    return value


class TinyModelSpec(Section):
    """A small Llama-architecture model built locally (tokenizer trained on your text, random weights).

    Used by the offline demo and the tests: it makes the whole pipeline runnable without the Hub.
    """

    tokenizer_data: list[str] = Field(
        description="Text/JSONL files the byte-level BPE tokenizer is trained on (paths relative to the config file's directory are resolved against it)."
    )
    vocab_size: int = Field(2000, ge=300, le=256000, description="Tokenizer vocabulary size.")
    hidden_size: int = Field(128, ge=8, description="Model width.")
    intermediate_size: int = Field(352, ge=8, description="MLP width.")
    num_hidden_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads (must divide hidden_size).")
    num_key_value_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention).")
    max_position_embeddings: int = Field(1024, ge=16, description="Longest sequence the model accepts.")
    pretrain_steps: int = Field(
        0,
        ge=0,
        description="Optional quick full-weight pre-training steps on `tokenizer_data` so the base model is not pure noise (0 = random weights).",
    )
    seed: int = Field(0, description="Seed for weights and tokenizer training.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelSpec:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads} "
                "— pick a head count that divides hidden_size"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by num_key_value_heads="
                f"{self.num_key_value_heads} — pick a divisor"
            )
        return self


class ModelConfig(Section):
    """The base model: where it comes from and how it is loaded."""

    name: str = Field(
        description="Hugging Face Hub id (`org/name`) or a local directory holding config.json and weights."
    )
    revision: str | None = Field(
        None, description="Hub branch, tag or commit to load (ignored for local directories)."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow the model repository's own Python code to run (needed by some architectures; only for repos you trust).",
    )
    torch_dtype: DTypeName = Field(
        "auto",
        description="dtype for the non-quantized weights: auto (bfloat16 where the hardware supports it, else float32), float32, bfloat16, float16.",
    )
    device_map: str | dict[str, Any] | None = Field(
        "auto",
        description="Where the weights go: `auto` (WronAI picks the device from the hardware plan), `cpu`, `cuda`, `mps`, or an explicit accelerate device map.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel: auto (flash_attention_2 when installed on CUDA, else sdpa; packed rows then attend "
        "per example, at per-example cost), sdpa (packed rows: one block-diagonal mask per row), eager, flash_attention_2.",
    )
    create_if_missing: TinyModelSpec | None = Field(
        None,
        description="If `name` is a local path that does not exist yet, build a small local model there first (offline demo and tests).",
    )

    _normalize = field_validator("torch_dtype", mode="before")(_normalize_dtype)


class LoraSection(Section):
    """LoRA adapter settings (PEFT)."""

    r: int = Field(16, ge=1, le=4096, description="LoRA rank: size of the low-rank update. 8–64 is typical.")
    lora_alpha: float = Field(
        32, gt=0, description="LoRA scaling numerator; the update is scaled by lora_alpha / r."
    )
    lora_dropout: float = Field(
        0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training."
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases are trained: none, all, lora_only."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names that get adapters (e.g. [q_proj, v_proj]) or `all-linear` for every linear layer except the output head.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Extra modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA scaling (lora_alpha / sqrt(r)).")
    task_type: Literal["CAUSAL_LM"] = Field(
        "CAUSAL_LM", description="PEFT task type; WronAI trains causal language models only."
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_module_as_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all-linear":
            return [value]
        return value


class QuantizationSection(Section):
    """bitsandbytes quantization of the frozen base weights (QLoRA = 4-bit NF4 + LoRA)."""

    load_in_4bit: bool = Field(True, description="Store the frozen base weights in 4 bits (QLoRA).")
    load_in_8bit: bool = Field(
        False, description="Store the frozen base weights in 8 bits (LLM.int8). Exclusive with load_in_4bit."
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: nf4 (NormalFloat, QLoRA default) or fp4."
    )
    bnb_4bit_use_double_quant: bool = Field(
        True, description="Quantize the quantization constants too (saves ~0.4 bit/parameter)."
    )
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16",
        description="dtype the 4-bit weights are dequantized to for matmuls (float32 where bf16 is not supported).",
    )
    keep_embeddings_dtype: bool = Field(
        True,
        description="With 4-bit: keep the frozen input embedding and output head in the checkpoint's 16-bit dtype, "
        "computing their outputs in the compute dtype (same numbers), instead of float32 copies as PEFT's "
        "k-bit preparation makes — half their memory (~250 MiB on a 1B model with a 32k vocabulary). Needs "
        "model.torch_dtype: auto; off under FSDP/ZeRO-3. false = PEFT's float32 upcast.",
    )
    dequantize_chunk_mib: int = Field(
        2,
        ge=0,
        description="CPU, 4-bit: dequantize each frozen weight this many MiB of rows at a time inside its matmul "
        "(forward and backward) instead of whole, as bitsandbytes does — same numbers, a smaller peak (a 1B "
        "model's largest layer is 46 MB in float32, a 7B model's 235 MB). 0 = whole weights. GPUs use "
        "bitsandbytes' kernels.",
    )
    keep_dequantized_mib: int = Field(
        256,
        ge=0,
        description="CPU, 4-bit: when the frozen 4-bit weights dequantized to the compute dtype take at most this "
        "many MiB together, keep them so for the whole run instead of dequantizing every weight again in every "
        "forward and backward — the same numbers, a faster step (~7% on the speed benchmark's model), at that "
        "much more memory (the 4-bit codes stay the saved, exported weights). Row slices "
        "(dequantize_chunk_mib) apply only to a model over this budget; writing dequantize_chunk_mib alone sets "
        "this to 0. 0 = never. GPUs use bitsandbytes' kernels.",
    )

    _normalize = field_validator("bnb_4bit_compute_dtype", mode="before")(_normalize_dtype)

    @model_validator(mode="after")
    def _one_mode(self) -> QuantizationSection:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both true — set one of them to false")
        written = self.model_fields_set & {"dequantize_chunk_mib", "keep_dequantized_mib"}
        if self.dequantize_chunk_mib and written == {"dequantize_chunk_mib"}:
            # row slices written, keeping not: the user asked for the smaller peak
            self.keep_dequantized_mib = 0
        return self

    @property
    def keep_dequantized_bytes(self) -> int:
        """keep_dequantized_mib in bytes."""
        return self.keep_dequantized_mib * 2**20

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit
