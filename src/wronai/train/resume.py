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
    saved = _saved_config(checkpoint)
    if saved is None:
        logger.warning(
            "--resume: %s has no saved config to compare with — resuming without the check", checkpoint
        )
        return
    differences = resume_differences(saved, config.model_dump(mode="json"))
    if differences:
        raise ConfigError(
            [
                *differences,
                "resuming would not reproduce the run — restore these values, or pass --force-resume to resume anyway",
            ],
            f"--resume {checkpoint}",
        )


# settings a config may leave to WronAI (`auto`); a resumed run keeps what the run it continues decided
DECIDED_KEYS = (
    ("training", "per_device_train_batch_size"),
    ("training", "gradient_accumulation_steps"),
    ("training", "optim"),
    ("data", "packing"),
)


def keep_decided(config: WronAIConfig, resume: str | bool | None) -> WronAIConfig:
    """``config`` with its ``auto`` settings replaced by the values the checkpoint's run decided (a copy), so
    that a resumed run computes as the first one did even where this machine would decide otherwise."""
    if not resume:
        return config
    checkpoint = resolve_resume(resume, config.training.output_dir)
    saved = _saved_config(checkpoint) if checkpoint is not None else None
    if not saved:
        return config
    groups: dict[str, dict[str, Any]] = {}
    for group, key in DECIDED_KEYS:
        section = getattr(config, group)
        if key in type(section).model_fields and getattr(section, key) == "auto":
            value = (saved.get(group) or {}).get(key)
            if value not in (None, "auto"):
                groups.setdefault(group, {})[key] = value
                logger.info("--resume: %s.%s: auto -> %r, as the run it continues decided", group, key, value)
    update = {group: getattr(config, group).model_copy(update=values) for group, values in groups.items()}
    return config.model_copy(update=update) if update else config


def _saved_config(checkpoint: Path) -> dict[str, Any] | None:
    for path in (checkpoint / CONFIG_FILE, checkpoint.parent / CONFIG_FILE):
        if path.is_file():
            return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return None
