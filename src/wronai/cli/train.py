"""`wronai train CONFIG [--resume [CHECKPOINT]] [--overwrite] [--force-resume] [--nproc N]`: the whole pipeline."""

from __future__ import annotations

import argparse
import logging

from wronai.cli.common import add_command, load_config_args, setup_logging
from wronai.errors import ConfigError, WronAIError

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "train",
        cmd_train,
        help="run the training pipeline",
        description="Run the whole pipeline: config -> model -> data -> train -> save.",
        config=True,
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the last complete checkpoint in training.output_dir, or from CHECKPOINT",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in training.output_dir")
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even though result-affecting config values changed since the checkpoint",
    )
    p.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="data-parallel processes on this machine: re-launches under torchrun (gloo on CPU, nccl on CUDA); see docs/distributed.md",
    )  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from wronai.recipe import run
    from wronai.runtime import distributed

    loaded = load_config_args(args)
    args.error_log_dir = loaded.config.training.output_dir  # an internal error's traceback goes there
    rank = distributed.world()
    setup_logging(loaded.config.logging.log_level if rank.is_main else "WARNING")  # one console voice per job
    if getattr(args, "nproc", 1) > 1 and not rank.is_distributed:
        return _launch_train(args, loaded.config)
    for note in loaded.notes:
        logger.info("config: %s", note)
    result = run(loaded.config, resume=args.resume, overwrite=args.overwrite, force_resume=args.force_resume)
    for key in ("train_loss", "eval_loss", "train_runtime"):
        if key in result.metrics:
            logger.info("%s: %.4f", key, result.metrics[key])
    logger.info("done — adapter, tokenizer and config are in %s", result.output_dir.resolve())
    return 0


def _launch_train(args: argparse.Namespace, config) -> int:
    """`train --nproc N`: check once here, then re-run this command in N processes under torchrun."""
    from wronai.config.preflight import preflight
    from wronai.model import loading
    from wronai.rundir import saving
    from wronai.runtime import distributed
    from wronai.runtime.hardware import plan_device

    if args.nproc < 1:
        raise WronAIError(f"--nproc {args.nproc}: use 1 or more processes")
    device = plan_device(config.hardware, config.training, config.quantization, config.model).device
    problems = preflight(config)  # includes distributed.preflight_problems
    if problems:
        raise ConfigError(problems, args.config)
    saving.check_output_dir(config.training.output_dir, overwrite=args.overwrite, resume=bool(args.resume))
    loading.ensure_model_available(config.model)  # build a missing local model once, not once per rank
    child = ["train", args.config, *[f"--set={o}" for o in args.overrides]]
    if args.resume:
        child += ["--resume"] if args.resume is True else [f"--resume={args.resume}"]
    if args.force_resume:
        child.append("--force-resume")
    return distributed.launch(args.nproc, child, device)
