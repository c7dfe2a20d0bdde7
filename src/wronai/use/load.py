"""Loading a finished run for inference: its tokenizer, the base model (4-bit when it trained so) and the adapter."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wronai.config.sections.model import ModelConfig
from wronai.errors import WronAIError
from wronai.rundir.locate import RunDir, locate_run
from wronai.use.prompts import PromptFormat

logger = logging.getLogger(__name__)

__all__ = ["LoadedRun", "load_run", "load_tokenizer"]


@dataclass
class LoadedRun:
    """A run ready to generate: its directory, the model (base + adapter), tokenizer and prompt format."""

    dir: RunDir
    model: Any
    tokenizer: Any
    prompt: PromptFormat
    quantization: str  # e.g. 4bit-nf4 or none

    @property
    def path(self) -> Path:
        return self.dir.path


def load_tokenizer(run: RunDir) -> Any:
    from transformers import AutoTokenizer

    from wronai.model.tokenizer import set_pad_token

    trust = bool(run.config and run.config.model.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer_dir), trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise WronAIError(
            f"{run.tokenizer_dir}: cannot load the tokenizer ({str(err).splitlines()[0]}) — is the run complete?"
        ) from None
    set_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # generation pads on the left so every row ends at its prompt
    return tokenizer


def load_run(
    path: str | Path,
    *,
    base_model: str | None = None,
    quantize: bool = True,
    device: str | None = None,
    dtype: Any = None,
) -> LoadedRun:
    """Load a run for inference: base (4-bit when the run was 4-bit and bitsandbytes works) + adapter.

    ``quantize=False`` loads the base in full precision; ``dtype`` (a torch dtype) forces the weights' dtype.
    """
    from wronai.model.embeddings import resize_embeddings

    run = locate_run(path)
    tokenizer = load_tokenizer(run)
    name = base_model or run.base_name
    model_cfg, quant, hardware, plan = _load_settings(
        run, name, quantize=quantize, device=device, dtype=dtype
    )
    model = _load_base(model_cfg, quant, hardware, plan, run)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        resize_embeddings(model, len(tokenizer))  # tokens added in training: rows restored by the adapter
    model = _with_adapter(model, run, plan)
    is_quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    quantized = plan.quantization if is_quantized else "none"
    logger.info(
        "loaded %s%s (%s, weights %s)",
        name,
        " + adapter" if run.is_adapter else "",
        quantized,
        plan.model_dtype,
    )
    cfg = run.config
    return LoadedRun(
        run,
        model,
        tokenizer,
        PromptFormat.for_run(run.data_format, cfg.data if cfg else None, tokenizer),
        quantized,
    )


def _load_settings(
    run: RunDir, name: str, *, quantize: bool, device: str | None, dtype: Any
) -> tuple[ModelConfig, Any, Any, Any]:
    """(model, quantization, hardware sections, device plan) to load ``run`` with: its saved config, for inference."""
    from wronai.config.sections.model import QuantizationSection
    from wronai.config.sections.run import HardwareSection
    from wronai.config.sections.training import TrainingSection
    from wronai.runtime.hardware import plan_device

    cfg = run.config
    model_cfg = (cfg.model if cfg else ModelConfig(name=name)).model_copy(
        update={"name": name, "create_if_missing": None}
    )
    if not run.is_adapter:
        model_cfg = model_cfg.model_copy(update={"name": str(run.path)})
    hardware = (cfg.hardware if cfg else HardwareSection()).model_copy(
        update={"device": device} if device else {}
    )
    quant = (
        cfg.quantization if (cfg and run.is_adapter and quantize) else QuantizationSection(load_in_4bit=False)
    )
    plan = plan_device(hardware, cfg.training if cfg else TrainingSection(), quant, model_cfg)
    if dtype is not None:
        plan = dataclasses.replace(plan, model_dtype=dtype, compute_dtype=dtype)
    return model_cfg, quant, hardware, plan


def _with_adapter(model: Any, run: RunDir, plan: Any) -> Any:
    """The base with the run's adapter on top (a LoRA run), switched to inference mode."""
    if run.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run.path))
    model.config.use_cache = True
    model.eval()
    if getattr(model, "is_loaded_in_4bit", False) and plan.device == "cpu":  # inference only: checked packing
        from wronai.kernels.bnb import allow_checked_packed_format

        logger.info("%s", allow_checked_packed_format(model))
    return model


def _load_base(model_cfg: ModelConfig, quant: Any, hardware: Any, plan: Any, run: RunDir) -> Any:
    from wronai.model import loading

    where = f" (the base model of {run.path}; pass --base-model PATH if it moved)" if run.is_adapter else ""
    try:
        return loading.load_base_model(model_cfg, quant, hardware, plan)
    except WronAIError as err:
        raise WronAIError(f"{err}{where}") from None
    except (ImportError, RuntimeError) as err:
        if plan.quantization == "none":
            raise
        logger.warning(
            "4-bit loading failed (%s) — loading the base in full precision", str(err).splitlines()[0]
        )
        return loading.load_base_model(
            model_cfg, quant, hardware, dataclasses.replace(plan, quantization="none")
        )
