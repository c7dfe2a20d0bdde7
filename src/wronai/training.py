"""The training loop: `TrainingArguments` for the installed transformers version, and the `Trainer`.

transformers 5 renamed or removed several arguments the classic WronAI configs use (`evaluation_strategy`,
`warmup_ratio`, `group_by_length`, `logging_dir`); ``build_training_arguments`` reads the installed
signature and passes each setting under the name this version takes.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from pathlib import Path
from typing import Any

from wronai.config.schema import HardwareSection, TrainingSection
from wronai.hardware import DevicePlan

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _accepted() -> set[str]:
    from transformers import TrainingArguments

    return set(inspect.signature(TrainingArguments.__init__).parameters)


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
    eval_strategy = training.eval_strategy if has_eval else "no"
    kwargs: dict[str, Any] = {
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
        "report_to": report_to,
        "run_name": run_name,
        "use_cpu": plan.device == "cpu",
        # enabled by WronAI on the model (non-reentrant) before the adapter is added; the Trainer must not redo it
        "gradient_checkpointing": False,
        "disable_tqdm": False,
    }
    kwargs["eval_strategy" if "eval_strategy" in accepted else "evaluation_strategy"] = eval_strategy
    if training.warmup_ratio:
        if "warmup_ratio" in accepted:
            kwargs["warmup_ratio"] = training.warmup_ratio
        else:
            kwargs["warmup_steps"] = float(training.warmup_ratio)  # transformers 5: a float in [0, 1) is a ratio
    else:
        kwargs["warmup_steps"] = training.warmup_steps
    if training.group_by_length:
        if "group_by_length" in accepted:
            kwargs["group_by_length"] = True
        elif "train_sampling_strategy" in accepted:
            kwargs["train_sampling_strategy"] = "group_by_length"
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    return {k: v for k, v in kwargs.items() if k in accepted}


def build_training_arguments(
    training: TrainingSection, hardware: HardwareSection, plan: DevicePlan, *, report_to: list[str], run_name: str, has_eval: bool
):
    from transformers import TrainingArguments

    return TrainingArguments(
        **training_arguments_kwargs(training, hardware, plan, report_to=report_to, run_name=run_name, has_eval=has_eval)
    )


def build_trainer(model: Any, tokenizer: Any, args: Any, prepared: Any, callbacks: list[Any]):
    """A Hugging Face Trainer over the prepared data with WronAI's collator."""
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    from wronai.data.collate import PackedCollator, PaddingCollator
    from wronai.monitoring import make_progress_callback

    collator_cls = PackedCollator if prepared.packed else PaddingCollator
    collator = collator_cls(pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
    )
    if trainer.callback_handler.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(make_progress_callback())
    return trainer


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint counts only when the trainer state (written last by the Trainer) and weights are there."""
    if not (path / COMPLETE_MARKER).is_file():
        return False
    weights = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")
    return any((path / w).is_file() for w in weights)


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step *complete* checkpoint (transformers' get_last_checkpoint does not check)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    for _, path in sorted(found, reverse=True):
        if is_complete_checkpoint(path):
            return path
        logger.warning("skipping incomplete checkpoint %s", path)
    return None


def set_tensorboard_dir(logging_dir: str | None, output_dir: str) -> None:
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(logging_dir or Path(output_dir) / "logs"))
