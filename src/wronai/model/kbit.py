"""k-bit preparation of a quantized base model, without doubling the memory of its embeddings.

PEFT's ``prepare_model_for_kbit_training`` freezes the model and casts *every* 16-bit parameter to float32 —
the input embedding and output head included. Those two are frozen and are usually the largest
non-quantized weights: on TinyLlama-1.1B (32k vocabulary) they hold 131M parameters, 500 MiB in float32,
as much as all of its 4-bit linear layers together.

``prepare_kbit_model`` does the same preparation (freeze; norms and other small weights to float32;
gradient checkpointing) but keeps the embedding and head in the checkpoint's 16-bit dtype. Their outputs
are what PEFT's fp32 copies give: bf16/fp16 → fp32 is exact, so an embedding lookup cast to fp32 (always:
the residual stream starts in fp32, as with PEFT's copy), and a head computed in its input's dtype from row
slices of its weight upcast one at a time (``UpcastLinear``, swapped in for the head; never the whole
matrix at once, and nothing but the 16-bit weight kept for backward).
The 4-bit layers, quantized from the 16-bit weights (the same codes and scales as from float32 copies),
are set to dequantize straight to the compute dtype. Trained embeddings (``lora.modules_to_save``, new
token rows) are cast to float32 as PEFT does.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch

from wronai.kernels.row_slices import DenseRows, row_sliced_linear

logger = logging.getLogger(__name__)

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# compute-dtype bytes of one upcast row slice of the head (below glibc's fixed mmap threshold: reused buffers)
CHUNK_BYTES = 2 * 2**20


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A frozen linear layer computed in ``x.dtype`` from a weight stored in a narrower dtype."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("upcast_linear is for frozen weights")
    source = DenseRows(weight.shape[0], weight.shape[1])
    return row_sliced_linear(x, source, (weight,), CHUNK_BYTES, bias)


class UpcastLinear(torch.nn.Linear):
    """A frozen ``nn.Linear`` kept in 16 bits, computed in its input's dtype from row slices upcast one at a
    time (``upcast_linear``). Swapped in for the output head (``from_linear``, in place)."""

    slice_bytes = CHUNK_BYTES  # what wronai.kernels.cross_entropy computes it from, in the same slices

    @classmethod
    def from_linear(cls, module: torch.nn.Linear) -> UpcastLinear:
        module.__class__ = cls
        return module  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return upcast_linear(x, self.weight, self.bias)


def _cast_output(dtype: torch.dtype, _module: torch.nn.Module, _args: Any, output: torch.Tensor):
    return output.to(dtype)


def keepable_dtype(weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    """A 16-bit weight computed in float32 (exact upcast) or in its own dtype needs no float32 copy."""
    return weight_dtype in SIXTEEN_BIT and compute_dtype in (torch.float32, weight_dtype)


def prepare_kbit_model(
    model: Any,
    compute_dtype: torch.dtype,
    *,
    gradient_checkpointing: int,
    keep_embeddings: bool = True,
) -> Any:
    """Freeze, cast small 16-bit weights to float32, keep the embedding and head 16-bit, enable checkpointing.

    Returns the model (changed in place). With ``keep_embeddings=False`` it is PEFT's preparation.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    kept: list[torch.nn.Module] = []
    if keep_embeddings:
        # a head is kept only where its forward can be replaced by the upcasting one (a plain Linear)
        candidates = [embed, head if isinstance(head, torch.nn.Linear) else None]
        kept = [m for m in candidates if m is not None and keepable_dtype(m.weight.dtype, compute_dtype)]
    kept_params = {id(p): p.numel() for m in kept for p in m.parameters()}  # tied weights once
    for param in model.parameters():
        if (
            param.dtype in SIXTEEN_BIT
            and type(param).__name__ != "Params4bit"
            and id(param) not in kept_params
        ):
            param.data = param.data.to(torch.float32)
    _dequantize_to(model, compute_dtype)
    if embed in kept:  # PEFT's float32 copy gives a float32 output: the residual stream starts in float32
        embed.register_forward_hook(partial(_cast_output, torch.float32))
    if head is not None and head in kept:
        UpcastLinear.from_linear(head)
    if kept:
        logger.info(
            "4-bit: embeddings/output head kept in %s (outputs in float32, as PEFT's copies give) — %.0f MiB "
            "less than float32 copies",
            str(kept[0].weight.dtype).replace("torch.", ""),
            sum(kept_params.values()) * 2 / 2**20,  # 2 bytes saved per parameter
        )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, int(gradient_checkpointing))
    return model


def enable_gradient_checkpointing(model: Any, every_n_layers: int = 1) -> None:
    """Non-reentrant activation (gradient) checkpointing of every ``every_n_layers``-th decoder layer.

    transformers 5 calls it ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is a
    deprecated alias there, to be removed in v6) and can skip layers; 4.x only knows the old name and
    checkpoints every layer.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers
        )
    else:
        if every_n_layers > 1:
            logger.warning(
                "this transformers version checkpoints every decoder layer (every_n_layers needs v5)"
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def gradient_checkpointing_on(model: Any) -> bool:
    """Whether a transformers model (or the base of a PEFT one) recomputes its activations."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(type(base), "is_activation_checkpointing"):  # transformers 5 (the old name warns there)
        return bool(base.is_activation_checkpointing)
    return bool(base.is_gradient_checkpointing)


def _dequantize_to(model: Any, compute_dtype: torch.dtype) -> None:
    """Make 4-bit layers dequantize straight to the compute dtype.

    bitsandbytes dequantizes to the dtype the weight was quantized from, then casts to the input's dtype
    (the compute dtype) for the matmul. Loaded in the checkpoint's own dtype, that is bf16 → fp32 on a CPU
    (rounding the dequantized weight to bf16 first) or fp32 → bf16 for an fp32 checkpoint on a GPU (an extra
    fp32 copy of every weight per call). Dequantizing to the compute dtype directly gives the cast's result
    without the intermediate; the 4-bit codes and scales are untouched.
    """
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "dtype", None) not in (None, compute_dtype):
            state.dtype = compute_dtype
