"""Data-parallel training on the existing engines: this process's place in the job, its process group, launch.

WronAI never runs its own distributed loop: ``torchrun`` (or ``accelerate launch``) starts one process per
device and the Hugging Face Trainer shards the data per rank and averages gradients. ``wronai train CONFIG
--nproc N`` re-launches the CLI under ``torch.distributed.run`` (``launch``). What FSDP and DeepSpeed get
from ``hardware.distributed`` is in ``runtime.sharding``.

Rank, local rank and world size come from the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE), so the
helpers here work before the process group exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from wronai.errors import WronAIError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def world() -> World:
    """This process's place in the job, from the launcher's environment (1 process when not launched)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def is_main_process() -> bool:
    return world().is_main


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def init_process_group(device: str) -> bool:
    """Join the launcher's process group now (the Trainer would do it later); True when distributed."""
    import torch
    import torch.distributed as dist

    w = world()
    if not w.is_distributed or not dist.is_available():
        return False
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group(backend=backend_for(device))
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (writes caches, output dirs); the others wait, then run it (read them)."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def global_batch(training: Any, world_size: int | None = None) -> int:
    n = world().world_size if world_size is None else world_size
    return training.per_device_train_batch_size * training.gradient_accumulation_steps * n


def describe_batch(training: Any, world_size: int | None = None) -> str:
    n = world().world_size if world_size is None else world_size
    return (
        f"global batch {global_batch(training, n)} rows per optimizer step = {training.per_device_train_batch_size} per device "
        f"× {training.gradient_accumulation_steps} accumulation × {n} process(es)"
    )


def omp_threads(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def launch_command(nproc: int, cli_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m wronai <cli_args>``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "wronai",
        *cli_args,
    ]


def launch(nproc: int, cli_args: list[str], device: str) -> int:
    """Run ``wronai <cli_args>`` in ``nproc`` processes under torchrun; returns torchrun's exit status."""
    import torch

    if device == "cuda" and nproc > torch.cuda.device_count():
        raise WronAIError(
            f"--nproc {nproc}: only {torch.cuda.device_count()} CUDA GPU(s) visible — use --nproc {torch.cuda.device_count()} or fewer"
        )
    env = dict(os.environ)
    env.setdefault(
        "OMP_NUM_THREADS", str(omp_threads(nproc))
    )  # N ranks x all cores would oversubscribe the CPU
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo), without auto-detection
    cmd = launch_command(nproc, cli_args)
    logger.info(
        "launching %d processes (%s backend, OMP_NUM_THREADS=%s): %s",
        nproc,
        backend_for(device),
        env["OMP_NUM_THREADS"],
        " ".join(cmd[1:]),
    )
    return subprocess.call(cmd, env=env)
