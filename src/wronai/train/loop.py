"""The training loop's run: `Trainer.train` with resume, stop signals, out-of-memory and interruption handled."""

from __future__ import annotations

from typing import Any

from wronai.config import WronAIConfig
from wronai.errors import WronAIError
from wronai.runtime.environ import environment
from wronai.runtime.hardware import DevicePlan
from wronai.runtime.heap import release_free_memory
from wronai.train import checkpointing, faults, monitoring
from wronai.train.resume import check_resume_config, resolve_resume


def run_loop(
    trainer: Any,
    config: WronAIConfig,
    plan: DevicePlan,
    signals: faults.SignalState,
    *,
    resume: str | bool | None = None,
    force_resume: bool = False,
) -> dict[str, Any]:
    """Train (or continue from ``--resume``) until the end, a stop signal or a fault; the loop's metrics."""
    output_dir = config.training.output_dir
    if trainer.args.should_save:
        checkpointing.remove_stale_staging(output_dir)
    checkpoint = resolve_resume(resume, output_dir)
    if checkpoint is not None and not force_resume:
        check_resume_config(checkpoint, config)
    signals.install()
    try:
        with environment(monitoring.tracker_environment(config.logging, output_dir)):  # W&B reads it now
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as err:
        if faults.is_out_of_memory(err):
            raise WronAIError(faults.oom_message("training", config, plan.device)) from None
        raise
    finally:
        signals.uninstall()
        if plan.device == "cpu":  # the heap kept the activations for reuse between steps
            release_free_memory()
    if signals.received:
        last = checkpointing.last_complete(output_dir)
        raise faults.TrainingInterrupted(
            f"stopped by {signals.received} at step {trainer.state.global_step}; checkpoint {last} written — "
            "continue with: wronai train CONFIG --resume"
        )
    metrics = dict(result.metrics)
    guard = getattr(trainer, "gradient_guard", None)
    if guard is not None and guard.skipped:
        metrics["skipped_nonfinite_steps"] = guard.skipped
    return metrics
