"""Model preparation: tokenizer, base model (Hub id or local dir), 4-bit/8-bit quantization, LoRA.

Each builder takes only its own config group (plus the device plan) so it can be used on its own:

    tokenizer, new_ids = load_tokenizer(cfg.model, cfg.polish)
    model = load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan, tokenizer)
    model = apply_lora(model, cfg.lora, new_ids, gradient_checkpointing=True)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from wronai.config.schema import HardwareSection, LoraSection, ModelConfig, PolishSection, QuantizationSection
from wronai.errors import WronAIError
from wronai.runtime import distributed
from wronai.runtime.hardware import DevicePlan

logger = logging.getLogger(__name__)


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def ensure_model_available(model_cfg: ModelConfig) -> None:
    """Build the configured local model if asked to; fail clearly when a local path does not exist."""
    if _is_local(model_cfg.name):
        return
    if model_cfg.create_if_missing is not None:
        from wronai.model.tiny import build_tiny_model

        logger.info("model.name %s does not exist — building it (model.create_if_missing)", model_cfg.name)
        build_tiny_model(model_cfg.create_if_missing, model_cfg.name)
        return
    if _looks_like_path(model_cfg.name):
        raise WronAIError(
            f"model.name: local directory {model_cfg.name} does not exist — fix the path, or use a Hub id like org/name"
        )


def _is_offload_error(err: Exception) -> bool:
    """accelerate's refusal to place layers on the CPU or disk (device_map auto beyond max_memory)."""
    text = str(err)
    return "dispatched on the CPU or the disk" in text or "offload_folder" in text


def _from_pretrained_error(what: str, name: str, err: Exception) -> WronAIError:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not _is_local(name):
        return WronAIError(
            f"model.name: cannot load the {what} for {name!r} from the Hugging Face Hub ({text}) — "
            "check the id and your network, or point model.name at a local directory"
        )
    return WronAIError(
        f"model.name: {name} does not hold a loadable {what} ({text}) — it needs config.json and weights/tokenizer files"
    )


def load_tokenizer(model_cfg: ModelConfig, polish_cfg: PolishSection) -> tuple[Any, list[int]]:
    """Load the tokenizer, set a pad token, add Polish special tokens. Returns (tokenizer, ids of added tokens)."""
    from transformers import AutoTokenizer

    ensure_model_available(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise _from_pretrained_error("tokenizer", model_cfg.name, err) from None
    added: list[int] = []
    if polish_cfg.add_polish_tokens:
        fresh = [t for t in polish_cfg.special_tokens if t not in tokenizer.get_vocab()]
        if fresh:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": fresh}, replace_extra_special_tokens=False
            )
            added = [int(tokenizer.convert_tokens_to_ids(token)) for token in fresh]  # type: ignore[arg-type]  # one token → one id
            logger.info("added %d Polish special tokens: %s", len(fresh), " ".join(fresh))
    set_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer, added


def set_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token without hurting the EOS label.

    Prefers an existing unknown token; falls back to EOS. WronAI's collators pad labels with -100 by
    position, never by token id, so even pad == eos keeps the EOS at the end of each answer trained.
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
        logger.info("tokenizer has no pad token — using %s (unk) for padding", tokenizer.unk_token)
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info(
            "tokenizer has no pad token — using EOS for padding (labels are masked by position, EOS still trained)"
        )
    else:
        raise WronAIError(
            "the tokenizer has no pad, unk or eos token — set one with extensions.tokenizer_hook"
        )


def quantization_config(
    quant_cfg: QuantizationSection, plan: DevicePlan, hardware: HardwareSection | None = None
):
    """The ``BitsAndBytesConfig`` for the plan, or None when the plan loads unquantized."""
    if plan.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if plan.quantization == "8bit":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=bool(hardware and hardware.cpu_offload)
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=plan.compute_dtype,
        bnb_4bit_quant_storage=distributed.quant_storage_dtype(hardware, plan.model_dtype)
        if hardware
        else torch.uint8,
    )


def _device_map(model_cfg: ModelConfig, plan: DevicePlan, hardware: HardwareSection | None = None) -> Any:
    """auto: "auto" in one CUDA process (accelerate spreads the layers), the rank's GPU under DDP, None under
    FSDP/ZeRO-3 (they place the weights), else the device (``distributed.device_map``)."""
    if model_cfg.device_map in (None, "auto"):
        return distributed.device_map(hardware or HardwareSection(), plan.device)
    if isinstance(model_cfg.device_map, str):
        return {"": model_cfg.device_map}
    return model_cfg.device_map


def _max_memory(hardware: HardwareSection, plan: DevicePlan, device_map: Any = "auto") -> dict | None:
    """accelerate's ``max_memory`` for ``device_map="auto"`` on CUDA: ``hardware.max_memory`` per GPU, and the
    CPU only with ``hardware.cpu_offload`` (then also when max_memory is unset: accelerate's default)."""
    if plan.device != "cuda":
        return None
    if device_map != "auto":  # one GPU per rank (DDP), FSDP/ZeRO-3 or an explicit map: nothing to plan
        if hardware.max_memory is not None or hardware.cpu_offload:
            logger.warning(
                "hardware.max_memory / hardware.cpu_offload apply to one process with model.device_map: auto — "
                "ignored here (device_map %s)",
                device_map,
            )
        return None
    if hardware.cpu_offload and plan.quantization.startswith("4bit"):
        raise WronAIError(
            "hardware.cpu_offload: 4-bit (QLoRA) layers cannot be offloaded to the CPU — set cpu_offload: false "
            "(cap the GPUs with hardware.max_memory), or use quantization.load_in_8bit with cpu_offload"
        )
    gpus = range(torch.cuda.device_count())
    if hardware.max_memory is None:
        if hardware.cpu_offload:
            return None  # accelerate's default: every GPU's free memory, then the CPU's
        return {i: torch.cuda.mem_get_info(i)[0] for i in gpus}  # the GPUs only, not accelerate's CPU share
    if isinstance(hardware.max_memory, str):
        caps: dict[Any, Any] = dict.fromkeys(gpus, hardware.max_memory)
    else:
        caps = {int(k) if k.isdigit() else k: v for k, v in hardware.max_memory.items()}
    if "cpu" in caps and not hardware.cpu_offload:
        raise WronAIError(
            "hardware.max_memory: a cpu entry places layers on the CPU — set hardware.cpu_offload: true "
            "(8-bit only), or remove the cpu entry"
        )
    if hardware.cpu_offload and "cpu" not in caps:
        import psutil

        caps["cpu"] = psutil.virtual_memory().available  # what accelerate allows the CPU by default
    return caps


def load_base_model(
    model_cfg: ModelConfig,
    quant_cfg: QuantizationSection,
    hardware: HardwareSection,
    plan: DevicePlan,
    tokenizer: Any = None,
):
    """Load the (optionally quantized) base model and size its embeddings to the tokenizer."""
    from transformers import AutoModelForCausalLM

    ensure_model_available(model_cfg)
    kwargs: dict[str, Any] = {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "dtype": plan.model_dtype,
        "attn_implementation": plan.attn_implementation,
        "device_map": _device_map(model_cfg, plan, hardware),
    }
    bnb = quantization_config(quant_cfg, plan, hardware)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if (
        plan.keep_embeddings
    ):  # non-quantized weights in the checkpoint's dtype: no float32 copy (wronai.model.kbit)
        kwargs["dtype"] = "auto"
    max_memory = _max_memory(hardware, plan, kwargs["device_map"])
    if max_memory:
        kwargs["max_memory"] = max_memory
    try:
        with distributed.sharded_load_environment(hardware):  # FSDP: what accelerate's launcher would set
            model = AutoModelForCausalLM.from_pretrained(model_cfg.name, **kwargs)
    except (OSError, ValueError) as err:
        if _is_offload_error(err):
            raise WronAIError(
                f"the model does not fit on the GPU(s) within hardware.max_memory ({str(err).splitlines()[0]}) — "
                "raise hardware.max_memory, set hardware.cpu_offload: true (8-bit only), or use a smaller model"
            ) from None
        raise _from_pretrained_error("model", model_cfg.name, err) from None
    model.config.use_cache = False  # the KV cache is useless in training and leaks across packed examples
    if getattr(model, "is_loaded_in_4bit", False):  # never bitsandbytes' packed CPU format unless checked
        from wronai.kernels.bnb import forbid_packed_format

        forbid_packed_format(model)
    if tokenizer is not None:
        resize_embeddings(model, len(tokenizer))
    return model


def resize_embeddings(model: Any, vocab_size: int) -> list[int]:
    """Grow the embedding matrices to ``vocab_size``; new rows start at the mean of the old ones."""
    from wronai.runtime.distributed import full_shape, gathered_for_update

    old = full_shape(model.get_input_embeddings().weight)[0]  # ZeRO-3 keeps only a partition on each rank
    if vocab_size <= old:
        return []
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None and full_shape(emb.weight)[0] == vocab_size:
                with gathered_for_update([emb.weight]):
                    emb.weight[old:] = emb.weight[:old].float().mean(dim=0).to(emb.weight.dtype)
    logger.info("resized embeddings from %d to %d rows (new rows = mean of existing)", old, vocab_size)
    return list(range(old, vocab_size))


def apply_lora(
    model: Any,
    lora_cfg: LoraSection,
    new_token_ids: list[int] | None = None,
    gradient_checkpointing: int = 1,
    keep_embeddings: bool = True,
    dequantize_chunk_bytes: int = 0,
    fused_lora: bool = False,
    autocast: torch.dtype | None = None,
):
    """k-bit preparation (when quantized), gradient checkpointing and the LoRA adapter.

    ``gradient_checkpointing``: recompute every N-th decoder layer (True = 1 = all, False = 0 = none).

    ``keep_embeddings`` (``DevicePlan.keep_embeddings``): a 4-bit model keeps frozen 16-bit embeddings/head
    as they are (``wronai.model.kbit``);
    embeddings that are trained (modules_to_save, new token rows) are cast to float32 in any case.
    ``dequantize_chunk_bytes`` (``DevicePlan.dequantize_chunk_bytes``): 4-bit layers whose dequantized weight
    is larger dequantize in row slices of this size (``wronai.kernels.row_slices``); 0 = whole weights.
    ``fused_lora`` (``DevicePlan.fused_lora``): LoRA layers compute base and adapter in one step
    (``wronai.kernels.fused_lora``), checked at start against PEFT's under ``autocast`` (``DevicePlan.autocast_dtype``).
    """
    from peft import LoraConfig, get_peft_model

    from wronai.model.kbit import enable_gradient_checkpointing, prepare_kbit_model

    modules_to_save = list(lora_cfg.modules_to_save) or None
    four_bit = bool(getattr(model, "is_loaded_in_4bit", False))
    if four_bit or getattr(model, "is_loaded_in_8bit", False):
        trained = bool(new_token_ids) or bool(
            set(modules_to_save or []) & set(_embedding_module_names(model))
        )
        model = prepare_kbit_model(
            model,
            _compute_dtype(model),
            gradient_checkpointing=gradient_checkpointing,
            keep_embeddings=keep_embeddings and not trained and four_bit,
        )
        if dequantize_chunk_bytes and four_bit:
            from wronai.kernels.bnb import chunk_4bit_layers

            chunk_4bit_layers(model, dequantize_chunk_bytes)
    elif gradient_checkpointing:
        enable_gradient_checkpointing(model, int(gradient_checkpointing))
        model.enable_input_require_grads()
    token_indices = None
    if new_token_ids:
        names = _embedding_module_names(model)
        token_indices = {name: list(new_token_ids) for name in names if name not in (modules_to_save or [])}
    config = LoraConfig(
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
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise WronAIError(
            f"lora.target_modules: {err} — list module names that exist in this model, or use all-linear"
        ) from None
    if fused_lora:
        from wronai.kernels.fused_lora import fuse_lora_layers

        fuse_lora_layers(peft_model, autocast=autocast)
    from wronai.runtime.heap import release_free_memory

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


def _compute_dtype(model: Any) -> torch.dtype:
    """The dtype the 4-bit layers compute in (bitsandbytes' compute_dtype), float32 if none says."""
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return torch.float32


def _embedding_module_names(model: Any) -> list[str]:
    """Names (last path component) of the input embedding and, if untied, the output head."""
    names = []
    input_emb = model.get_input_embeddings()
    output_emb = model.get_output_embeddings()
    for module_name, module in model.named_modules():
        if module is input_emb or (
            output_emb is not None and module is output_emb and output_emb.weight is not input_emb.weight
        ):
            names.append(module_name.split(".")[-1])
    return names
