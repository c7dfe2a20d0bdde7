"""The Trainer's callbacks that WronAI adds: one readable console line per log, a progress bar without raw
dicts, and stopping at the end of a step on SIGTERM/SIGINT (a checkpoint is written first)."""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from wronai.train.faults import SignalState

logger = logging.getLogger(__name__)


class ConsoleLogCallback(TrainerCallback):
    """One readable line per log event (loss, lr, speed, ETA)."""

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


class QuietProgressCallback(ProgressCallback):
    """transformers' progress bar without its raw-dict log lines (the console callback prints readable ones)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


class StopOnSignalCallback(TrainerCallback):
    """After SIGTERM/SIGINT (``signals``): end the loop at the end of the current step, with a checkpoint."""

    def __init__(self, signals: SignalState) -> None:
        self.signals = signals

    def on_step_end(self, args, state, control, **kwargs):
        if self.signals.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
