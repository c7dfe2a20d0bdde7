"""The base model: a Hub id or a local directory (built when missing), loaded quantized as the device plan says.

Each builder of ``wronai.model`` takes only its own config group (plus the device plan), so it can be used
on its own::

    tok, new_ids = load_tokenizer(cfg.model, cfg.polish)                         # wronai.model.tokenizer
    model = load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan, tok)  # wronai.model.loading
    model = apply_lora(model, cfg.lora, new_ids, gradient_checkpointing=1)         # wronai.model.lora
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from wronai.config.sections.model import ModelConfig, QuantizationSection
from wronai.config.sections.run import HardwareSection
from wronai.errors import WronAIError
from wronai.model.embeddings import resize_embeddings
from wronai.runtime import sharding
from wronai.runtime.hardware import DevicePlan

logger = logging.getLogger(__name__)


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def looks_like_path(name: str) -> bool:
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
    if looks_like_path(model_cfg.name):
        raise WronAIError(
            f"model.name: local directory {model_cfg.name} does not exist — fix the path, or use a Hub id like org/name"
        )


def _is_offload_error(err: Exception) -> bool:
    """accelerate's refusal to place layers on the CPU or disk (device_map auto beyond max_memory)."""
    text = str(err)
    return "dispatched on the CPU or the disk" in text or "offload_folder" in text


def from_pretrained_error(what: str, name: str, err: Exception) -> WronAIError:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not _is_local(name):
        return WronAIError(
            f"model.name: cannot load the {what} for {name!r} from the Hugging Face Hub ({text}) — "
            "check the id and your network, or point model.name at a local directory"
        )
    return WronAIError(
        f"model.name: {name} does not hold a loadable {what} ({text}) — it needs config.json and weights/tokenizer files"
    )


def quantization_config(quant_cfg: QuantizationSection, plan: DevicePlan, hardware: HardwareSection) -> Any:
    """The ``BitsAndBytesConfig`` for the plan, or None when the plan loads unquantized."""
    if plan.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if plan.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=hardware.cpu_offload)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=plan.compute_dtype,
        bnb_4bit_quant_storage=sharding.quant_storage_dtype(hardware, plan.model_dtype),
    )


def _device_map(model_cfg: ModelConfig, plan: DevicePlan, hardware: HardwareSection) -> Any:
    """auto: "auto" in one CUDA process (accelerate spreads the layers), the rank's GPU under DDP, None under
    FSDP/ZeRO-3 (they place the weights), else the device (``sharding.device_map``)."""
    if model_cfg.device_map in (None, "auto"):
        return sharding.device_map(hardware, plan.device)
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
        with sharding.sharded_load_environment(hardware):  # FSDP: what accelerate's launcher would set
            model = AutoModelForCausalLM.from_pretrained(model_cfg.name, **kwargs)
    except (OSError, ValueError) as err:
        if _is_offload_error(err):
            raise WronAIError(
                f"the model does not fit on the GPU(s) within hardware.max_memory ({str(err).splitlines()[0]}) — "
                "raise hardware.max_memory, set hardware.cpu_offload: true (8-bit only), or use a smaller model"
            ) from None
        raise from_pretrained_error("model", model_cfg.name, err) from None
    model.config.use_cache = False  # the KV cache is useless in training and leaks across packed examples
    if getattr(model, "is_loaded_in_4bit", False):  # never bitsandbytes' packed CPU format unless checked
        from wronai.kernels.bnb import forbid_packed_format

        forbid_packed_format(model)
    if tokenizer is not None:
        resize_embeddings(model, len(tokenizer))
    return model
