"""Model preparation as one stage: the tokenizer (Polish tokens, extend-vocab, the tokenizer hook), then the
base model (quantized), its embeddings (resized, new rows initialised) and the LoRA adapter."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from wronai.config import WronAIConfig
from wronai.config.extensions import load_object
from wronai.errors import WronAIError
from wronai.model import loading
from wronai.model.embeddings import resize_embeddings
from wronai.model.lora import apply_lora
from wronai.model.tokenizer import load_tokenizer, set_pad_token
from wronai.runtime import sharding
from wronai.runtime.activation_checkpointing import auto_gradient_checkpointing, auto_note
from wronai.runtime.hardware import DevicePlan
from wronai.train import faults

logger = logging.getLogger(__name__)


@dataclass
class PreparedTokenizer:
    tokenizer: Any
    new_token_ids: list[int] = field(default_factory=list)  # rows whose embedding is trained from scratch
    base_tokenizer: Any = None  # the tokenizer before polish.extend_vocab
    vocab_tokens: list[Any] = field(default_factory=list)  # tokens added by polish.extend_vocab


def prepare_tokenizer(config: WronAIConfig) -> PreparedTokenizer:
    """The run's tokenizer: the base one with the Polish tokens, extend-vocab and the tokenizer hook applied."""
    tokenizer, new_ids = load_tokenizer(config.model, config.polish)
    prepared = PreparedTokenizer(tokenizer, new_ids)
    if config.polish.extend_vocab is not None:
        from wronai.tokenizers.extend import apply_extend_vocab

        prepared.base_tokenizer = tokenizer
        tokenizer, prepared.vocab_tokens, _ = apply_extend_vocab(tokenizer, config.polish.extend_vocab)
    hook = config.extensions.tokenizer_hook
    if hook:
        before = len(tokenizer)
        tokenizer = load_object(hook, "extensions.tokenizer_hook")(tokenizer, config)
        if tokenizer is None:
            raise WronAIError("extensions.tokenizer_hook returned None — it must return the tokenizer")
        set_pad_token(tokenizer)
        prepared.new_token_ids = sorted({*prepared.new_token_ids, *range(before, len(tokenizer))})
    prepared.tokenizer = tokenizer
    return prepared


def load_base(config: WronAIConfig, plan: DevicePlan) -> Any:
    """The base model as the plan loads it; running out of memory is a one-line error with the fix."""
    try:
        return loading.load_base_model(config.model, config.quantization, config.hardware, plan)
    except Exception as err:
        if faults.is_out_of_memory(err):
            raise WronAIError(faults.oom_message("loading the model", config, plan.device)) from None
        raise


def prepare_model(config: WronAIConfig, plan: DevicePlan, tokens: PreparedTokenizer) -> tuple[Any, Any]:
    """(the PEFT model ready to train, the ZeRO-3 loading context to keep alive until the Trainer exists)."""
    from transformers import set_seed

    set_seed(config.training.seed)  # LoRA's random init happens before the Trainer seeds anything
    # ZeRO-3: load each weight straight into its partition
    zero3_load = sharding.prepare_for_sharded_load(config.hardware, plan, config.training)
    base = load_base(config, plan)
    # rows past the old embedding matrix, plus added tokens that fit into spare rows (e.g. Qwen's padding rows)
    new_ids = sorted({*tokens.new_token_ids, *resize_embeddings(base, len(tokens.tokenizer))})
    if tokens.vocab_tokens:  # polish.extend_vocab: each new row = mean of its base pieces' rows
        from wronai.tokenizers.extend import init_new_embeddings

        init_new_embeddings(base, tokens.base_tokenizer, tokens.vocab_tokens)
        new_ids = sorted({*new_ids, *(t.id for t in tokens.vocab_tokens)})
    model = apply_lora(
        base, config.lora, new_ids, checkpoint_every(config, base, plan),
        keep_embeddings=plan.keep_embeddings, dequantize_chunk_bytes=plan.dequantize_chunk_bytes,
        fused_lora=plan.fused_lora, autocast=plan.autocast_dtype, keep_dequantized_bytes=plan.keep_dequantized_bytes,
    )  # fmt: skip
    if plan.fused_rms_norm:
        from wronai.kernels.rms_norm import fuse_rms_norms

        fuse_rms_norms(model)
    if plan.fused_rotary:
        from wronai.kernels.rotary import fuse_rotary

        fuse_rotary(model, autocast=plan.autocast_dtype)
    if plan.native_swiglu != "off":
        from wronai.kernels.swiglu import fuse_swiglu

        fuse_swiglu(model, plan.native_swiglu)
    return model, zero3_load


def checkpoint_every(config: WronAIConfig, base: Any, plan: DevicePlan) -> int:
    """Every how many decoder layers to recompute (0 = none): training.gradient_checkpointing, with auto
    decided from the loaded model and the free memory, and training.checkpoint_every_n_layers."""
    training = config.training
    if training.gradient_checkpointing != "auto":
        return training.checkpoint_every_n_layers if training.gradient_checkpointing else 0

    every, what, why = auto_gradient_checkpointing(config, base.config.to_dict(), plan.device)
    note = auto_note(what, why)
    logger.info(note)
    plan.notes.append(note)
    return every
