"""The LoRA adapter on the base model: k-bit preparation, gradient checkpointing, PEFT's adapter, fused layers."""

from __future__ import annotations

import logging
from typing import Any

import torch

from wronai.config.sections.model import LoraSection
from wronai.errors import WronAIError
from wronai.model.embeddings import embedding_module_names
from wronai.model.kbit import enable_gradient_checkpointing, prepare_kbit_model
from wronai.runtime.heap import release_free_memory

logger = logging.getLogger(__name__)


def apply_lora(
    model: Any,
    lora_cfg: LoraSection,
    new_token_ids: list[int] | None = None,
    gradient_checkpointing: int = 1,
    keep_embeddings: bool = True,
    dequantize_chunk_bytes: int = 0,
    fused_lora: bool = False,
    keep_dequantized_bytes: int = 0,
    autocast: torch.dtype | None = None,
):
    """k-bit preparation (when quantized), gradient checkpointing and the LoRA adapter.

    ``gradient_checkpointing``: recompute every N-th decoder layer (True = 1 = all, False = 0 = none).

    ``keep_embeddings`` (``DevicePlan.keep_embeddings``): a 4-bit model keeps frozen 16-bit embeddings/head
    as they are (``wronai.model.kbit``);
    embeddings that are trained (modules_to_save, new token rows) are cast to float32 in any case.
    ``dequantize_chunk_bytes`` (``DevicePlan.dequantize_chunk_bytes``): 4-bit layers whose dequantized weight
    is larger dequantize in row slices of this size (``wronai.kernels.row_slices``); 0 = whole weights.
    ``keep_dequantized_bytes`` (``DevicePlan.keep_dequantized_bytes``): when all 4-bit weights, dequantized,
    take at most this, they are kept so (``wronai.kernels.dequantized``; row slices then do not apply).
    ``fused_lora`` (``DevicePlan.fused_lora``): LoRA layers compute base and adapter in one step
    (``wronai.kernels.fused_lora``), checked at start against PEFT's under ``autocast`` (``DevicePlan.autocast_dtype``).
    """
    from peft import get_peft_model

    modules_to_save = list(lora_cfg.modules_to_save) or None
    model = _prepare_base(
        model, new_token_ids, modules_to_save, gradient_checkpointing, keep_embeddings,
        dequantize_chunk_bytes, keep_dequantized_bytes,
    )  # fmt: skip
    try:
        peft_model = get_peft_model(model, _lora_config(lora_cfg, model, new_token_ids, modules_to_save))
    except ValueError as err:
        raise WronAIError(
            f"lora.target_modules: {err} — list module names that exist in this model, or use all-linear"
        ) from None
    if fused_lora:
        from wronai.kernels.fused_lora import fuse_lora_layers

        fuse_lora_layers(peft_model, autocast=autocast)
    freed = release_free_memory()  # loading, quantizing and casting leave freed buffers in the C heap
    if freed > 2**20:
        logger.info("returned %.0f MiB of freed loading buffers to the OS", freed / 2**20)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "trainable parameters: %s of %s (%.3f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return peft_model


def _prepare_base(
    model: Any,
    new_token_ids: list[int] | None,
    modules_to_save: list[str] | None,
    gradient_checkpointing: int,
    keep_embeddings: bool,
    dequantize_chunk_bytes: int,
    keep_dequantized_bytes: int = 0,
) -> Any:
    """k-bit preparation of a quantized base (its 4-bit layers kept dequantized, or in row slices, when
    asked), or gradient checkpointing with input gradients on an unquantized one."""
    four_bit = bool(getattr(model, "is_loaded_in_4bit", False))
    if four_bit or getattr(model, "is_loaded_in_8bit", False):
        trained = bool(new_token_ids) or bool(set(modules_to_save or []) & set(embedding_module_names(model)))
        model = prepare_kbit_model(
            model,
            _compute_dtype(model),
            gradient_checkpointing=gradient_checkpointing,
            keep_embeddings=keep_embeddings and not trained and four_bit,
        )
        kept = 0
        if keep_dequantized_bytes and four_bit:
            from wronai.kernels.dequantized import keep_dequantized_layers

            kept = keep_dequantized_layers(model, keep_dequantized_bytes, _compute_dtype(model))
        if dequantize_chunk_bytes and four_bit and not kept:
            from wronai.kernels.bnb import chunk_4bit_layers

            chunk_4bit_layers(model, dequantize_chunk_bytes)
    elif gradient_checkpointing:
        enable_gradient_checkpointing(model, int(gradient_checkpointing))
        model.enable_input_require_grads()
    return model


def _lora_config(
    lora_cfg: LoraSection, model: Any, new_token_ids: list[int] | None, modules_to_save: list[str] | None
) -> Any:
    """PEFT's ``LoraConfig``; new token rows are trained as token indices of the embeddings not saved whole."""
    from peft import LoraConfig

    token_indices = None
    if new_token_ids:
        names = embedding_module_names(model)
        token_indices = {name: list(new_token_ids) for name in names if name not in (modules_to_save or [])}
    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.lora_alpha,  # type: ignore[arg-type]  # PEFT accepts floats
        lora_dropout=lora_cfg.lora_dropout,
        bias=lora_cfg.bias,
        target_modules=lora_cfg.target_modules,
        modules_to_save=modules_to_save,
        use_rslora=lora_cfg.use_rslora,
        task_type="CAUSAL_LM",
        trainable_token_indices=token_indices or None,
    )


def _compute_dtype(model: Any) -> torch.dtype:
    """The dtype the 4-bit layers compute in (bitsandbytes' compute_dtype), float32 if none says."""
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return torch.float32
