"""Sharded training: which strategy a config asks for, and what FSDP/DeepSpeed get from it.

``hardware.distributed`` (or the accelerate/DeepSpeed file ``hardware.distributed_config``) names the
strategy; this module maps it onto ``TrainingArguments`` (``fsdp``/``fsdp_config``, ``deepspeed``), says
before anything loads why it cannot run here (``preflight_problems``), and prepares the model's loading for
it (the ZeRO-3 ``HfDeepSpeedConfig``, FSDP's loading environment, the 4-bit storage dtype, the device map).

On CPU (gloo): DeepSpeed ZeRO-2/ZeRO-3 run (DeepSpeed's CPU accelerator); FSDP does not — accelerate
enables its FSDP plugin only for GPU device types, and with ``use_cpu`` the Trainer would silently train plain
DDP, so ``preflight_problems`` refuses it. See docs/distributed.md for what was executed where.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wronai.errors import WronAIError
from wronai.runtime.distributed import backend_for, world
from wronai.runtime.environ import environment

logger = logging.getLogger(__name__)

STRATEGIES = ("none", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
SHARDED = ("fsdp", "deepspeed_zero3")  # strategies that split the frozen base weights across GPUs


def strategy(hardware: Any) -> str:
    """The effective strategy: hardware.distributed, or what hardware.distributed_config describes."""
    if hardware.distributed != "none" or not hardware.distributed_config:
        return hardware.distributed
    return _strategy_from_file(Path(hardware.distributed_config))


def _read_config_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise WronAIError(
            f"hardware.distributed_config: cannot read {path} ({err.strerror}) — fix the path"
        ) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise WronAIError(
            f"hardware.distributed_config: {path} is not valid JSON/YAML ({str(err).splitlines()[0]})"
        ) from None
    if not isinstance(data, dict):
        raise WronAIError(
            f"hardware.distributed_config: {path} must hold a mapping — an accelerate config or a DeepSpeed JSON"
        )
    return data


def _strategy_from_file(path: Path) -> str:
    data = _read_config_file(path)
    if "zero_optimization" in data:  # a DeepSpeed JSON
        stage = int(data["zero_optimization"].get("stage", 2))
        return "deepspeed_zero3" if stage == 3 else "deepspeed_zero2"
    kind = str(data.get("distributed_type", "")).upper()
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        stage = int((data.get("deepspeed_config") or {}).get("zero_stage", 2))
        return "deepspeed_zero3" if stage == 3 else "deepspeed_zero2"
    if kind in ("MULTI_GPU", "MULTI_CPU", "NO", ""):
        return "ddp"
    raise WronAIError(
        f"hardware.distributed_config: distributed_type {kind} in {path} is not supported — use FSDP, DEEPSPEED or MULTI_GPU"
    )


def preflight_problems(config: Any, device: str) -> list[str]:
    """One line per reason the configured strategy cannot run on this machine (before anything loads)."""
    hw = config.hardware
    if hw.distributed_config and not Path(hw.distributed_config).is_file():
        return [f"hardware.distributed_config: file {hw.distributed_config} not found — fix the path"]
    try:
        name = strategy(hw)
    except WronAIError as err:
        return [str(err)]
    problems = []
    if name == "fsdp" and device != "cuda":
        problems.append(
            f"hardware.distributed=fsdp needs CUDA GPUs (this machine runs on {device}; accelerate turns FSDP on only "
            "for GPUs, so the Trainer would silently train plain DDP) — use distributed: ddp, deepspeed_zero3 "
            "(shards on CPU with gloo) or none"
        )
    if name.startswith("deepspeed") and device not in ("cuda", "cpu"):
        problems.append(
            f"hardware.distributed={name} runs on CUDA GPUs or the CPU (this machine runs on {device}) — set "
            "hardware.device: cpu, or use distributed: none"
        )
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        problems.append(
            f"hardware.distributed={name} needs the deepspeed package — pip install 'wronai[deepspeed]' "
            "(or pip install deepspeed), or use distributed: ddp"
        )
    if name in SHARDED and config.quantization.load_in_8bit:
        problems.append(
            f"hardware.distributed={name} cannot shard 8-bit weights — use quantization.load_in_4bit (QLoRA) or ddp"
        )
    optim = config.training.optim
    if name == "fsdp" and optim.startswith("paged_"):
        problems.append(
            f"training.optim={optim} does not work with hardware.distributed=fsdp (bitsandbytes' paged optimizers "
            "do not take FSDP's sharded parameters) — set training.optim: adamw_torch (FSDP shards its states)"
        )
    return problems


def fsdp_config() -> dict[str, Any]:
    """FSDP2 for PEFT: wrap each decoder layer, full adapter state dict on save, low-RAM loading on rank 0."""
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
    }


def deepspeed_config(stage: int) -> dict[str, Any]:
    """A DeepSpeed ZeRO config; "auto" values are filled in by the Trainer from TrainingArguments."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": "auto",
                     "stage3_param_persistence_threshold": "auto", "reduce_bucket_size": "auto"})  # fmt: skip
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
    }


def training_kwargs(hardware: Any, device: str) -> dict[str, Any]:
    """TrainingArguments entries for the strategy (names as in transformers 5.x).

    ``ddp_backend`` only when launched with several processes: in one process accelerate would take a
    backend as a request to join a process group that does not exist (configs/examples/ddp.yaml trained
    without ``--nproc`` is then a plain one-process run).
    """
    name = strategy(hardware)
    kwargs: dict[str, Any] = {}
    if world().is_distributed:
        kwargs["ddp_backend"] = backend_for(device)
        kwargs["ddp_find_unused_parameters"] = False  # LoRA uses every adapter; the search costs a pass
    if name == "fsdp":
        kwargs["fsdp"] = True  # what to shard is in fsdp_config (the string form is deprecated)
        kwargs["fsdp_config"] = fsdp_settings(hardware)
    elif name.startswith("deepspeed"):
        path = hardware.distributed_config
        if path and "zero_optimization" in _read_config_file(Path(path)):
            kwargs["deepspeed"] = str(path)
        else:
            kwargs["deepspeed"] = deepspeed_config(3 if name == "deepspeed_zero3" else 2)
    return kwargs


def _deepspeed_dict(hardware: Any, name: str) -> dict[str, Any]:
    path = hardware.distributed_config
    if path:
        data = _read_config_file(Path(path))
        if "zero_optimization" in data:
            return data
    return deepspeed_config(3 if name == "deepspeed_zero3" else 2)


def load_time_deepspeed_config(hardware: Any, plan: Any, training: Any) -> dict[str, Any]:
    """The ZeRO config with its "auto" values resolved, for ``deepspeed.zero.Init`` while the model loads.

    The Trainer fills "auto" from TrainingArguments only later; zero.Init needs concrete values now: the
    weights dtype (it casts every parameter to the fp16/bf16 setting) and the batch sizes DeepSpeed validates.
    The optimizer/scheduler sections do not matter for loading and are dropped.
    """
    import copy

    import torch

    cfg = copy.deepcopy(_deepspeed_dict(hardware, strategy(hardware)))
    for key in ("optimizer", "scheduler", "train_batch_size"):  # train_batch_size: DeepSpeed derives it
        cfg.pop(key, None)
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        section = cfg.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = plan.model_dtype == dtype
    auto = {
        "train_micro_batch_size_per_gpu": training.per_device_train_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "gradient_clipping": training.max_grad_norm,
    }
    for key, value in auto.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    return _drop_auto(cfg)


def _drop_auto(value: Any) -> Any:
    """Remove the remaining "auto" entries (DeepSpeed's defaults apply)."""
    if isinstance(value, dict):
        return {k: _drop_auto(v) for k, v in value.items() if v != "auto"}
    return value


def prepare_for_sharded_load(hardware: Any, plan: Any, training: Any) -> Any:
    """Before ``from_pretrained`` under ZeRO-3: make transformers load each weight straight into its partition.

    Returns a ``transformers.integrations.HfDeepSpeedConfig`` — transformers keeps only a weak reference, so
    the caller must hold the object until the Trainer exists (its TrainingArguments register their own). While
    it is alive, ``from_pretrained`` builds the model inside ``deepspeed.zero.Init`` and every rank keeps 1/N
    of each weight. None when the strategy is not ZeRO-3, deepspeed is not installed (preflight says so), or
    the model is quantized (transformers loads bitsandbytes weights whole on each rank; DeepSpeed partitions
    them when training starts).
    """
    if strategy(hardware) != "deepspeed_zero3" or importlib.util.find_spec("deepspeed") is None:
        return None
    if plan.quantization != "none":
        logger.info(
            "ZeRO-3 with %s weights: each rank loads the whole quantized model; DeepSpeed partitions it when training starts",
            plan.quantization,
        )
        return None
    from transformers.integrations import HfDeepSpeedConfig

    logger.info("ZeRO-3: loading the model partitioned across ranks (deepspeed.zero.Init)")
    return HfDeepSpeedConfig(load_time_deepspeed_config(hardware, plan, training))


def full_shape(param: Any) -> Any:
    """A parameter's real shape, also when ZeRO-3 keeps only this rank's partition (``param.shape`` is then (0,))."""
    return getattr(param, "ds_shape", None) or param.shape


@contextlib.contextmanager
def gathered_for_update(params: list[Any]) -> Iterator[None]:
    """Inside the block ZeRO-3-partitioned ``params`` are whole; rank 0's in-place edits are re-partitioned on
    exit (``deepspeed.zero.GatheredParameters``). A no-op for ordinary parameters."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


def _file_fsdp_config(hardware: Any) -> dict[str, Any] | None:
    if not hardware.distributed_config:
        return None
    data = _read_config_file(Path(hardware.distributed_config))
    section = data.get("fsdp_config")
    return {**fsdp_config(), **section} if isinstance(section, dict) else None


def fsdp_settings(hardware: Any) -> dict[str, Any]:
    """The ``fsdp_config`` the Trainer gets: an accelerate config's ``fsdp_config`` over WronAI's defaults."""
    return _file_fsdp_config(hardware) or fsdp_config()


def _setting(config: dict[str, Any], key: str, default: Any) -> Any:
    """An fsdp_config entry under its name or accelerate's ``fsdp_``-prefixed one (which transformers also reads)."""
    return config.get(f"fsdp_{key}", config.get(key, default))


FSDP_LOAD_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}


@contextlib.contextmanager
def sharded_load_environment(hardware: Any) -> Iterator[None]:
    """Around ``from_pretrained`` under FSDP with ``cpu_ram_efficient_loading``: the environment accelerate's
    launcher would have set for the whole process (``ACCELERATE_USE_FSDP``, ``FSDP_CPU_RAM_EFFICIENT_LOADING``).

    torchrun (``wronai train --nproc``) sets neither, so transformers would not know the model is loaded for
    FSDP; with them it loads as under ``accelerate launch`` (ranks other than each node's first skip
    initialising weights the checkpoint lacks — accelerate broadcasts rank 0's when it shards a 16-bit
    model). The variables hold only inside the block: the previous values (or their absence) are restored
    on exit, also on an error. A no-op for every other strategy.

    What it cannot change (transformers 5.24, accelerate 1.15): a bitsandbytes 4-bit model is still read
    whole on every rank — accelerate's FSDP2 preparation skips its rank-0-only path for ``Params4bit``
    weights — so each GPU holds the whole 4-bit model until the Trainer shards it; ``wronai plan`` counts
    that load-time peak (``planning.estimate``: ``load_peak``).
    """
    if strategy(hardware) != "fsdp" or not _truthy(
        _setting(fsdp_settings(hardware), "cpu_ram_efficient_loading", False)
    ):
        yield
        return
    with environment(FSDP_LOAD_ENV):
        yield


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def quant_storage_dtype(hardware: Any, model_dtype: Any) -> Any:
    """bnb_4bit_quant_storage: the model dtype when FSDP/ZeRO-3 must shard the 4-bit weights, else uint8."""
    import torch

    return model_dtype if strategy(hardware) in SHARDED else torch.uint8


def device_map(hardware: Any, device: str) -> Any:
    """Where the base model loads for ``model.device_map: auto``.

    FSDP/ZeRO-3: None (they place the weights). CUDA launched with several processes (DDP): the whole model
    on the rank's own GPU. CUDA in one process: "auto" — accelerate spreads the layers over the visible GPUs
    (and the CPU with ``hardware.cpu_offload``) within ``hardware.max_memory``. Elsewhere: the device.
    """
    if strategy(hardware) in SHARDED:
        return None
    if device == "cuda":
        w = world()
        return {"": w.local_rank} if w.is_distributed else "auto"
    return {"": device}
