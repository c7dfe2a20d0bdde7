"""Pre-flight checks: problems a config has that can be found without loading a model, one line each.

`wronai validate` prints them, and `wronai train` stops on them before anything is loaded or written.
"""

from __future__ import annotations

from pathlib import Path

from wronai.config.extensions import load_object
from wronai.config.schema import WronAIConfig
from wronai.data.sources import LOCAL_SUFFIXES, is_local, local_files
from wronai.errors import WronAIError
from wronai.model.loading import looks_like_path
from wronai.runtime import distributed, sharding
from wronai.runtime.hardware import plan_device
from wronai.train.monitoring import check_trackers


def preflight(config: WronAIConfig, *, in_this_process: bool = False) -> list[str]:
    """Paths, hooks, trackers and the distributed setup. ``in_this_process``: the problems of running the
    config in this very process too (`wronai train` without `--nproc`)."""
    problems = [*_model_problems(config), *_data_problems(config), *_hook_problems(config)]
    try:
        check_trackers(config.logging)
    except WronAIError as err:
        problems.append(str(err))
    device = plan_device(config.hardware, config.training, config.quantization, config.model).device
    problems += sharding.preflight_problems(config, device)  # FSDP/DeepSpeed need CUDA (+ deepspeed)
    if in_this_process and config.hardware.distributed == "fsdp" and not distributed.world().is_distributed:
        problems.append(
            "hardware.distributed: fsdp shards the model across processes and this is one — run with "
            "`wronai train CONFIG --nproc N` (N GPUs), or set hardware.distributed: none"
        )
    return problems


def _model_problems(config: WronAIConfig) -> list[str]:
    name = config.model.name
    if not Path(name).exists() and config.model.create_if_missing is None and looks_like_path(name):
        return [
            f"model.name: local directory {name} does not exist — fix the path, or use a Hub id like org/name"
        ]
    return []


def _data_problems(config: WronAIConfig) -> list[str]:
    problems: list[str] = []
    for item in config.data.dataset_names:
        if is_local(item):
            try:
                local_files(item)
            except WronAIError as err:
                problems.append(str(err))
        elif item.endswith(LOCAL_SUFFIXES) or item.startswith((".", "/", "~")):
            problems.append(
                f"data.dataset_name: file {item} not found — fix the path (relative paths resolve against the config file's directory, then the working directory)"
            )
    if config.polish.extend_vocab is not None:
        for item in config.polish.extend_vocab.data:
            if not Path(item).is_file():
                problems.append(f"polish.extend_vocab.data: file {item} not found — fix the path")
    return problems


def _hook_problems(config: WronAIConfig) -> list[str]:
    problems: list[str] = []
    hooks = [
        ("extensions.tokenizer_hook", config.extensions.tokenizer_hook),
        ("extensions.data_hook", config.extensions.data_hook),
    ]
    hooks += [(f"extensions.callbacks[{i}]", spec) for i, spec in enumerate(config.extensions.callbacks)]
    for key, spec in hooks:
        if not spec:
            continue
        try:
            obj = load_object(spec, key)
        except WronAIError as err:
            problems.append(str(err))
            continue
        is_callback_key = key.startswith("extensions.callbacks")
        if is_callback_key and isinstance(obj, type) and not _is_trainer_callback(obj):
            problems.append(f"{key}: {spec} is not a transformers.TrainerCallback — subclass TrainerCallback")
    return problems


def _is_trainer_callback(cls: type) -> bool:
    from transformers import TrainerCallback  # only when a callback class is configured: it loads torch

    return issubclass(cls, TrainerCallback)
