"""`wronai plan CONFIG [--gpu 24GB | --ram 24GB] [--nproc N]`: will this run fit? Reads only the model's config.json."""

from __future__ import annotations

import argparse
import sys

from wronai.cli.common import add_command
from wronai.errors import WronAIError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "plan",
        cmd_plan,
        help="estimate GPU memory per device before downloading anything",
        description="Estimate memory per GPU (weights, LoRA + optimizer, activations) from the model's config.json; "
        "say whether it fits the GPU and which settings to change if not. See docs/distributed.md.",
        config=True,
    )
    p.add_argument("--gpu", default="24GB", help="GPU memory, e.g. 8GB, 24GB, 80GB (default 24GB)")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="GPUs the run uses (FSDP/ZeRO-3 split the weights over them)",
    )
    p.add_argument(
        "--ram",
        metavar="SIZE",
        help="plan a CPU run instead: peak RSS per process against this much RAM, e.g. 24GB",
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from wronai.config import load_config
    from wronai.runtime.memory_plan import plan_config

    if args.nproc < 1:
        raise WronAIError(f"--nproc {args.nproc}: use 1 or more GPUs")
    config = load_config(args.config, args.overrides)
    if args.ram:
        plan, text = plan_config(config, gpu=args.ram, nproc=args.nproc, device="cpu")
    else:
        plan, text = plan_config(config, gpu=args.gpu, nproc=args.nproc)
    sys.stdout.write(text)
    return 0 if plan.fits else 1
