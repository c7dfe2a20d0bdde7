"""Trackers (TensorBoard, Weights & Biases) and console progress.

W&B never prompts for a login: without an API key (or with no network) it runs offline and the run can be
synced later with `wandb sync`. Everything is set per run, in the process environment the Trainer reads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from datetime import datetime
from pathlib import Path

from wronai.config.schema import LoggingSection
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


def resolve_report_to(logging_cfg: LoggingSection, output_dir: str) -> list[str]:
    """Tracker names for TrainingArguments.report_to; configures W&B's mode and directories."""
    check_trackers(logging_cfg)
    wanted: list[str] = [r for r in logging_cfg.report_to if r != "none"]
    if "wandb" in wanted:
        mode = logging_cfg.wandb_mode
        if mode == "auto":
            mode = "online" if _wandb_has_key() else "offline"
            if mode == "offline":
                logger.info(
                    "W&B: no API key found — logging offline to %s (sync later with `wandb sync`)", output_dir
                )
        if mode == "disabled":
            wanted.remove("wandb")
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_PROJECT", logging_cfg.wandb_project)
        os.environ.setdefault("WANDB_DIR", str(Path(logging_cfg.logging_dir or Path(output_dir) / "logs")))
        os.environ.setdefault("WANDB_SILENT", "true")
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    return wanted or ["none"]


def make_console_callback():
    """A TrainerCallback printing one readable line per log event (loss, lr, speed, ETA)."""
    from transformers import TrainerCallback

    class ConsoleLogCallback(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            elapsed = time.time() - self.start
            parts = [f"step {state.global_step}/{state.max_steps}"]
            for key in ("loss", "eval_loss", "grad_norm", "learning_rate"):
                if key in logs:
                    value = logs[key]
                    parts.append(f"{key} {value:.3e}" if key == "learning_rate" else f"{key} {value:.4f}")
            if state.global_step and state.max_steps:
                eta = elapsed / state.global_step * (state.max_steps - state.global_step)
                parts.append(f"elapsed {elapsed:.0f}s, eta {eta:.0f}s")
            logger.info(" | ".join(parts))

    return ConsoleLogCallback()


def make_progress_callback():
    """transformers' progress bar without its raw-dict log lines (the console callback prints readable ones)."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgressCallback(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            return None

    return QuietProgressCallback()
