"""`TrainingArguments` for the installed transformers version, built from the config and the device plan.

transformers 5 renamed or removed several arguments the classic WronAI configs use (`evaluation_strategy`,
`warmup_ratio`, `group_by_length`, `logging_dir`); ``training_arguments_kwargs`` reads the installed
signature and passes each setting under the name this version takes. A setting the installed version does
not accept at all is an error naming it — never dropped.
"""

from __future__ import annotations

import inspect
from typing import Any

from wronai.config.sections.run import HardwareSection
from wronai.config.sections.training import TrainingSection
from wronai.errors import WronAIError
from wronai.runtime import sharding
from wronai.runtime.hardware import DevicePlan


def _accepted() -> set[str]:
    from transformers import TrainingArguments

    return set(inspect.signature(TrainingArguments.__init__).parameters)


def _direct_settings(
    training: TrainingSection, hardware: HardwareSection, plan: DevicePlan, has_eval: bool
) -> dict[str, Any]:
    """The settings whose name is the same in every supported transformers version."""
    return {
        "output_dir": training.output_dir,
        "num_train_epochs": training.num_train_epochs,
        "max_steps": training.max_steps,
        "per_device_train_batch_size": training.per_device_train_batch_size,
        "per_device_eval_batch_size": training.per_device_eval_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.lr_scheduler_type,
        "optim": plan.optimizer,
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "bf16": plan.bf16,
        "fp16": plan.fp16,
        "logging_strategy": training.logging_strategy,
        "logging_steps": training.logging_steps,
        "logging_first_step": training.logging_first_step,
        "save_strategy": training.save_strategy,
        "save_steps": training.save_steps,
        "eval_steps": training.eval_steps,
        "save_total_limit": training.save_total_limit,
        "load_best_model_at_end": training.load_best_model_at_end and has_eval,
        "metric_for_best_model": training.metric_for_best_model,
        "greater_is_better": training.greater_is_better,
        "seed": training.seed,
        "data_seed": training.data_seed,
        "dataloader_drop_last": training.dataloader_drop_last,
        "dataloader_num_workers": hardware.dataloader_num_workers,
        "dataloader_pin_memory": plan.pin_memory,
        "remove_unused_columns": False,  # WronAI's collators pick the columns themselves
        "label_names": ["labels"],
        "use_cpu": plan.device == "cpu",
        "disable_tqdm": False,
        "ignore_data_skip": training.ignore_data_skip,
    }


def _renamed_settings(training: TrainingSection, has_eval: bool, accepted: set[str]) -> dict[str, Any]:
    """The settings transformers 5 renamed, under the name the installed version takes."""
    kwargs: dict[str, Any] = {}
    eval_strategy = training.eval_strategy if has_eval else "no"
    kwargs["eval_strategy" if "eval_strategy" in accepted else "evaluation_strategy"] = eval_strategy
    # enabled by WronAI on the model (non-reentrant) before the adapter is added; the Trainer must not redo it
    # (transformers 5 renamed the argument; the old name is deprecated there)
    kwargs[
        "activation_checkpointing" if "activation_checkpointing" in accepted else "gradient_checkpointing"
    ] = False
    if not training.warmup_ratio:
        kwargs["warmup_steps"] = training.warmup_steps
    elif "warmup_ratio" in accepted:
        kwargs["warmup_ratio"] = training.warmup_ratio
    else:  # transformers 5: a float in [0, 1) is a ratio
        kwargs["warmup_steps"] = float(training.warmup_ratio)
    if training.group_by_length:  # transformers 5: train_sampling_strategy replaced group_by_length
        if "train_sampling_strategy" in accepted and "group_by_length" not in accepted:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    return kwargs


def training_arguments_kwargs(
    training: TrainingSection,
    hardware: HardwareSection,
    plan: DevicePlan,
    *,
    report_to: list[str],
    run_name: str,
    has_eval: bool,
    accepted: set[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``TrainingArguments``, named as the installed version expects."""
    accepted = accepted if accepted is not None else _accepted()
    kwargs = _direct_settings(training, hardware, plan, has_eval)
    kwargs.update(report_to=report_to, run_name=run_name)
    kwargs.update(_renamed_settings(training, has_eval, accepted))
    kwargs.update(sharding.training_kwargs(hardware, plan.device))  # ddp_backend, fsdp/fsdp_config, deepspeed
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:  # never dropped silently: the setting would not apply
        raise WronAIError(unaccepted_arguments_message(unknown))
    return kwargs


def unaccepted_arguments_message(keys: list[str]) -> str:
    """One line: which arguments the installed transformers refuses, and the fix."""
    from importlib import metadata

    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        version = "(version unknown)"
    names = ", ".join(f"`{k}`" for k in keys)
    return (
        f"TrainingArguments: the installed transformers {version} does not accept {names} — install the "
        "tested version (constraints.txt: `make install`, or pip install -c constraints.txt transformers)"
    )


def build_training_arguments(*args: Any, **kwargs: Any) -> Any:
    """``TrainingArguments`` from ``training_arguments_kwargs(*args, **kwargs)``."""
    from transformers import TrainingArguments

    return TrainingArguments(**training_arguments_kwargs(*args, **kwargs))
