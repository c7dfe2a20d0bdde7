"""TrainingArguments are named for the installed transformers version (old and new names)."""

from __future__ import annotations

import inspect
import warnings

import pytest
from transformers import TrainingArguments

from wronai.config import load_config
from wronai.errors import WronAIError
from wronai.runtime.hardware import plan_device
from wronai.train.arguments import training_arguments_kwargs

RAW = {
    "model": {"name": "org/m"},
    "data": {"dataset_name": "org/d"},
    "training": {
        "warmup_ratio": 0.1,
        "group_by_length": True,
        "eval_strategy": "steps",
        "optim": "paged_adamw_8bit",
    },
}

# the installed signature turned into a transformers 4.x one and a 5.x one (every other argument as installed)
INSTALLED = set(inspect.signature(TrainingArguments.__init__).parameters)
V4_ONLY = {"evaluation_strategy", "warmup_ratio", "group_by_length"}
V5_ONLY = {"train_sampling_strategy", "activation_checkpointing", "use_cache"}
OLD = (INSTALLED - V5_ONLY) | V4_ONLY | {"eval_strategy", "gradient_checkpointing"}
NEW = (INSTALLED - V4_ONLY) | V5_ONLY | {"eval_strategy", "gradient_checkpointing"}


def kwargs_for(accepted: set[str] | None, has_eval: bool = True, **training) -> dict:
    cfg = load_config(data={**RAW, "training": {**RAW["training"], **training}})
    plan = plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    return training_arguments_kwargs(
        cfg.training,
        cfg.hardware,
        plan,
        report_to=["none"],
        run_name="r",
        has_eval=has_eval,
        accepted=accepted,
    )


def test_transformers_5_names():
    kw = kwargs_for(NEW)
    assert kw["warmup_steps"] == pytest.approx(0.1) and isinstance(kw["warmup_steps"], float)  # a ratio in v5
    assert kw["train_sampling_strategy"] == "group_by_length"
    assert kw["eval_strategy"] == "steps"
    assert kw["use_cache"] is False
    assert "warmup_ratio" not in kw and "group_by_length" not in kw and "evaluation_strategy" not in kw
    # checkpointing is WronAI's (on the model); the Trainer's is off, under v5's name (the old one warns)
    assert kw["activation_checkpointing"] is False and "gradient_checkpointing" not in kw


def test_transformers_4_names():
    kw = kwargs_for(OLD)
    assert kw["warmup_ratio"] == pytest.approx(0.1)
    assert kw["group_by_length"] is True
    assert "train_sampling_strategy" not in kw
    assert kw["gradient_checkpointing"] is False


def test_installed_version_accepts_every_argument_we_pass():
    kw = kwargs_for(None)  # the installed signature: an argument it lacks raises instead of being dropped
    assert kw["optim"] == "adamw_8bit"  # paged optimizer unpaged on this CPU machine
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated argument names
        TrainingArguments(**{**kw, "output_dir": "/tmp/wronai-args-test"})  # constructs without error


def test_an_argument_the_installed_version_lacks_is_an_error_naming_it():
    with pytest.raises(WronAIError) as info:
        kwargs_for(NEW - {"ignore_data_skip"})
    message = str(info.value)
    assert (
        "`ignore_data_skip`" in message
        and "installed transformers" in message
        and "does not accept" in message
    )
    assert "constraints.txt" in message  # the fix
    with pytest.raises(WronAIError, match="`group_by_length`"):  # neither the old nor the new name exists
        kwargs_for(NEW - {"train_sampling_strategy"})
    assert "group_by_length" not in kwargs_for(NEW - {"train_sampling_strategy"}, group_by_length=False)


def test_no_eval_data_turns_evaluation_off():
    kw = kwargs_for(NEW, has_eval=False)
    assert kw["eval_strategy"] == "no"


def test_logging_strategy_written_as_yaml_no_reaches_the_trainer(tmp_path):
    """`logging_strategy: no` (YAML's false) is passed on as transformers' "no"."""
    from wronai.config import load_config

    cfg = load_config(data={"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"},
                            "training": {"output_dir": str(tmp_path), "logging_strategy": False}})  # fmt: skip
    plan = plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    kwargs = training_arguments_kwargs(
        cfg.training, cfg.hardware, plan, report_to=[], run_name="r", has_eval=False
    )
    assert kwargs["logging_strategy"] == "no"
