"""Faults during training: stop on signal, non-finite loss/gradient guard, out-of-memory.

- SIGTERM/SIGINT: the current step finishes, a checkpoint is written, the run exits with code 3 and says how
  to resume. A second Ctrl-C aborts at once.
- Non-finite gradients (a NaN/inf loss gives them too) are caught right before the optimizer step, with one
  decision for all ranks (``grads_finite``):
  ``training.on_nan: stop`` ends the run (exit code 4) keeping the last good checkpoint; ``skip_step``
  drops that update (no optimizer or momentum change), counts it, and stops after
  ``training.max_consecutive_nan_steps`` in a row.
- Out of memory: one line with `wronai plan`'s estimate for the run and the settings to lower (``oom_message``).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from wronai.errors import WronAIError
from wronai.rundir.files import GUARD_STATE_FILE
from wronai.runtime.batch import resolve as resolve_batch
from wronai.runtime.distributed import world
from wronai.runtime.memory import GIB, ModelShape, estimate, plan_settings, read_model_config

logger = logging.getLogger(__name__)


class TrainingInterrupted(WronAIError):
    """Stopped by SIGTERM/SIGINT after writing a checkpoint."""

    exit_code = 3


class NonFiniteLossError(WronAIError):
    """Training stopped on a NaN/inf loss or gradient."""

    exit_code = 4


class SignalState:
    """Which stop signal arrived (set from the handler, read by the callback)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        if self.received is None:
            logger.warning(
                "%s received — finishing the current step and writing a checkpoint (Ctrl-C again to abort)",
                name,
            )
        self.received = name


class GradientGuard:
    """Wraps ``optimizer.step``: a step with non-finite gradients is stopped on or skipped."""

    def __init__(self, policy: str, max_consecutive: int) -> None:
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.step_of_failure: int | None = None
        self.global_step = 0  # kept current by the trainer

    def state_dict(self) -> dict[str, int]:
        """The counts a resumed run continues from (written into every checkpoint)."""
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))

    def save(self, folder: Path) -> None:
        (folder / GUARD_STATE_FILE).write_text(json.dumps(self.state_dict()), encoding="utf-8")

    def load(self, folder: Path) -> None:
        """Counts from a checkpoint written by ``save``; a checkpoint without them starts from zero."""
        path = folder / GUARD_STATE_FILE
        if path.is_file():
            self.load_state_dict(json.loads(path.read_text(encoding="utf-8")))

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        inner = optimizer.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if grads_finite(optimizer):
                self.consecutive = 0
                return inner(*args, **kwargs)
            return self._bad_step(optimizer)

        optimizer.step = guarded_step  # type: ignore[method-assign]

    def _bad_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self.global_step + 1
        if self.policy == "stop":
            self.step_of_failure = step
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step} — training stopped; the last complete checkpoint is kept. "
                "Lower training.learning_rate, check the data, or set training.on_nan: skip_step"
            )
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        logger.warning(
            "non-finite gradient at step %d — update skipped (%d skipped so far)", step, self.skipped
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive steps with non-finite loss/gradient (last at step {step}) — training stopped. "
                "Lower training.learning_rate or check the data; the last complete checkpoint is kept"
            )


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient is finite — on *every* rank when a process group is running.

    Under DDP/FSDP/ZeRO an inf can reach one rank's gradients only (its own shard, its own micro-batch
    before the reduction, an fp16 overflow); deciding per rank would let one rank skip or stop while the
    others step, and the next collective would hang. So the ranks agree with one all_reduce (MIN of a 0/1
    flag) per optimizer step; with no process group, no collective.
    """
    local = _local_grads_finite(optimizer)
    if not (dist.is_available() and dist.is_initialized()):
        return local
    nccl = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only; gloo (CPU runs) CPU tensors
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _local_grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(err, oom_cls):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def oom_message(stage: str, config: Any, device: str = "cuda") -> str:
    """A one-line explanation with `wronai plan`'s estimate for this run (``runtime.memory``) and the settings to change."""
    config, _ = resolve_batch(config, device)  # the run's numbers (its `auto` batch is decided already)
    t, d, q = config.training, config.data, config.quantization
    advice = [
        f"training.per_device_train_batch_size (now {t.per_device_train_batch_size}; raise gradient_accumulation_steps to keep the global batch)",
        f"data.max_seq_length (now {d.max_seq_length})",
    ]
    if t.gradient_checkpointing is not True:  # false, or auto that decided off
        advice.append("set training.gradient_checkpointing: true")
    if not q.load_in_4bit:
        advice.append("set quantization.load_in_4bit: true")
    return f"out of memory while {stage}{_estimate_note(config, device)} — lower " + "; ".join(advice)


def _estimate_note(config: Any, device: str) -> str:
    """' (`wronai plan` estimates X GiB per GPU …)' for ``config`` on ``device``; "" when the model's shape is unknown."""
    try:
        model_config = read_model_config(config)
        shape = ModelShape.from_config(model_config)
    except (WronAIError, OSError, ValueError):
        return ""
    kind = "cpu" if device == "cpu" else "cuda"
    est = estimate(shape, plan_settings(config, model_config, world().world_size, kind), device=kind)
    name, largest = max(est.parts.items(), key=lambda part: part[1])
    where = "process" if kind == "cpu" else "GPU"
    return (
        f" (`wronai plan` estimates {est.peak / GIB:.1f} GiB per {where} for this run, "
        f"{name} {largest / GIB:.1f} GiB of it, for {shape.total_params / 1e9:.2f}B parameters)"
    )
