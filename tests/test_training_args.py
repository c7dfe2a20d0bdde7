"""TrainingArguments are named for the installed transformers version (old and new names)."""

from __future__ import annotations

import inspect
import warnings

import pytest

from wronai.config import load_config
from wronai.hardware import plan_device
from wronai.training import training_arguments_kwargs

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

# transformers 4.x names vs 5.x names
OLD = {
    "eval_strategy",
    "evaluation_strategy",
    "warmup_ratio",
    "warmup_steps",
    "group_by_length",
    "gradient_checkpointing",
    "output_dir",
    "optim",
}
NEW = {"eval_strategy", "warmup_steps", "train_sampling_strategy", "use_cache", "output_dir", "optim",
       "activation_checkpointing", "gradient_checkpointing"}  # fmt: skip


def kwargs_for(accepted: set[str], has_eval: bool = True) -> dict:
    cfg = load_config(data=RAW)
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
    from transformers import TrainingArguments

    accepted = set(inspect.signature(TrainingArguments.__init__).parameters)
    kw = kwargs_for(accepted)
    assert set(kw) <= accepted
    assert kw["optim"] == "adamw_8bit"  # paged optimizer unpaged on this CPU machine
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated argument names
        TrainingArguments(**{**kw, "output_dir": "/tmp/wronai-args-test"})  # constructs without error


def test_no_eval_data_turns_evaluation_off():
    kw = kwargs_for(NEW, has_eval=False)
    assert kw["eval_strategy"] == "no"
