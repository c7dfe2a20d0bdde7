"""`--resume`: which checkpoint to continue from, and refusing a config that would change the results."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from wronai.config import WronAIConfig
from wronai.errors import ConfigError, WronAIError
from wronai.rundir.files import CONFIG_FILE
from wronai.train import checkpointing

logger = logging.getLogger(__name__)

# Config keys whose change alters the results of a resumed run.
RESULT_KEYS = {
    "model": ("name", "revision", "torch_dtype"),
    "lora": ("r", "lora_alpha", "lora_dropout", "bias", "target_modules", "modules_to_save", "use_rslora"),
    "quantization": ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant"),
    "training": (
        "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
        "optim", "weight_decay", "seed", "data_seed", "warmup_steps", "warmup_ratio", "group_by_length",
    ),
    "data": (
        "dataset_name", "dataset_config", "train_split", "eval_split", "eval_fraction", "format", "columns",
        "text_column", "prompt_template", "chat_template", "train_on", "add_eos", "max_seq_length", "packing", "max_samples",
    ),
    "polish": ("add_polish_tokens", "special_tokens", "extend_vocab"),
}  # fmt: skip


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per result-affecting key that differs between the checkpoint's config and the current one."""
    lines = []
    for group, keys in RESULT_KEYS.items():
        for key in keys:
            old = (saved.get(group) or {}).get(key)
            new = (current.get(group) or {}).get(key)
            if old != new:
                lines.append(f"`{group}.{key}`: {old!r} in the checkpoint, {new!r} now")
    return lines


def resolve_resume(resume: str | bool | None, output_dir: str) -> Path | None:
    """`--resume` alone: the last complete checkpoint in output_dir; `--resume PATH`: that checkpoint."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = checkpointing.last_complete(output_dir)
        if found is None:
            raise WronAIError(
                f"--resume: no complete checkpoint in {output_dir} — train without --resume, or pass a checkpoint path"
            )
        logger.info("resuming from %s", found)
        return found
    path = Path(str(resume))
    if not path.is_dir():
        raise WronAIError(
            f"--resume: {path} is not a checkpoint directory — pass a checkpoint-N folder or --resume alone"
        )
    problem = checkpointing.checkpoint_problem(path)
    if problem is not None:
        raise WronAIError(
            f"--resume: {path} is not a complete checkpoint ({problem}) — choose an earlier checkpoint or --resume alone"
        )
    return path


def check_resume_config(checkpoint: Path, config: WronAIConfig) -> None:
    """Refuse to resume with a config that would change the results (use --force-resume to override)."""
    saved_file = checkpoint / CONFIG_FILE
    if not saved_file.is_file():
        saved_file = checkpoint.parent / CONFIG_FILE
    if not saved_file.is_file():
        logger.warning(
            "--resume: %s has no saved config to compare with — resuming without the check", checkpoint
        )
        return
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    differences = resume_differences(saved, config.model_dump(mode="json"))
    if differences:
        raise ConfigError(
            [
                *differences,
                "resuming would not reproduce the run — restore these values, or pass --force-resume to resume anyway",
            ],
            f"--resume {checkpoint}",
        )
