"""Trackers (TensorBoard, Weights & Biases) and console progress.

W&B never prompts for a login: without an API key (or with no network) it runs offline and the run can be
synced later with `wandb sync`. Everything is set per run, in the process environment the Trainer reads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from datetime import datetime
from pathlib import Path

from wronai.config.sections.run import LoggingSection
from wronai.errors import WronAIError

logger = logging.getLogger(__name__)


def run_name(logging_cfg: LoggingSection, now: datetime | None = None) -> str:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return logging_cfg.wandb_run_name.replace("{timestamp}", stamp)


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    try:
        return netrc.exists() and "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def check_trackers(logging_cfg: LoggingSection) -> None:
    """Fail early, with the fix, when a configured tracker is not installed."""
    wanted = logging_cfg.report_to
    if (
        "tensorboard" in wanted
        and importlib.util.find_spec("tensorboard") is None
        and importlib.util.find_spec("tensorboardX") is None
    ):
        raise WronAIError(
            "logging.report_to: tensorboard is not installed — pip install tensorboard, or remove it from report_to"
        )
    if "wandb" in wanted and importlib.util.find_spec("wandb") is None:
        raise WronAIError(
            "logging.report_to: wandb is not installed — pip install 'wronai[wandb]', or remove it from report_to"
        )


def _wandb_mode(logging_cfg: LoggingSection) -> str:
    if logging_cfg.wandb_mode == "auto":
        return "online" if _wandb_has_key() else "offline"
    return logging_cfg.wandb_mode


def resolve_report_to(logging_cfg: LoggingSection, output_dir: str) -> list[str]:
    """Tracker names for TrainingArguments.report_to (W&B dropped when ``wandb_mode: disabled``)."""
    check_trackers(logging_cfg)
    wanted: list[str] = [r for r in logging_cfg.report_to if r != "none"]
    if "wandb" in wanted:
        if logging_cfg.wandb_mode == "auto" and _wandb_mode(logging_cfg) == "offline":
            logger.info(
                "W&B: no API key found — logging offline to %s (sync later with `wandb sync`)", output_dir
            )
        if _wandb_mode(logging_cfg) == "disabled":
            wanted.remove("wandb")
    return wanted or ["none"]


def tracker_environment(logging_cfg: LoggingSection, output_dir: str) -> dict[str, str]:
    """The environment the trackers read (TensorBoard when its callback is built, W&B when the run starts):
    the log directory, W&B's mode, project and directory; what the user set in the environment wins."""
    logs = str(Path(logging_cfg.logging_dir or Path(output_dir) / "logs"))
    env = {"TENSORBOARD_LOGGING_DIR": logs}
    if "wandb" in logging_cfg.report_to:
        env["WANDB_MODE"] = _wandb_mode(logging_cfg)
        for key, value in (
            ("WANDB_PROJECT", logging_cfg.wandb_project),
            ("WANDB_DIR", logs),
            ("WANDB_SILENT", "true"),
        ):
            env[key] = os.environ.get(key, value)
        Path(env["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    return env
